"""Batch samplers: pure functions of (seed, step).

The indices of the batch for step `s` depend on nothing but the seed and `s`,
so a resumed run at step `s` sees exactly the batches an uninterrupted run
would have seen, with no sampler state in the checkpoint. Samplers return
*global* batch indices; `process_rows` cuts out one process's share.

pytorch-metric-learning's samplers are here as such functions
(`m_per_class_batch_indices`, `hierarchical_batch_indices`,
`fixed_triplet_batch_indices`; `TuplesToWeightsSampler` is
`jaxdml.data.tuple_weights`) and as small classes for a user's own loop
(`MPerClass`, `Hierarchical`, `FixedSetOfTriplets`): `sampler.batch(step)`.
`from_spec` builds one from `config.data.sampler`.
"""
import itertools
import math

import numpy as np

# Distinct stream tags, so samplers sharing a seed draw independent numbers.
_PAIR_ORDER, _PAIR_SKETCH, _MPC = 101, 102, 103
_HIER_ORDER, _HIER, _TRIPLETS, _TRIPLET_ORDER, _WEIGHTED = 104, 105, 106, 107, 108
TUPLE_SUBSET = 109  # tuple_weights' subset draw


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
  return _draw_classes(rng, classes, need, m, (order, starts, counts))


def _draw_classes(rng, classes, need, m, groups):
  """int64 [need * m]: `need` of `classes` drawn uniformly without
  replacement, then `m` of each one's rows, without replacement unless the
  class has fewer (PML's `safe_random_choice`); a class's rows contiguous."""
  order, starts, counts = groups
  chosen = classes[rng.permutation(len(classes))[:need]]
  out = np.empty(need * m, np.int64)
  for i, c in enumerate(chosen):
    pick = rng.choice(counts[c], size=m, replace=bool(counts[c] < m))
    out[i * m:(i + 1) * m] = order[starts[c] + pick]
  return out


def m_per_class_steps_per_epoch(batch_size, length_before_new_iter=100_000):
  """PML's iterator length in batches: `length_before_new_iter // batch_size`."""
  return length_before_new_iter // batch_size


def hierarchy(labels, *, inner_label=0, outer_label=1):
  """Classes grouped by super-class, for `hierarchical_batch_indices`.

  Args:
    labels: int array [N, L] of hierarchical labels, a column per level.
    inner_label, outer_label: the columns of the class and the super-class.
      As in PML, a class is an (outer, inner) pair: the same inner label
      under two super-classes is two classes.

  Returns:
    `(class_groups, super_groups, super_labels)`: `group_rows` of the rows
    by class and of the classes by super-class, and the super-classes'
    labels (in increasing order, the order of `super_groups`).
  """
  labels = np.asarray(labels)
  if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"hierarchical labels must be an int array [N, levels], a column per "
                     f"level; got dtype {labels.dtype} and shape {labels.shape}.")
  pairs = labels[:, [outer_label, inner_label]]
  classes, row_class = np.unique(pairs, axis=0, return_inverse=True)
  super_labels, class_super = np.unique(classes[:, 0], return_inverse=True)
  return group_rows(row_class.reshape(-1)), group_rows(class_super.reshape(-1)), super_labels


def _combination(index, n, k):
  """The `index`-th k-subset of range(n) in `itertools.combinations` order."""
  out, first = [], 0
  for slot in range(k):
    while True:
      block = math.comb(n - first - 1, k - slot - 1)  # subsets that take `first` here
      if index < block:
        break
      index, first = index - block, first + 1
    out.append(first)
    first += 1
  return out


_MAX_EPOCH_STEPS = 1 << 26  # an epoch's order is one permutation of its steps


def hierarchical_steps_per_epoch(num_super_classes, *, batches_per_super_tuple=4,
                                 super_classes_per_batch=2):
  """PML's `len(HierarchicalSampler)`: batches per super-class tuple times
  the tuples, C(num_super_classes, super_classes_per_batch)."""
  return math.comb(num_super_classes, super_classes_per_batch) * batches_per_super_tuple


