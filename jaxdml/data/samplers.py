"""Batch samplers: pure functions of (seed, step).

The indices of the batch for step `s` depend on nothing but the seed and `s`,
so a resumed run at step `s` sees exactly the batches an uninterrupted run
would have seen, with no sampler state in the checkpoint. Samplers return
*global* batch indices; `process_rows` cuts out one process's share.
"""
import numpy as np

# Distinct stream tags, so samplers sharing a seed draw independent numbers.
_PAIR_ORDER, _PAIR_SKETCH, _MPC = 101, 102, 103


def group_rows(values, num_groups=None):
  """CSR grouping of rows by an integer value.

  Returns `(order, starts, counts)`: the rows with value `v` are
  `order[starts[v]:starts[v] + counts[v]]`, in increasing row order.
  """
  values = np.asarray(values)
  if values.ndim != 1 or (values.size and values.min() < 0):
    raise ValueError("group_rows expects a 1-D array of non-negative integers.")
  num_groups = int(values.max()) + 1 if num_groups is None else num_groups
  order = np.argsort(values, kind="stable")
  counts = np.bincount(values, minlength=num_groups)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  return order, starts, counts


def _epoch_order(seed, epoch, n, batch_size):
  """Visit order of epoch `epoch`, free of duplicates across the seam batch.

  The stream of positions is the concatenation of per-epoch permutations;
  the batch at the seam holds the last `a` items of epoch e-1 and the first
  `k = batch_size - a` of epoch e. Items of the first `k` that also sit in
  the previous tail are swapped with later items of epoch e, taken from the
  part that cannot reach the next seam (positions before `n - r`), so the
  previous tail is always the *unmodified* permutation's tail and no
  recursion over epochs is needed. Needs n >= 2 * batch_size.
  """
  perm = np.random.default_rng([seed, _PAIR_ORDER, epoch]).permutation(n)
  a = (epoch * n) % batch_size
  if epoch == 0 or a == 0:
    return perm
  k = batch_size - a
  r = ((epoch + 1) * n) % batch_size
  prev_tail = np.random.default_rng([seed, _PAIR_ORDER, epoch - 1]).permutation(n)[n - a:]
  bad = np.flatnonzero(np.isin(perm[:k], prev_tail))
  if bad.size:
    cand = np.arange(k, n - r)
    cand = cand[~np.isin(perm[cand], prev_tail)][:bad.size]
    perm[bad], perm[cand] = perm[cand], perm[bad].copy()
  return perm


def pair_batch_indices(photo_indices, sketch_groups, *, batch_size, seed, step):
  """SBIR batch: `batch_size` distinct photos, one random sketch of each.

  Epochs: photos are visited in a seeded permutation per epoch; step `s`
  takes positions `[s*B, (s+1)*B)` of the stream formed by concatenating the
  epochs' permutations. At an epoch's tail the batch wraps into the next
  epoch's permutation (no photo is dropped, epoch e holds every photo once);
  a photo that would appear twice in that seam batch is swapped with a later
  photo of the new epoch, so all B photos of every batch are distinct. The
  sketch of each photo is drawn uniformly (with replacement across steps).

  Args:
    photo_indices: int array [N] of eligible photo rows (e.g. train photos);
      every one must have at least one sketch. Requires N >= 2 * batch_size.
    sketch_groups: `group_rows(sketch_photo)`: sketch rows per photo row.
    batch_size: global batch size B.
    seed, step: the batch is a pure function of these.

  Returns:
    `(photos, sketches)`: int64 arrays [B] of photo and sketch rows; sketch
    i is a sketch of photo i.
  """
  photo_indices = np.asarray(photo_indices)
  n = len(photo_indices)
  if n < 2 * batch_size:
    raise ValueError(f"the pair sampler needs at least 2*batch_size = {2 * batch_size} "
                     f"eligible photos to keep the photos of a batch distinct across epoch "
                     f"boundaries; got {n}. Lower the batch size or use more photos.")
  order, starts, counts = sketch_groups
  has_sketch = np.zeros(n, bool)
  known = photo_indices < len(counts)
  has_sketch[known] = counts[photo_indices[known]] > 0
  if not has_sketch.all():
    raise ValueError("every eligible photo needs at least one sketch; drop photos "
                     "without sketches from photo_indices.")
  pos = step * batch_size + np.arange(batch_size)
  epochs, offs = pos // n, pos % n
  rows = np.empty(batch_size, np.int64)
  for e in np.unique(epochs):
    sel = epochs == e
    rows[sel] = _epoch_order(seed, int(e), n, batch_size)[offs[sel]]
  photos = photo_indices[rows]
  u = np.random.default_rng([seed, _PAIR_SKETCH, step]).random(batch_size)
  pick = np.minimum((u * counts[photos]).astype(np.int64), counts[photos] - 1)
  return photos.astype(np.int64), order[starts[photos] + pick].astype(np.int64)


