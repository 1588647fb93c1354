r"""QLoRA: LoRA on a frozen 4-bit NormalFloat base (Dettmers, Pagnoni, Holtzman, Zettlemoyer,
"QLoRA: Efficient Finetuning of Quantized LLMs", NeurIPS 2023, arXiv 2305.14314), and QDoRA
(DoRA, Liu et al., ICML 2024, on the same base) with ``use_dora=True``.

    y = deq(W_nf4) x + b + s B A drop(x)           QDoRA: y = g ⊙ (deq(W_nf4) x + s B A x) + b


The NF4 base is :class:`adaptkit.nf4_linear.NF4Linear` (layout, storage, forward, merge and
unload: that file's docstring); this file is the spec. Inject quantises each matched float
Linear (same bytes every time) or adopts an NF4 base with the same settings; the adapters
are LoRA's / DoRA's, built in the compute dtype (``NF4Base.param_kw``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import AdaptkitError
from ..layer import AdaptedLayer
from ..nf4_linear import DTYPE_NAMES, DTYPES, NF4Linear, check_settings
from ..peft_config import PeftForm
from ..spec import register_method
from .dora import DoRA, DoRAAdapter
from .lora import LoRA, LoRAAdapter, check_rank, lora_scale

__all__ = ["QLoRA", "NF4Linear"]


@register_method
@dataclass(frozen=True)
class QLoRA(LoRA):
    """QLoRA spec: the LoRA fields (``rank``, ``alpha``, ``dropout``, ``use_rslora``, ``init``
    in {"default", "gaussian"}) plus the NF4 base's ``blocksize`` (64), ``double_quant``
    (True), ``compute_dtype`` (None = the weight's dtype; "float32" | "bfloat16" |
    "float16"), and ``use_dora`` (QDoRA). Adapts nn.Linear. Inject quantises each matched
    float Linear (same bytes every time) or adopts an NF4 base from adaptkit.nf4.quantize /
    adaptkit.nf4.load with the same settings."""

    method = "qlora"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str | None = None
    use_dora: bool = False

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        if self.init not in ("default", "gaussian"):
            raise AdaptkitError(
                f"{name}: init={self.init!r} rewrites the base weight (W - s B A), "
                f"which is frozen NF4 here; use init='default' or 'gaussian'"
            )
        check_settings(name, self.blocksize, self.double_quant, self.compute_dtype)
        if not isinstance(self.use_dora, bool):
            raise AdaptkitError(f"{name}: use_dora must be a bool, got {self.use_dora!r}")

    def supports(self, kind: str) -> bool:
        return kind == "linear"

    def _dtype(self) -> torch.dtype | None:
        return DTYPES[self.compute_dtype] if self.compute_dtype else None  # validated to be a key

    def settings(self) -> dict:
        """Keyword arguments of NF4Linear.from_linear for this spec."""
        return dict(blocksize=self.blocksize, double_quant=self.double_quant, compute_dtype=self._dtype())

    def prepare_base(self, module: nn.Module, path: str) -> nn.Module:
        """An NF4 copy of a float nn.Linear; an NF4 base (wrapped or not) as it is."""
        if isinstance(module, NF4Linear):
            got = (module.blocksize, module.double_quant)
            cd = self._dtype()
            if got != (self.blocksize, self.double_quant) or cd not in (None, module.compute_dtype):
                raise AdaptkitError(
                    f"QLoRA: '{path}' is already NF4 with blocksize={got[0]}, double_quant={got[1]}, "
                    f"compute_dtype={DTYPE_NAMES[module.compute_dtype]!r}; the spec asks blocksize="
                    f"{self.blocksize}, double_quant={self.double_quant}, compute_dtype="
                    f"{self.compute_dtype!r}. Use the base's settings (compute_dtype=None keeps its own)"
                )
            return module
        if isinstance(module, AdaptedLayer):
            raise AdaptkitError(
                f"QLoRA: '{path}' already carries adapters {list(module.adapters)} on "
                f"a float weight, which quantising would change; inject QLoRA first, "
                f"or quantise with adaptkit.nf4.quantize before any adapter"
            )
        if not isinstance(module, nn.Linear):
            raise AdaptkitError(
                f"QLoRA: '{path}' is a {type(module).__name__}, not an nn.Linear; exclude it from targets"
            )
        return NF4Linear.from_linear(module, **self.settings())

    def build(self, layer: AdaptedLayer, path: str) -> LoRAAdapter:
        r = self.rank_for(path)
        check_rank(type(self).__name__, r, layer, path)
        s = lora_scale(self.alpha_for(path), r, self.use_rslora)
        cls = DoRAAdapter if self.use_dora else LoRAAdapter
        return cls(layer, r, s, self.dropout, self.init)


class QLoRAPeft(PeftForm):
    """PEFT has no QLoRA type: its QLoRA is a LoraConfig (use_dora: QDoRA) on a base bitsandbytes
    loads in 4 bit, so QLoRA writes the LoRA / DoRA folder it carries (same outputs in PEFT on
    the base quantised alike, or on the dequantised weights). Reading gives ak.LoRA / ak.DoRA."""

    peft_type = "LORA"
    reads = staticmethod(lambda cfg: False)  # a config does not say its base is 4-bit

    def written(self, spec: QLoRA) -> LoRA:
        kw = {f.name: getattr(spec, f.name) for f in dataclasses.fields(LoRA)}
        return (DoRA if spec.use_dora else LoRA)(**kw)


QLoRA.peft_form = QLoRAPeft()  # PEFT interop (ak.peft_compat, the command line)
