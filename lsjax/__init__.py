"""lsjax: routed LoRA experts (LoRA-Switch) on a Flax NNX Llama-family model, decoding at base speed."""

from lsjax.checkpoint import load
from lsjax.config import ModelConfig, RopeConfig
from lsjax.errors import CheckpointError, ConfigError, ConversionError, LsjaxError
from lsjax.model import Llama, forward

__all__ = ["load", "ModelConfig", "RopeConfig", "Llama", "forward",
           "LsjaxError", "ConfigError", "ConversionError", "CheckpointError"]
__version__ = "0.1.0"
