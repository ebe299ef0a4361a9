"""How far train-mode BatchNorm moves a batch's embeddings, batch to batch.

    python tests/measure_bn_shift.py WORKDIR [CONFIG[:ARG]]

Restores a run's latest checkpoint and embeds 60 training batches twice:
in train mode (BatchNorm on the batch's own statistics, as the train step
and so the cross-batch memory see them) and in eval mode (running
statistics). Prints, per embedding dimension (median over dimensions), in
units of the population std: the batch-to-batch std of the batch's mean
train-minus-eval shift, and, for scale, the batch-to-batch std of the
eval-mode batch mean (class composition). docs/ablations.md uses it to set
the drift simulation's `bn_shift` in tests/test_memory.py.
"""
import itertools
import sys

import jax
import numpy as np

from jaxdml import build, data, tasks, train
from jaxdml import config as config_lib


def main(workdir, recipe="configs/sop_xbn.py:demo"):
  path, _, arg = recipe.partition(":")
  config = config_lib.load_config(path, arg)
  parts, ckpt = train.setup(config, workdir)
  state = train.restore_or_create(parts, ckpt)
  model = parts.model
  variables = build.model_variables(state)
  batches = data.train_batches(config.data, seed=7, global_batch_size=int(config.batch_size),
                               start_step=0, task="single")
  in_train_mode = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0][0])
  in_eval_mode = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
  shifts, means, embeddings = [], [], []
  for batch in itertools.islice(batches, 60):
    x = tasks.model_inputs("single", batch)[0]
    e_train, e_eval = np.asarray(in_train_mode(variables, x)), np.asarray(in_eval_mode(variables, x))
    shifts.append((e_train - e_eval).mean(0))
    means.append(e_eval.mean(0))
    embeddings.append(e_eval)
  sd = np.concatenate(embeddings).std(0, ddof=1)
  print(f"batch-to-batch std of the train-mode shift / population std: "
        f"{np.median(np.std(shifts, 0) / sd):.3f}")
  print(f"batch-to-batch std of the eval-mode batch mean / population std: "
        f"{np.median(np.std(means, 0) / sd):.3f} (iid: {1 / np.sqrt(config.batch_size):.3f})")


if __name__ == "__main__":
  main(*sys.argv[1:])
