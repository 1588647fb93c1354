"""The method registry: importing a method module registers its spec (one line per method).

Every registered method is picked up by the shared conformance suite.
"""
from ..spec import METHODS
from .lora import LoRA
from .dora import DoRA
from .lokr import LoKr
from .mora import MoRA, MoRALinear

__all__ = ["METHODS", "DoRA", "LoKr", "LoRA", "MoRA", "MoRALinear"]
