"""Worker processes' recycled shared memory (`jaxdml.data.workers.shared_batches`).

The worker's side and the training process's side run in one process here:
the training side maps the segments by name, as it does across processes.
"""
from multiprocessing import shared_memory
import os

import numpy as np
import pytest

from jaxdml.data.workers import shared_batches


@pytest.fixture(name="pool")
def _pool():
  pool = shared_batches.SegmentPool()
  yield pool
  pool.close()


def _gone(name) -> bool:
  try:
    shared_memory.SharedMemory(name).close()
  except FileNotFoundError:
    return True
  return False


def test_a_segment_is_reused_once_every_array_over_it_is_gone(pool):
  images = pool.array((4, 8, 8, 3), np.uint8)
  images[...] = np.arange(images.size, dtype=np.uint8).reshape(images.shape)
  labels = np.arange(4, dtype=np.int32)
  sent = {"image": pool.handle(images), "label": labels}
  received = shared_batches.Mappings().open_arrays(sent)
  np.testing.assert_array_equal(received["image"], images)
  assert received["label"] is labels  # small arrays travel as they are
  name = sent["image"].name

  # Held by the training side: the next batch gets another segment.
  assert pool.handle(pool.array((4, 8, 8, 3), np.uint8)).name != name
  view = received["image"][1:]
  del received
  assert pool.handle(pool.array((4, 8, 8, 3), np.uint8)).name != name  # a view still holds it
  del view
  again = pool.array((4, 8, 8, 3), np.uint8)
  assert pool.handle(again).name == name
  # The worker writes into the pages the training side read: no new segment.
  assert pool.handle(again.reshape(32, 8, 3)).name == name
  assert pool.handle(again.reshape(32, 8, 3)).shape == (32, 8, 3)


def test_segments_of_other_sizes_are_not_reused(pool):
  small = pool.handle(pool.array((2, 8, 8, 3), np.uint8))
  pool.release(pool.array((2, 8, 8, 3), np.uint8))
  large = pool.handle(pool.array((4, 8, 8, 3), np.uint8))
  assert large.name != small.name


def test_a_released_segment_is_reused_and_extra_idle_ones_are_unlinked():
  pool = shared_batches.SegmentPool(max_idle=1)
  arrays = [pool.array((16, 16, 3), np.uint8) for _ in range(3)]
  names = [pool.handle(a).name for a in arrays]
  assert len(set(names)) == 3
  for a in arrays:  # a failed batch's arrays: never sent
    pool.release(a)
  reused = pool.handle(pool.array((16, 16, 3), np.uint8)).name
  assert reused == names[0]
  assert [_gone(n) for n in names] == [False, False, True]  # one idle kept
  pool.close()
  assert _gone(names[0])


def test_the_training_side_closes_idle_mappings_beyond_its_limit(pool):
  mappings = shared_batches.Mappings(max_idle=1)
  arrays = [mappings.open_arrays({"x": pool.handle(pool.array((8, 8), np.uint8))})["x"]
            for _ in range(4)]
  assert len(mappings._open) == 4  # pylint: disable=protected-access
  del arrays
  assert len(mappings._open) <= 2  # pylint: disable=protected-access


def test_handles_pickle_and_foreign_arrays_are_refused(pool):
  import pickle  # pylint: disable=g-import-not-at-top
  handle = pool.handle(pool.array((3, 5), np.float32))
  copy = pickle.loads(pickle.dumps(handle))
  assert (copy.name, copy.shape, copy.dtype) == (handle.name, (3, 5), np.dtype(np.float32).str)
  with pytest.raises(ValueError, match="does not start a segment of this pool"):
    pool.handle(np.zeros((3, 5), np.float32))


def _mapped(name) -> bool:
  with open("/proc/self/maps") as f:
    return f"/{name}" in f.read()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps")
def test_an_idle_segment_still_mapped_by_a_failed_batch_is_unlinked_then_unmapped():
  pool = shared_batches.SegmentPool(max_idle=0)
  first = pool.array((16, 16, 3), np.uint8)
  kept = pool.array((16, 16, 3), np.uint8)  # a failed batch's array, alive in its traceback
  name = pool.handle(kept).name
  pool.release(first)
  pool.release(kept)
  pool.array((16, 16, 3), np.uint8)  # claims the first, trims `kept`'s without unmapping it
  assert _gone(name)
  kept[...] = 7  # still mapped: no crash
  assert _mapped(name)
  del kept
  assert not _mapped(name)
  pool.close()


def test_a_closed_pool_unlinks_its_segments_and_makes_no_more():
  """A worker closes its pool as it exits, while a batch thread may still
  run; a segment made after that would outlive the worker."""
  pool = shared_batches.SegmentPool()
  name = pool.handle(pool.array((4, 4, 3), np.uint8)).name
  pool.close()
  assert _gone(name)
  with pytest.raises(RuntimeError, match="pool is closed: the worker is exiting"):
    pool.array((4, 4, 3), np.uint8)
