"""A batch's generators made at once equal numpy's, one by one."""
import numpy as np
import pytest

from jaxdml.data import seeding


@pytest.mark.parametrize("key", [
    [0, 201, 5], [3, 201, 2], [12345, 201, 0],
    [2**40 + 7, 201, 2**33 + 1],  # multi-word entropy: more words than the pool holds
    [2**70, 3], [0], [], [1, 2, 3, 4, 5, 6]])
def test_row_generators_are_numpys_default_rng(key):
  rows = np.array([0, 1, 2, 63, 1000, 2**31, 2**32 - 1])
  generators = seeding.row_generators(key, rows)
  assert len(generators) == len(rows)
  for row, got in zip(rows, generators):
    want = np.random.default_rng([*key, int(row)])
    assert got.bit_generator.state == want.bit_generator.state, (key, row)
    np.testing.assert_array_equal(got.integers(0, 1000, 5), want.integers(0, 1000, 5))
    assert got.uniform(0.2, 1.0) == want.uniform(0.2, 1.0)


def test_seed_states_are_what_seed_sequence_generates():
  rows = np.arange(64)
  states = seeding.seed_states([7, 201, 11], rows)
  assert states.dtype == np.uint64 and states.shape == (64, 4)
  for row in (0, 17, 63):
    want = np.random.SeedSequence([7, 201, 11, row]).generate_state(4, np.uint64)
    np.testing.assert_array_equal(states[row], want)


def test_bad_entropy_is_refused():
  with pytest.raises(ValueError, match="rows must be a 1-D array of integers in"):
    seeding.seed_states([0], [2**32])
  with pytest.raises(ValueError, match="rows must be a 1-D array of integers in"):
    seeding.seed_states([0], [-1])
  with pytest.raises(ValueError, match="seed entropy must be non-negative"):
    seeding.seed_states([-3], [0])
  with pytest.raises(ValueError, match="PCG64's 4 uint64 words only"):
    seeding._Seeded(np.zeros(4, np.uint64)).generate_state(8, np.uint32)
