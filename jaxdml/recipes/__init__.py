"""Recipe builders: every file in `configs/` is a short call into these.

`common` holds what all recipes share (data sets, cadence, the shrinking
onto the embedded data for `:smoke` and `:demo`); one module per paper
builds its configs with the paper's hyperparameters (PAPERS.md).
"""
from jaxdml.recipes import backbones
from jaxdml.recipes.common import (SMOKE_CADENCE, apply_overlay, default_data_config,
                                   embedded_overlay, evaluator, for_every_evaluator, loop,
                                   on_embedded_data, retrieval_eval, single_task, smoke_cadence)
from jaxdml.recipes.irt import irt
from jaxdml.recipes.obdsd import obdsd
from jaxdml.recipes.proxy_anchor import proxy_anchor
from jaxdml.recipes.raml import raml, raml_teacher
from jaxdml.recipes.xbn import xbn

__all__ = ["backbones", "SMOKE_CADENCE", "apply_overlay", "default_data_config", "embedded_overlay", "evaluator",
           "for_every_evaluator", "loop", "on_embedded_data", "retrieval_eval", "single_task",
           "smoke_cadence", "irt",
           "obdsd", "proxy_anchor", "raml", "raml_teacher", "xbn"]