def pair_steps_per_epoch(num_photos, batch_size):
  """Steps per epoch of `pair_batch_indices` (fractional: epochs wrap)."""
  return num_photos / batch_size


def m_per_class_batch_indices(labels, *, m, batch_size, seed, step, label_groups=None):
  """A batch of `batch_size // m` classes with `m` samples each.

  Same sampling as pytorch-metric-learning's `MPerClassSampler` with
  `batch_size` set: the classes of a batch are a uniform draw without
  replacement among all classes; within a class the `m` samples are drawn
  without replacement, or with replacement when the class has fewer than
  `m`. Batches are independent draws, so as in PML there is no coverage
  guarantee within an "epoch"; PML's epoch is `length_before_new_iter`
  samples (default 100,000), i.e. `m_per_class_steps_per_epoch(...)` steps,
  which only matters for epoch-based schedules. Classes are laid out
  contiguously (rows `[i*m, (i+1)*m)` share a class).

  Args:
    labels: int array [N] of class labels (any non-negative integers).
    m: samples per class.
    batch_size: global batch size; must be a multiple of m.
    seed, step: the batch is a pure function of these.
    label_groups: optional precomputed `group_rows(labels)` (for speed).

  Returns:
    int64 array [batch_size] of rows of `labels`.
  """
  if m < 1 or batch_size % m:
    raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of "
                     f"m_per_class ({m}).")
  order, starts, counts = label_groups if label_groups is not None else group_rows(labels)
  classes = np.flatnonzero(counts)
  need = batch_size // m
  if len(classes) < need:
    raise ValueError(f"batch_size / m_per_class = {need} classes per batch, but the data "
                     f"has only {len(classes)} classes; lower batch_size or raise m_per_class.")
  rng = np.random.default_rng([seed, _MPC, step])
  chosen = classes[rng.permutation(len(classes))[:need]]
  out = np.empty(batch_size, np.int64)
  for i, c in enumerate(chosen):
    pick = rng.choice(counts[c], size=m, replace=bool(counts[c] < m))
    out[i * m:(i + 1) * m] = order[starts[c] + pick]
  return out


def m_per_class_steps_per_epoch(batch_size, length_before_new_iter=100_000):
  """PML's iterator length in batches: `length_before_new_iter // batch_size`."""
  return length_before_new_iter // batch_size


def process_rows(batch, *, process_index, process_count):
  """Rows `[p*B/n, (p+1)*B/n)` of a global batch (array or dict of arrays)."""
  if isinstance(batch, dict):
    return {k: process_rows(v, process_index=process_index, process_count=process_count)
            for k, v in batch.items()}
  size = len(batch)
  if size % process_count:
    raise ValueError(f"global batch size {size} is not divisible by the process count "
                     f"{process_count}; pick a multiple of {process_count}.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
  b = size // process_count
  return batch[process_index * b:(process_index + 1) * b]
