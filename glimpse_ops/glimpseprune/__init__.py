"""GlimpsePrune's rules in one place, for every integration (``glimpse_ops.hf``, the vLLM
plugin, the training command): the trained predictor (``predictor``), its file formats and
the public release (``release``), the two keep rules (``keep_rule``) and the settings with
their one ``resolve`` and one default layer (``settings``). Imports torch and the ops only,
never transformers or vLLM."""

from .keep_rule import CAPS_PER, TrainedKeepRule, TrainingFreeRule, ceil_caps
from .predictor import GlimpsePredictor, PredictorConfig
from .release import load_predictor, load_release, predictor_config
from .settings import PruneSettings, default_layer

__all__ = [
    "CAPS_PER",
    "GlimpsePredictor",
    "PredictorConfig",
    "PruneSettings",
    "TrainedKeepRule",
    "TrainingFreeRule",
    "ceil_caps",
    "default_layer",
    "load_predictor",
    "load_release",
    "predictor_config",
]
