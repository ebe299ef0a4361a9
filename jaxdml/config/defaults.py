"""Every default of a run's config, as plain data, in one place.

`jaxdml.config.resolve` fills them into a recipe's config (what
`--mode=print_config` shows); the modules that read a section take these
values from here (`optim.make_optimizer` completes a partial optimizer
config from `OPTIMIZER`, for instance), so no default is written twice.
Nothing here imports JAX: a recipe is loaded and checked without it.
"""

from __future__ import annotations

# Top-level fields and their defaults; the required ones have none.
TOP = {
    "log_every": 50, "eval_every": 0, "checkpoint_every": 1000, "keep_checkpoints": 3,
    "mesh": {"data": -1}, "sharding": "replicated", "sharding_rules": {}, "epoch_steps": 0,
    "terms": {}, "teacher": None, "evals": {},
}
REQUIRED = ("seed", "task", "batch_size", "total_steps", "model", "loss", "optimizer", "data")
TASKS = ("sbir", "single")

# `config.optimizer`: b1/b2 are Adam's, momentum SGD's, pct_start and
# div_factor one_cycle's. The regexes match parameter paths (jaxdml.optim);
# "embed_head" is the embedding head's name (jaxdml.models.heads.HEAD_NAME).
OPTIMIZER = {
    "name": "adamw", "lr": None, "schedule": "constant", "warmup_steps": 0,
    "end_lr_factor": 0.0, "pct_start": 0.3, "div_factor": 25.0, "weight_decay": 0.0,
    "no_decay": r"(pos_embed|cls_token|gem)", "grad_clip_norm": None, "b1": 0.9, "b2": 0.999,
    "momentum": 0.9, "frozen": None, "accumulate_steps": 1, "decay_steps": 0,
    "decay_rate": 0.5, "lr_multipliers": None, "warm_steps": 0,
    "warm_trains": r"(^|/)embed_head/|^loss_params/",
}

# `config.memory`: the cross-batch memory (jaxdml.memory). `loss_form` says
# how the memory's pairs enter the ranking loss (jaxdml.memory.loss_with_memory).
MEMORY = {"size": 0, "start_step": 0, "adapt": "none", "adapt_hparams": {},
          "loss_form": "joint", "weight": 1.0}
MEMORY_LOSS_FORMS = ("joint", "xbm", "pml")

# `generate`'s keywords for the embedded synthetic set (jaxdml.data.synthetic).
SYNTHETIC = {"num_categories": 12, "photos_per_category": 24, "sketches_per_photo": 3,
             "test_photos_per_category": 6, "image_size": 64, "seed": 0}

# `config.data` (jaxdml.data). `data_dir` and `cache_dir` are strings, unset.
DATA = {
    "name": "synthetic_sketchy",
    "data_dir": str,  # TFDS data dir
    "cache_dir": str,  # where the synthetic set is cached
    "image_size": 64,
    "synthetic": SYNTHETIC,
    "m_per_class": 4,
    # Single-encoder batches (`jaxdml.data.samplers.from_spec`): "m_per_class"
    # (m above), dict(name="hierarchical", super_label="super_class", ...) or
    # dict(name="fixed_set_of_triplets", num_triplets=...).
    "sampler": {"name": "m_per_class"},
    "augment": {
        "random_resized_crop": True,
        "scale": (0.2, 1.0),
        "ratio": (3 / 4, 4 / 3),
        "flip": True,
        # An int R: resize to R x R, then a random image_size crop (IRT's
        # 256 -> 224); replaces the random resized crop.
        "resize_square": None,
        # None/0: off; float x: (x, x, x, 0); or (b, c, s, hue). Untyped
        # (None) so recipes may set a float or a tuple.
        "color_jitter": None,
    },
    # RAML: dict(num=8, hi=448, lo=224, mixup=0.2); mixup is the Beta
    # parameter of view-wise mixup with another image (0: off). Two-view
    # losses (vicreg, self_supervised): dict(num=2), views at image_size.
    "views": None,
    # Sketch/photo sets with one encoder: "category" classes of photos, or
    # "instance": a photo and its sketches form a class.
    "single_labels": "category",
    # Threads per process; 0: one per core of the process's share, up to 32.
    "num_threads": 0,
    # Worker processes, each running `num_threads` threads; 0: threads in
    # this process only; -1: one per core, fewer where memory is short.
    "num_workers": -1,
    "prefetch": 2,  # batches buffered ahead on the host
    "device_prefetch": 2,  # batches already on the devices ahead of the step
}

# `config.teacher`: every kind takes these; a type as the default is a field
# of that type, unset until given.
TEACHER = {"kind": None, "images": "same", "feeds_memory": False}
TEACHER_IMAGES = ("same", "image_hi")
# The built-in kinds' own fields (jaxdml.teacher).
TEACHER_KINDS = {
    "frozen": {"workdir": str, "step": int, "recipe": "", "model": None},
    "previous_epoch": {},
    "momentum": {"momentum": 0.999},
}

# `config.evals.NAME`: every evaluator takes these.
EVALUATOR = {"type": None, "enabled": True, "every": None}
# The built-in evaluator types' own settings (jaxdml.evaluators). `every`
# None is `config.eval_every`; all evaluators also run at the last step.
RETRIEVAL = {
    # "auto": the data set's own (sbir, same_set or query_gallery).
    "protocol": "auto", "split": "test",
    "metrics": ("recall", "r_precision", "map@r"), "ks": (1, 5, 10),
    "backend": "exact", "similarity": "cosine", "scann_config": None,
    "batch_size": 256, "picture": True, "prefix": "",
    # None, or a re-ranking of the search's lists before scoring, e.g.
    # {"name": "alpha_qe", "n": 2, "alpha": 3.0} (jaxdml.retrieval.rerank_spec).
    "rerank": None,
}
EVALUATOR_TYPES = {
    "retrieval": RETRIEVAL,
    # The student's queries against a database the teacher tower embeds at
    # its own image size (RAML).
    "asymmetric": {**RETRIEVAL, "picture": False, "prefix": "asym/"},
}
