"""Data: embedded synthetic sketch/photo set, samplers, augmentations, pipelines.

Public entry points used by training and evaluation:
`train_batches`, `eval_sets`, `default_data_config`, `normalize`, `MEAN`,
`STD`. Submodules: `synthetic` (generator), `samplers` (pure (seed, step)
samplers, PML's among them), `tuple_weights` (PML's TuplesToWeightsSampler,
which mines: import it yourself, it loads JAX), `augment` (host transforms),
`sources` (synthetic and TFDS random-access sources).
"""
from jaxdml.data import augment
from jaxdml.data import samplers
from jaxdml.data import sources
from jaxdml.data import synthetic
from jaxdml.data.augment import MEAN
from jaxdml.data.augment import normalize
from jaxdml.data.augment import STD
from jaxdml.data.pipeline import default_data_config
from jaxdml.data.pipeline import eval_sets
from jaxdml.data.pipeline import LazyImages
from jaxdml.data.pipeline import num_classes
from jaxdml.data.pipeline import num_threads
from jaxdml.data.pipeline import train_batches
from jaxdml.data.pipeline import worker_layout

__all__ = [
    "MEAN", "STD", "normalize", "default_data_config", "train_batches", "eval_sets",
    "LazyImages", "num_classes", "num_threads", "worker_layout", "augment", "samplers", "sources", "synthetic",
]
