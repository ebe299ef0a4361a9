"""The ablation studies of docs/ablations.md: each paper's claim as a small table.

    python -m jaxdml.tools.ablate --study=memory --seeds=3     # from a jaxdml checkout
    python -m jaxdml.tools.ablate --study=all                   # make ablations

Each study is a list of `jaxdml.tools.ablate.Variant`s; the runner (resumable,
seeds, tables) is in the package, the tables' contents live here.
"""

from jaxdml.tools.ablate import Variant

CNN_TRUNK = {"model.name": "resnet_small", "model.pooling": "avg"}

# study -> (metrics, variants, total_steps override or None)
STUDIES = {
    "rtl": (("recall@1",), [
        Variant("triplet", "sketchy_rtl.py:demo,ablation=triplet"),
        Variant("rtl", "sketchy_rtl.py:demo"),
    ], 200),
    "embedding": (("recall@1",), [
        Variant("l2", "sketchy_rtl.py:demo,embedding=l2"),
        Variant("bn", "sketchy_rtl.py:demo"),
    ], 200),
    # The demo's student is a half-width ResNet pair (sketchy_rtl_kd.py says why).
    "kd": (("recall@1",), [
        Variant("teacher (ResNet pair)", "sketchy_rtl.py:demo"),
        Variant("half-width student alone", "sketchy_rtl_kd.py:demo,distill=off"),
        Variant("half-width student + KD", "sketchy_rtl_kd.py:demo",
                from_runs={"teacher.workdir": "teacher (ResNet pair)"}),
    ], 200),
    "memory": (("recall@1",), [
        Variant("no memory", "sop_xbn.py:demo,adapt=none", {"memory.size": 0}),
        Variant("XBM", "sop_xbn.py:demo,adapt=none"),
        Variant("XBN", "sop_xbn.py:demo,adapt=moments"),
        Variant("XBN kalman", "sop_xbn.py:demo,adapt=kalman"),
        # The filter before the recipe's process noise followed the measured
        # BatchNorm shift (adaptive), and before it widened its prior (fixed).
        Variant("XBN kalman, q 1e-3", "sop_xbn.py:demo,adapt=kalman",
                {"memory.adapt_hparams.process_noise": 1e-3}),
        Variant("XBN kalman, q 1e-3, fixed", "sop_xbn.py:demo,adapt=kalman",
                {"memory.adapt_hparams.process_noise": 1e-3,
                 "memory.adapt_hparams.adaptive": False}),
    ], None),
    # XBM's own regime: memory on a pretrained network whose embeddings
    # drift slowly (here: the no-memory demo run, then fine-tuning at lr 1e-4).
    "memory_finetune": (("recall@1",), [
        Variant("pretrain (no memory)", "sop_xbn.py:demo,adapt=none", {"memory.size": 0}),
    ] + [
        Variant(name, f"sop_xbn.py:demo,adapt={adapt}",
                {"optimizer.lr": 1e-4, "memory.start_step": 0, **extra},
                from_runs={"model.init_file": "pretrain (no memory)"})
        for name, adapt, extra in (("+ no memory", "none", {"memory.size": 0}),
                                   ("+ XBM", "none", {}), ("+ XBN", "moments", {}),
                                   ("+ XBN kalman", "kalman", {}),
                                   ("+ XBN kalman, q 1e-3", "kalman",
                                    {"memory.adapt_hparams.process_noise": 1e-3}))
    ], None),
    "raml": (("recall@1", "map@r"), [
        Variant("teacher 64 px (sym)", "cub_raml_teacher.py:demo"),
        Variant("student 32 px, sym", "cub_raml.py:demo",
                from_runs={"teacher.workdir": "teacher 64 px (sym)"}, run="student"),
        Variant("student 32 px vs teacher db, asym", "cub_raml.py:demo",
                from_runs={"teacher.workdir": "teacher 64 px (sym)"}, run="student",
                metric_prefix="asym/"),
    ], None),
    "obdsd": (("recall@1", "map@r"), [
        Variant("MS", "cub_obdsd.py:demo,distill=False"),
        Variant("MS + OBD-SD", "cub_obdsd.py:demo"),
        # CUB's lambda (1000) was tuned on a pretrained network at lr 1e-5;
        # from scratch at lr 1e-3 the term dominates. A milder weight:
        Variant("MS + OBD-SD, lambda 10", "cub_obdsd.py:demo", {"terms.obd_sd.lambda_": 10.0}),
    ], None),
    "koleo": (("nn_distance", "recall@1"), [
        Variant("contrastive", "sop_irt.py:demo,koleo=0"),
        Variant("contrastive + KoLeo", "sop_irt.py:demo"),
        # The demo ViT does not learn retrieval from scratch on 1.5k images
        # (R@1 near chance either way); the same loss on the demo CNN does.
        Variant("contrastive, CNN", "sop_irt.py:demo,koleo=0", CNN_TRUNK),
        Variant("contrastive + KoLeo, CNN", "sop_irt.py:demo", CNN_TRUNK),
    ], None),
}
