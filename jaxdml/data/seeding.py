"""One batch's per-row generators, seeded as numpy seeds them, in one pass.

The pipeline gives every row its own generator,
`np.random.default_rng([*key, row])`, so an augmentation depends on
(seed, step, row) alone. Built one by one that costs ~11 us a row, all of it
holding the GIL: numpy's `SeedSequence` hashes the entropy in Python-level
loops (docs/benchmarks.md). `row_generators` runs the same hash for all the
rows of a batch at once on uint32 arrays and hands each `PCG64` its finished
seed state: 2.5 us a row, the hash ~1 us of it. The generators are numpy's own, in the same
states: tests/test_seeding.py checks them against `default_rng`.
"""
import numpy as np

# numpy's SeedSequence constants (numpy/random/bit_generator.pyx).
_POOL_SIZE = 4
_INIT_A, _MULT_A = 0x43B0D7E5, 0x931E8875
_INIT_B, _MULT_B = 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R = 0xCA01F9DD, 0x4973F715
_XSHIFT = 16
_MASK32 = 0xFFFFFFFF


def _words(value: int) -> list[int]:
  """An entropy integer as SeedSequence reads it: uint32 words, low first."""
  if value < 0:
    raise ValueError(f"seed entropy must be non-negative; got {value}.")
  out = [value & _MASK32]
  value >>= 32
  while value:
    out.append(value & _MASK32)
    value >>= 32
  return out


def _hash_consts(init, mult, calls) -> np.ndarray:
  """uint32 [calls + 1, 1]: SeedSequence's running hash constant before
  each of `calls` calls and after the last (call i XORs with entry i and
  multiplies by entry i + 1). They are the same for every row, so whole
  rows of the hash can run at once."""
  out = [init]
  for _ in range(calls):
    out.append((out[-1] * mult) & _MASK32)
  return np.asarray(out, np.uint32)[:, None]


def _hashmix(values, consts_before, consts_after):
  values = (values ^ consts_before) * consts_after
  return values ^ (values >> np.uint32(_XSHIFT))


def _mix(x, y):
  result = np.uint32(_MIX_MULT_L) * x - np.uint32(_MIX_MULT_R) * y
  return result ^ (result >> np.uint32(_XSHIFT))


def seed_states(key, rows) -> np.ndarray:
  """uint64 [len(rows), 4]: `SeedSequence([*key, row]).generate_state(4,
  np.uint64)` for every row, i.e. the seed `PCG64` takes.

  The hash is SeedSequence's `mix_entropy` and `generate_state`, with its
  calls grouped where they do not depend on each other: within one source
  word, the three destinations it mixes into.
  """
  prefix = [w for k in key for w in _words(int(k))]
  rows = np.asarray(rows, np.int64)
  if rows.ndim != 1 or (rows.size and (rows.min() < 0 or rows.max() > _MASK32)):
    raise ValueError("rows must be a 1-D array of integers in [0, 2**32).")
  entropy = np.empty((max(_POOL_SIZE, len(prefix) + 1), len(rows)), np.uint32)
  entropy[:len(prefix)] = np.asarray(prefix, np.uint32)[:, None]
  entropy[len(prefix)] = rows
  entropy[len(prefix) + 1:] = 0
  extra = len(entropy) - _POOL_SIZE
  calls = _POOL_SIZE + _POOL_SIZE * (_POOL_SIZE - 1) + extra * _POOL_SIZE
  a = _hash_consts(_INIT_A, _MULT_A, calls)
  with np.errstate(over="ignore"):  # uint32 arithmetic wraps, as the hash wants
    pool = _hashmix(entropy[:_POOL_SIZE], a[:_POOL_SIZE], a[1:_POOL_SIZE + 1])
    used = _POOL_SIZE
    for src in range(_POOL_SIZE):
      dst = [d for d in range(_POOL_SIZE) if d != src]
      hashed = _hashmix(pool[src], a[used:used + 3], a[used + 1:used + 4])
      pool[dst] = _mix(pool[dst], hashed)
      used += 3
    for word in entropy[_POOL_SIZE:]:
      for dst in range(_POOL_SIZE):  # each mix reads the hash of the same word anew
        pool[dst] = _mix(pool[dst], _hashmix(word, a[used], a[used + 1]))
        used += 1
    b = _hash_consts(_INIT_B, _MULT_B, 2 * _POOL_SIZE)
    words = _hashmix(np.concatenate([pool, pool]), b[:-1], b[1:])  # the pool, cycled
  return np.ascontiguousarray(words.T).astype("<u4").view("<u8").astype(np.uint64)


class _Seeded(np.random.bit_generator.ISeedSequence):
  """A seed state already hashed: what `PCG64` asks its seed sequence for."""

  def __init__(self, state):
    self._state = state

  def generate_state(self, n_words, dtype=np.uint32):
    if n_words != _POOL_SIZE or np.dtype(dtype) != np.uint64:
      raise ValueError("a pre-hashed seed holds PCG64's 4 uint64 words only.")
    return self._state


def row_generators(key, rows) -> list[np.random.Generator]:
  """`[np.random.default_rng([*key, row]) for row in rows]`, the same
  generators in the same states, ~10x cheaper."""
  return [np.random.Generator(np.random.PCG64(_Seeded(s))) for s in seed_states(key, rows)]
