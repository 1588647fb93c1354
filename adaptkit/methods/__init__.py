"""The method registry: importing a method module registers its spec (one line per method).

Every registered method is picked up by the shared conformance suite.
"""

from ..spec import METHODS
from .dora import DoRA
from .geolora import GeoLoRA
from .geolora_optim import GeoLoRAOptimizer
from .lokr import LoKr
from .lora import LoRA
from .lorampo import LoRAMPO
from .mora import MoRA
from .mora_linear import MoRALinear
from .qlora_nf4 import QLoRA
from .tokens import TrainableTokens

__all__ = [
    "METHODS",
    "DoRA",
    "GeoLoRA",
    "GeoLoRAOptimizer",
    "LoKr",
    "LoRA",
    "LoRAMPO",
    "MoRA",
    "MoRALinear",
    "QLoRA",
    "TrainableTokens",
]
