"""The state of an NF4 weight besides its packed bytes, and its bitsandbytes file form.

Holds the codebook ``NF4_CODE`` and :class:`NF4State` (absmax, optional double-quantised
absmax, shape, dtype, blocksizes) with ``to_tensors`` / ``from_tensors`` in the key layout
bitsandbytes writes. The quantise / dequantise kernels are in :mod:`adaptkit.nf4`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn

from .errors import AdaptkitError
from .nf4_nested import DYNAMIC_CODE

__all__ = ["NF4_CODE", "NF4State", "QuantParam"]

# The 16 NF4 values exactly as bitsandbytes has them (create_normal_map(offset=0.9677083),
# normalised to max 1): 7 negatives, zero at index 7, 8 positives.
# fmt: off
NF4_CODE = torch.tensor(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
     -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
     0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
     0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0],
    dtype=torch.float32,
)
# fmt: on

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_TABLES: dict = {}  # (name, device) -> the table there: no host-to-device copy per call


def _on(name: str, table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``table`` on ``device``, copied once per device (not while torch.compile traces)."""
    if torch.compiler.is_compiling() or device.type == "cpu":
        return table.to(device)
    key = (name, device)
    if key not in _TABLES:
        _TABLES[key] = table.to(device)
    return _TABLES[key]


class QuantParam(nn.Parameter):
    """A frozen Parameter holding quantised state (NF4 bytes, absmax): a Parameter, not a
    buffer, so FSDP2's ``fully_shard`` shards it along dim 0 and gathers it for the forward
    (docs/ARCHITECTURE.md, "Sharded NF4"), as bitsandbytes' ``Params4bit`` is a Parameter.
    It never requires grad: ``requires_grad_(True)`` (``model.requires_grad_()``, restoring
    a model's flags after ``ak.merge``) leaves it frozen rather than failing on uint8."""

    def __new__(cls, data: torch.Tensor, requires_grad: bool = False):
        return super().__new__(cls, data, requires_grad=False)

    def requires_grad_(self, requires_grad: bool = True) -> QuantParam:
        return self

    def __reduce_ex__(self, protocol):  # nn.Parameter's would unpickle a plain Parameter
        return QuantParam, (self.data,)


