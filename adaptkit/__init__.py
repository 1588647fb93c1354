r"""adaptkit: parameter-efficient fine-tuning for any torch.nn.Module, in pure PyTorch.

import adaptkit as ak
ak.inject(model, ak.LoRA(rank=16, alpha=32, targets=r".*\.(q|k|v|o)_proj"))
ak.save(model, "adapter.safetensors");  ak.load(other, "adapter.safetensors")
model = ak.merge(model)
"""

__version__ = "0.1.0"

from . import (
    nf4,  # ak.nf4: NF4 kernels, quantize / save / load a model
    peft_compat,  # ak.peft_compat: read / write PEFT adapter folders
)
from .combine import combine
from .errors import AdaptkitError
from .inject import delete, disabled, inject, set_active
from .io import load, save
from .lora_convert import to_lora  # any adapter -> a plain LoRA (truncated SVD)
from .merge import merge
from .methods import DoRA, GeoLoRA, GeoLoRAOptimizer, LoKr, LoRA, LoRAMPO, MoRA, MoRALinear, QLoRA, TrainableTokens
from .optim import param_groups  # LoRA+ learning-rate groups
from .route import route  # an adapter per batch row (serving)
from .summary import summary
from .swap import swap  # new weights into an existing adapter slot (no recompile)

__all__ = [
    "nf4",
    "peft_compat",
    "AdaptkitError",
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
    "combine",
    "delete",
    "disabled",
    "inject",
    "load",
    "merge",
    "param_groups",
    "route",
    "save",
    "set_active",
    "summary",
    "swap",
    "to_lora",
]