def hierarchical_batch_indices(labels, *, batch_size, samples_per_class, seed, step,
                               batches_per_super_tuple=4, super_classes_per_batch=2,
                               inner_label=0, outer_label=1, groups=None):
  """PML's `HierarchicalSampler`: a batch from `super_classes_per_batch`
  super-classes, `batch_size / super_classes_per_batch` rows of each, made of
  whole classes of `samples_per_class` rows.

  An epoch holds every tuple of super-classes (`itertools.combinations` of
  the sorted super-labels) `batches_per_super_tuple` times, in a seeded
  order per epoch, as PML's reshuffled batch list. Within a super-class the
  classes are a uniform draw without replacement and each class's rows are
  drawn as `m_per_class_batch_indices` draws them. Rows are laid out by
  super-class, then by class (PML shuffles the rows of a batch; no loss
  depends on their order).

  Args:
    labels: int array [N, levels] (see `hierarchy`); unused with `groups`.
    batch_size: rows per batch, a multiple of super_classes_per_batch.
    samples_per_class: rows per class (an int: PML's "all" makes batches of
      varying size).
    seed, step: the batch is a pure function of these.
    batches_per_super_tuple, super_classes_per_batch, inner_label,
      outer_label: as in PML, with PML's defaults.
    groups: optional precomputed `hierarchy(labels, ...)` (for speed).

  Returns:
    int64 array [batch_size] of rows of `labels`.
  """
  if not isinstance(samples_per_class, (int, np.integer)) or samples_per_class < 1:
    raise ValueError(f"samples_per_class={samples_per_class!r}: pass a positive int; PML's "
                     "'all' makes batches of varying size, which a compiled step cannot take.")
  k, m = int(super_classes_per_batch), int(samples_per_class)
  if k < 1 or batch_size % k or (batch_size // k) % m:
    raise ValueError(f"batch_size ({batch_size}) must be a multiple of super_classes_per_batch "
                     f"({k}) times samples_per_class ({m}).")
  class_groups, super_groups, super_labels = groups if groups is not None else hierarchy(
      labels, inner_label=inner_label, outer_label=outer_label)
  class_order, class_starts, classes_per_super = super_groups
  num_super, need = len(classes_per_super), batch_size // k // m
  if num_super < k:
    raise ValueError(f"super_classes_per_batch={k} but the labels have {num_super} "
                     "super-classes; lower super_classes_per_batch.")
  short = np.flatnonzero(classes_per_super < need)
  if short.size:
    raise ValueError(f"each super-class gives batch_size / super_classes_per_batch / "
                     f"samples_per_class = {need} classes to a batch, but super-classes "
                     f"{super_labels[short[:5]].tolist()} have fewer; lower batch_size, "
                     "raise samples_per_class or drop those super-classes.")
  steps = hierarchical_steps_per_epoch(num_super, batches_per_super_tuple=batches_per_super_tuple,
                                       super_classes_per_batch=k)
  if steps > _MAX_EPOCH_STEPS or steps < 1:
    raise ValueError(f"an epoch of {steps} batches (C({num_super}, {k}) super-class tuples x "
                     f"{batches_per_super_tuple}) is out of range; lower super_classes_per_batch "
                     "or set batches_per_super_tuple >= 1.")
  epoch, position = divmod(step, steps)
  slot = np.random.default_rng([seed, _HIER_ORDER, epoch]).permutation(steps)[position]
  rng = np.random.default_rng([seed, _HIER, step])
  return np.concatenate([
      _draw_classes(rng, class_order[class_starts[s]:class_starts[s] + classes_per_super[s]],
                    need, m, class_groups)
      for s in _combination(int(slot) // batches_per_super_tuple, num_super, k)])


def fixed_triplets(labels, *, num_triplets, seed):
  """PML's `FixedSetOfTriplets` set: int64 [num_triplets, 3] rows (a, p, n).

  Each triplet draws an anchor class and another class for the negative,
  then two distinct rows of the anchor class and one of the other, as PML.
  Anchor classes are those with at least two rows (PML also draws
  one-row classes and then repeats the row as its own positive).
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be an int array [N]; got {labels.dtype} {labels.shape}.")
  if int(num_triplets) < 1:
    raise ValueError(f"num_triplets must be positive; got {num_triplets}.")
  order, starts, counts = group_rows(np.unique(labels, return_inverse=True)[1].reshape(-1))
  anchor_classes = np.flatnonzero(counts >= 2)
  if len(counts) < 2 or not anchor_classes.size:
    raise ValueError(f"a triplet needs a class with at least two rows and another class; the "
                     f"labels have {len(counts)} classes, {anchor_classes.size} with two rows "
                     "or more. Use labels with more classes or more rows per class.")
  rng = np.random.default_rng([seed, _TRIPLETS])
  n = int(num_triplets)
  a_class = anchor_classes[rng.integers(anchor_classes.size, size=n)]
  n_class = rng.integers(len(counts) - 1, size=n)
  n_class += n_class >= a_class  # uniform over the other classes
  a = rng.integers(counts[a_class])
  p = rng.integers(counts[a_class] - 1)
  p += p >= a  # a distinct row of the anchor's class
  neg = rng.integers(counts[n_class])
  return np.stack([order[starts[a_class] + a], order[starts[a_class] + p],
                   order[starts[n_class] + neg]], axis=1).astype(np.int64)


def fixed_triplet_batch_indices(triplets, *, batch_size, seed, step):
  """`batch_size / 3` whole triplets of a fixed set, flattened (a0, p0, n0,
  a1, ...): int64 [batch_size].

  As PML's iterator (the set shuffled, flattened, cut into batches with
  `drop_last`): an epoch visits the triplets in a seeded order, each once;
  the `len(triplets) % (batch_size / 3)` left over sit out that epoch.
  """
  triplets = np.asarray(triplets)
  if batch_size % 3 or batch_size < 3:
    raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of 3, so a "
                     "batch holds whole triplets.")
  per_batch = batch_size // 3
  if len(triplets) < per_batch:
    raise ValueError(f"a batch of {batch_size} holds {per_batch} triplets but the set has "
                     f"{len(triplets)}; raise num_triplets or lower batch_size.")
  epoch, position = divmod(step, len(triplets) // per_batch)
  perm = np.random.default_rng([seed, _TRIPLET_ORDER, epoch]).permutation(len(triplets))
  return triplets[perm[position * per_batch:(position + 1) * per_batch]].reshape(-1)


def weighted_batch_indices(weights, *, batch_size, seed, step):
  """`batch_size` rows drawn with replacement, row i with probability
  proportional to `weights[i]` (torch's `WeightedRandomSampler` with
  `replacement=True`, as PML's `TuplesToWeightsSampler` uses it)."""
  weights = np.asarray(weights, np.float64)
  if (weights.ndim != 1 or not np.isfinite(weights).all() or (weights < 0).any()
      or weights.sum() <= 0):
    raise ValueError("weights must be a 1-D array of finite non-negative numbers with a "
                     "positive sum.")
  rng = np.random.default_rng([seed, _WEIGHTED, step])
  return rng.choice(len(weights), size=batch_size, p=weights / weights.sum()).astype(np.int64)


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


class StepSampler:
  """A (seed, step) sampler as an object for a user's own training loop.

  `batch(step)` is step `step`'s int64 [batch_size] rows. Iterating yields
  the batches of steps `start_step`, `start_step + 1`, ... without end (a
  resumed loop passes its step as `start_step`); `len(sampler)` is the steps
  of an epoch and `epoch(e)` yields epoch e's batches, as a loop over a
  PML sampler's epochs would. Nothing is stateful: a batch is never drawn
  from what came before.
  """
  steps_per_epoch: int
  start_step: int = 0

  def batch(self, step: int) -> np.ndarray:
    raise NotImplementedError

  def __len__(self) -> int:
    return self.steps_per_epoch

  def __iter__(self):
    return map(self.batch, itertools.count(self.start_step))

  def epoch(self, epoch: int):
    """The batches of steps [epoch * len(self), (epoch + 1) * len(self))."""
    return map(self.batch, range(epoch * len(self), (epoch + 1) * len(self)))


class MPerClass(StepSampler):
  """PML's `MPerClassSampler(labels, m, batch_size, length_before_new_iter)`:
  batches of `batch_size / m` classes with `m` rows each
  (`m_per_class_batch_indices`); an epoch is PML's iterator,
  `length_before_new_iter // batch_size` batches."""

  def __init__(self, labels, m: int, batch_size: int, *, seed: int = 0,
               length_before_new_iter: int = 100_000, start_step: int = 0):
    if length_before_new_iter < batch_size:
      raise ValueError(f"length_before_new_iter ({length_before_new_iter}) must be at least "
                       f"batch_size ({batch_size}).")
    self.labels = np.asarray(labels)
    self.m, self.batch_size, self.seed, self.start_step = int(m), int(batch_size), seed, start_step
    self.steps_per_epoch = m_per_class_steps_per_epoch(batch_size, length_before_new_iter)
    self._groups = group_rows(self.labels)
    self.batch(start_step)  # impossible settings raise here

  def batch(self, step: int) -> np.ndarray:
    return m_per_class_batch_indices(self.labels, m=self.m, batch_size=self.batch_size,
                                     seed=self.seed, step=step, label_groups=self._groups)


class Hierarchical(StepSampler):
  """PML's `HierarchicalSampler`: labels [N, levels], batches of whole
  classes from `super_classes_per_batch` super-classes
  (`hierarchical_batch_indices`); an epoch is every super-class tuple
  `batches_per_super_tuple` times."""

  def __init__(self, labels, batch_size: int, samples_per_class: int, *,
               batches_per_super_tuple: int = 4, super_classes_per_batch: int = 2,
               inner_label: int = 0, outer_label: int = 1, seed: int = 0, start_step: int = 0):
    self.groups = hierarchy(labels, inner_label=inner_label, outer_label=outer_label)
    self.seed, self.start_step = seed, start_step
    self._kwargs = dict(batch_size=int(batch_size), samples_per_class=samples_per_class,
                        batches_per_super_tuple=int(batches_per_super_tuple),
                        super_classes_per_batch=int(super_classes_per_batch))
    self.steps_per_epoch = hierarchical_steps_per_epoch(
        len(self.groups[2]), batches_per_super_tuple=batches_per_super_tuple,
        super_classes_per_batch=super_classes_per_batch)
    self.batch(start_step)

  def batch(self, step: int) -> np.ndarray:
    return hierarchical_batch_indices(None, seed=self.seed, step=step, groups=self.groups,
                                      **self._kwargs)


class FixedSetOfTriplets(StepSampler):
  """PML's `FixedSetOfTriplets(labels, num_triplets)`: `triplets` (int64
  [num_triplets, 3], drawn once from the seed) served `batch_size / 3`
  whole triplets a batch (`fixed_triplet_batch_indices`)."""

  def __init__(self, labels, num_triplets: int, batch_size: int, *, seed: int = 0,
               start_step: int = 0):
    self.triplets = fixed_triplets(labels, num_triplets=num_triplets, seed=seed)
    self.batch_size, self.seed, self.start_step = int(batch_size), seed, start_step
    self.batch(start_step)
    self.steps_per_epoch = len(self.triplets) // (self.batch_size // 3)

  def batch(self, step: int) -> np.ndarray:
    return fixed_triplet_batch_indices(self.triplets, batch_size=self.batch_size,
                                       seed=self.seed, step=step)


SAMPLERS = ("m_per_class", "hierarchical", "fixed_set_of_triplets")


def from_spec(spec, labels, *, batch_size: int, seed: int, m_per_class: int = 4,
              field=None) -> StepSampler:
  """The sampler `config.data.sampler` names, over rows labelled `labels`.

  `spec` is a name or a dict `{"name": ..., **settings}`:
  "m_per_class" (m = `m_per_class`, no settings); "hierarchical" with
  `super_label` (the field of super-class labels, read by `field(name)`),
  `samples_per_class` (default `m_per_class`), `batches_per_super_tuple`,
  `super_classes_per_batch`; "fixed_set_of_triplets" with `num_triplets`.
  """
  spec = {"name": spec} if isinstance(spec, str) else dict(spec or {"name": "m_per_class"})
  name = spec.pop("name", "m_per_class")
  allowed = {"m_per_class": (), "fixed_set_of_triplets": ("num_triplets",),
             "hierarchical": ("super_label", "samples_per_class", "batches_per_super_tuple",
                              "super_classes_per_batch")}
  if name not in allowed:
    raise ValueError(f"sampler {name!r} is not one of {SAMPLERS} (tuples_to_weights needs the "
                     "model: use jaxdml.data.tuple_weights in your own loop).")
  unknown = sorted(set(spec) - set(allowed[name]))
  if unknown:
    raise ValueError(f"sampler {name!r} has no setting {unknown}; it takes {allowed[name]}"
                     + (" (m is config.data.m_per_class)." if name == "m_per_class" else "."))
  if name == "m_per_class":
    return MPerClass(labels, int(m_per_class), batch_size, seed=seed)
  if name == "fixed_set_of_triplets":
    if "num_triplets" not in spec:
      raise ValueError("sampler 'fixed_set_of_triplets' needs num_triplets, e.g. "
                       "dict(name='fixed_set_of_triplets', num_triplets=10_000).")
    return FixedSetOfTriplets(labels, spec["num_triplets"], batch_size, seed=seed)
  if "super_label" not in spec:
    raise ValueError("sampler 'hierarchical' needs super_label, the field of super-class "
                     "labels, e.g. dict(name='hierarchical', super_label='super_class').")
  if field is None:
    raise ValueError("sampler 'hierarchical' reads its super_label with field=: pass a "
                     "function from a field name to its int array [N].")
  outer = field(spec.pop("super_label"))
  return Hierarchical(np.stack([np.asarray(labels), np.asarray(outer)], axis=1), batch_size,
                      int(spec.pop("samples_per_class", m_per_class)), seed=seed, **spec)