@dataclass
class NF4State:
    """What :func:`dequantize_nf4` needs besides the packed bytes.

    absmax: fp32 ``[ceil(n/blocksize)]``, or uint8 codes into ``DYNAMIC_CODE`` when double
    quantised; nested_absmax: fp32 ``[ceil(nblocks/nested_blocksize)]`` or None; offset: fp32
    0-d tensor or None; shape / dtype: of the original weight.
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    nested_blocksize: int = 256

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def block_absmax(self) -> torch.Tensor:
        """fp32 absmax per block, ``DYNAMIC_CODE[q8]·nested_absmax + offset`` if nested."""
        nested, offset = self.nested_absmax, self.offset
        if nested is None or offset is None:
            return self.absmax
        q = self.absmax  # uint8 codes [nblocks]; index_select on int32 is ~4x uint8 -> long + indexing
        code = torch.index_select(_on("dynamic", DYNAMIC_CODE, q.device), 0, q.int())  # [nblocks], fresh
        nb = self.nested_blocksize
        full = code.numel() // nb * nb
        # bnb multiplies in fp32, then adds the offset: [nested blocks, nb] * [nested blocks, 1]
        code[:full].view(-1, nb).mul_(nested[: full // nb, None])
        if full < code.numel():
            code[full:].mul_(nested[full // nb :])  # partial nested block
        return code.add_(offset)

    def to_tensors(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """Tensors under bitsandbytes' ``QuantState.as_dict(packed=True)`` key names.

        ``{prefix}.absmax``, ``{prefix}.quant_map`` and, if nested, ``{prefix}.nested_absmax``,
        ``{prefix}.nested_quant_map``; the scalars travel as UTF-8 JSON bytes in
        ``{prefix}.quant_state.bitsandbytes__nf4``. The packed weight itself goes under
        ``{prefix}`` (bnb stores it as ``[ceil(n/2), 1]``).
        """
        meta = {
            "quant_type": "nf4",
            "blocksize": self.blocksize,
            "dtype": _DTYPE_NAMES[self.dtype],
            "shape": list(self.shape),
        }
        out = {f"{prefix}.absmax": self.absmax, f"{prefix}.quant_map": NF4_CODE.clone()}
        if self.nested_absmax is not None and self.offset is not None:
            meta.update(
                nested_blocksize=self.nested_blocksize, nested_dtype="float32", nested_offset=float(self.offset)
            )
            out[f"{prefix}.nested_absmax"] = self.nested_absmax
            out[f"{prefix}.nested_quant_map"] = DYNAMIC_CODE.clone()
        out[f"{prefix}.quant_state.bitsandbytes__nf4"] = torch.tensor(
            list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8
        )
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], prefix: str = "weight") -> NF4State:
        """Inverse of :meth:`to_tensors`; validates keys, maps and sizes (reads bnb files too)."""

        def need(key: str) -> torch.Tensor:
            if key not in tensors:
                raise AdaptkitError(
                    f"NF4: missing tensor '{key}' (have {sorted(tensors)[:8]}); "
                    f"was it saved with NF4State.to_tensors(prefix='{prefix}')?"
                )
            return tensors[key]

        try:
            meta = json.loads(bytes(need(f"{prefix}.quant_state.bitsandbytes__nf4").cpu().tolist()))
            shape, bs, dtype = torch.Size(meta["shape"]), int(meta["blocksize"]), meta["dtype"]
        except (ValueError, KeyError, TypeError) as e:
            raise AdaptkitError(f"NF4: unreadable quant_state JSON under '{prefix}': {e}") from None
        if meta.get("quant_type") != "nf4":
            raise AdaptkitError(f"NF4: quant_type={meta.get('quant_type')!r} at '{prefix}', expected 'nf4'")
        names = {v: k for k, v in _DTYPE_NAMES.items()}
        if dtype not in names:
            raise AdaptkitError(f"NF4: dtype={dtype!r} at '{prefix}', expected one of {sorted(names)}")
        if not torch.equal(need(f"{prefix}.quant_map").float().cpu(), NF4_CODE):
            raise AdaptkitError(f"NF4: '{prefix}.quant_map' is not the NF4 codebook")
        nested = f"{prefix}.nested_absmax" in tensors
        state = cls(absmax=need(f"{prefix}.absmax"), shape=shape, dtype=names[dtype], blocksize=bs)
        if nested:
            if not torch.equal(need(f"{prefix}.nested_quant_map").float().cpu(), DYNAMIC_CODE):
                raise AdaptkitError(f"NF4: '{prefix}.nested_quant_map' is not the dynamic map")
            state.nested_absmax = tensors[f"{prefix}.nested_absmax"].float()
            state.nested_blocksize = int(meta.get("nested_blocksize", 256))
            state.offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=state.absmax.device)
        state.validate(where=f"'{prefix}'")
        return state

    def validate(self, where: str = "NF4State") -> None:
        """Raise AdaptkitError unless dtypes and sizes agree with shape and blocksizes."""
        _check_blocksize(self.blocksize, "blocksize")
        nblocks = -(-self.numel // self.blocksize)
        want = torch.uint8 if self.double_quant else torch.float32
        if self.absmax.dtype != want or self.absmax.numel() != nblocks:
            raise AdaptkitError(
                f"NF4: absmax at {where} is {self.absmax.dtype}[{self.absmax.numel()}], expected "
                f"{want}[{nblocks}] for shape {tuple(self.shape)} and blocksize {self.blocksize}"
            )
        if self.nested_absmax is not None:
            _check_blocksize(self.nested_blocksize, "nested_blocksize")
            nn_ = -(-nblocks // self.nested_blocksize)
            if self.nested_absmax.numel() != nn_ or self.offset is None or self.offset.numel() != 1:
                raise AdaptkitError(
                    f"NF4: nested_absmax at {where} has {self.nested_absmax.numel()} values, expected "
                    f"{nn_} (= ceil({nblocks}/{self.nested_blocksize})) plus a scalar offset"
                )


def _check_blocksize(bs, name: str) -> None:
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 2 or bs % 2:
        raise AdaptkitError(
            f"NF4: {name}={bs!r} is invalid; use a positive even integer "
            f"(bitsandbytes uses 64 for weights and 256 for nested absmax)"
        )
