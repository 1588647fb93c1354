"""The AdapterLayer protocol and the wrapper that carries adapters on a base module.

Module diagram (one wrapped ``nn.Linear``; the same for Conv / Embedding / GPT-2 Conv1D)::

        x ──► base op (W, b) ─────────────────────────────┐
        │                                                 ▼
        ├──► adapters["a"].update(x, y, layer) ─► y + Δ_a(x) ─► ... ─► y
        └──► adapters["b"] ...

The wrapper *is* an instance of the base class (a dynamic subclass, ``AdaptedLinear`` of
``nn.Linear`` etc.) and takes over the base's own ``weight`` / ``bias`` Parameters, so
``isinstance`` checks in user code still hold and the base state-dict keys are unchanged
(DESIGN invariant 3). Adapter parameters live under ``<path>.adapters.<name>.<param>``.
The original module object is kept out of the module tree and handed back by ``unwrap``.

Every adapter implements the small :class:`Adapter` protocol; ``delta_weight`` is the one
source of truth (invariant 1), fast forward paths must agree with it.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import AdaptkitError

try:
    from torch.compiler import is_compiling
except ImportError:  # torch 2.2
    from torch._dynamo import is_compiling

KINDS = ("linear", "conv1d_t", "conv", "embedding")


def tracing() -> bool:
    """True while torch.compile traces the forward. Adapters then skip eager-only machinery
    that dynamo cannot trace without a graph break or a recompile: caches keyed on data
    pointers / versions, Python-side dicts filled on first use, custom autograd Functions
    with in-place outputs, and Python branches on tensor values."""
    return is_compiling()


def base_kind(m: nn.Module) -> str | None:
    """Classify a module as an adaptable base, or None.

    "conv1d_t" is a Linear-like with a transposed (in, out) weight, GPT-2's ``Conv1D``,
    recognised by duck typing (class name, ``nf`` and weight shape) so that transformers
    is never imported."""
    if isinstance(m, AdaptedLayer):
        return m.kind
    if getattr(m, "adaptkit_drop_in", False):
        return None  # ak.MoRALinear carries its own update: wrapping it would drop that update
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if isinstance(m, nn.Embedding):
        return "embedding"
    w = getattr(m, "weight", None)
    if (type(m).__name__ == "Conv1D" and isinstance(getattr(m, "nf", None), int)
            and isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[1] == m.nf):
        return "conv1d_t"
    return None


class Adapter(nn.Module):
    """One named adapter on one layer. Methods subclass this.

    ``update(x, y, layer)`` returns ``y`` plus this adapter's update (``y`` is the base
    output, possibly already holding other adapters' updates); ``delta_weight(layer)``
    returns the dense update in fp32 in the base weight's native shape. ``merge_weight`` /
    ``unmerge_weight`` map a fp32 weight to the merged / unmerged one (default: +/- delta;
    DoRA overrides them).
    """

    merged: bool = False
    # True: when first in the active set, ``base_forward(x, layer)`` computes the base output
    # (DoRA pushes its A rows through the same GEMM as x; see methods/dora.py)
    fuses_base: bool = False

    def base_forward(self, x: torch.Tensor, layer: "AdaptedLayer") -> torch.Tensor:
        return layer.base_op(x, layer.weight, layer.bias)

    def update(self, x: torch.Tensor, y: torch.Tensor, layer: "AdaptedLayer") -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self, layer: "AdaptedLayer") -> torch.Tensor:
        raise NotImplementedError

    def merge_weight(self, layer: "AdaptedLayer", w32: torch.Tensor) -> torch.Tensor:
        return w32 + self.delta_weight(layer)

    def unmerge_weight(self, layer: "AdaptedLayer", w32: torch.Tensor) -> torch.Tensor:
        return w32 - self.delta_weight(layer)

    def attach(self, layer: "AdaptedLayer") -> None:
        """Called once the adapter joins ``layer`` (residual inits change W here)."""

    def layer_state(self) -> dict[str, Any]:
        """Per-layer JSON state saved in the file's ``adaptkit.layers`` (e.g. a rank)."""
        return {}

    def load_layer_state(self, state: dict[str, Any], path: str) -> None:
        """Restore per-layer state before tensors are loaded (shapes may depend on it)."""


@runtime_checkable
class AdapterLayer(Protocol):
    """What adaptkit's free functions (inject, merge, io, combine) rely on in a layer that
    carries adapters: a ``ModuleDict`` of :class:`Adapter` by name, the base op and the
    2D weight view, and per-layer merge bookkeeping. :class:`AdaptedLayer` implements it."""

    adapters: nn.ModuleDict
    kind: str

    def base_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...
    def set_active(self, names: list[str]) -> None: ...
    def dense_weight(self, extra: list[str] | None = None) -> torch.Tensor: ...
    def merge(self, names: list[str], check: bool = True) -> None: ...
    def unmerge(self) -> None: ...
    def unwrap(self) -> nn.Module: ...


class AdaptedLayer(nn.Module):
    """Mixin of the dynamic wrapper classes (implements :class:`AdapterLayer`); see the
    module docstring."""

    kind: str
    _base_cls: type

    def _adopt(self, base: nn.Module) -> None:
        nn.Module.__init__(self)
        for k, v in base.__dict__.items():  # in_features, stride, padding_idx, nf, ...
            if k not in self.__dict__ and not k.startswith("_") or k in (
                    "_reversed_padding_repeated_twice",):
                self.__dict__[k] = v
        self.training = base.training
        self._parameters.update(base._parameters)  # same Parameter objects: keys unchanged
        self._buffers.update(base._buffers)
        self._modules.update(base._modules)
        if "bias" not in self._parameters:
            self.__dict__["bias"] = None  # Embedding: lets base_op / adapters say layer.bias
        self.adapters = nn.ModuleDict()
        self.__dict__["_base"] = base  # kept outside the module tree
        self.__dict__["_active"] = ()  # unmerged active adapters, in order
        self.__dict__["_active_names"] = []

    # ---- the base op and weight views --------------------------------------------------
    def base_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The frozen base computation with an arbitrary weight (dense reference)."""
        k = self.kind
        if k == "linear":
            return F.linear(x, weight, bias)
        if k == "conv1d_t":
            y = x @ weight  # (..., in) @ (in, out) -> (..., out)
            return y + bias if bias is not None else y
        if k == "conv":
            return self._conv_forward(x, weight, bias)
        return F.embedding(x, weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)

    @property
    def out_features(self) -> int:  # noqa: D401 - uniform across kinds
        k, w = self.kind, self.weight
        return w.shape[1] if k in ("conv1d_t", "embedding") else w.shape[0]

    @property
    def in_features(self) -> int:
        """Flattened fan-in of the 2D view: in (linear), in/groups*k (conv), vocab (embedding)."""
        k, w = self.kind, self.weight
        return w.shape[0] if k in ("conv1d_t", "embedding") else w[0].numel()

    def to_2d(self, w: torch.Tensor) -> torch.Tensor:
        """Native weight -> (out, in_flat) view (conv: (out, in/g * prod(k)))."""
        if self.kind in ("conv1d_t", "embedding"):
            return w.t()  # (in, out) -> (out, in)
        return w.reshape(w.shape[0], -1)  # (out, in/g, *k) -> (out, in/g*prod(k))

    def from_2d(self, d: torch.Tensor) -> torch.Tensor:
        """(out, in_flat) -> native weight shape."""
        if self.kind in ("conv1d_t", "embedding"):
            return d.t()
        return d.reshape(self.weight.shape)  # (out, in_flat) -> (out, in/g, *k)

    # ---- forward ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self._active
        if act and act[0].fuses_base:
            y = act[0].base_forward(x, self)
        else:  # _parameters directly: Module.__getattr__ is a measurable part of the overhead
            p = self._parameters  # (a quantised base keeps its packed weight as a buffer)
            y = self.base_op(x, p["weight"] if "weight" in p else self._buffers["weight"], p.get("bias"))
        for a in act:
            y = a.update(x, y, self)
        return y

    # ---- active set, merge / unmerge --------------------------------------------------
    def set_active(self, names: list[str]) -> None:
        self.__dict__["_active_names"] = list(names)
        self.__dict__["_active"] = tuple(
            self.adapters[n] for n in names if n in self.adapters and not self.adapters[n].merged)

    def dense_weight(self, extra: list[str] | None = None) -> torch.Tensor:
        """fp32 ``W + Σ delta`` of the named adapters (the dense reference)."""
        w = self.weight.detach().float()
        for n in extra or []:
            w = self.adapters[n].merge_weight(self, w)
        return w

    def merge(self, names: list[str], check: bool = True) -> None:
        """Fold the named adapters into W, accumulating in fp32; NaN/inf refuses."""
        todo = [n for n in names if not self.adapters[n].merged]
        if not todo:
            return
        w = self.weight.detach().float()
        for n in todo:
            w = self.adapters[n].merge_weight(self, w)
        if check and not torch.isfinite(w).all():
            raise AdaptkitError(f"merge: adapters {todo} give a non-finite weight at this layer; "
                                f"nothing was merged. Check the adapter weights for NaN/inf")
        with torch.no_grad():
            self.weight.copy_(w)
        for n in todo:
            self.adapters[n].merged = True
        self.set_active(self._active_names)

    def unmerge(self) -> None:
        """Undo merges in reverse order (exact where the math allows)."""
        done = [n for n, a in self.adapters.items() if a.merged]
        if not done:
            return
        w = self.weight.detach().float()
        for n in reversed(done):
            w = self.adapters[n].unmerge_weight(self, w)
            self.adapters[n].merged = False
        with torch.no_grad():
            self.weight.copy_(w)
        self.set_active(self._active_names)

    def unload(self, requantize: bool = False) -> nn.Module:
        """The plain module ``ak.merge`` puts back: ``unwrap()``. A quantised base (NF4,
        methods/qlora_nf4.py) overrides it to return a dense layer, or with ``requantize`` a
        re-quantised one; a float base has nothing to re-quantise."""
        return self.unwrap()

    def unwrap(self) -> nn.Module:
        """The original module, holding this wrapper's (possibly merged) parameters."""
        base = self.__dict__["_base"]
        for k in base._parameters:
            base._parameters[k] = self._parameters[k]
        for k in base._buffers:
            base._buffers[k] = self._buffers[k]
        base.train(self.training)
        return base

    def extra_repr(self) -> str:
        return f"{self._base_cls.__name__}: {self.__dict__['_base'].extra_repr()}"

    def __reduce_ex__(self, protocol):
        # torch.save(model) / pickle: rebuild the run-time wrapper class from the base class
        return _unpickle, (self._base_cls, self.kind), self.__getstate__()


_WRAPPERS: dict[type, type] = {}


def wrap(base: nn.Module) -> AdaptedLayer:
    """Wrap ``base`` (no copy of its parameters); returns the existing wrapper if wrapped."""
    if isinstance(base, AdaptedLayer):
        return base
    kind = base_kind(base)
    if kind is None:
        raise AdaptkitError(f"cannot wrap {type(base).__name__}: not an adaptable base")
    layer = _unpickle(type(base), kind)
    layer._adopt(base)
    return layer


def _unpickle(cls: type, kind: str) -> AdaptedLayer:
    """An empty instance of the wrapper class of ``cls`` (made once per base class). Also
    what pickle calls (``AdaptedLayer.__reduce_ex__``): the wrapper classes are made at run
    time, so pickle cannot find them by name, but it can find the base class."""
    if cls not in _WRAPPERS:
        # a quantised base (NF4) names the AdaptedLayer overrides its packed weight needs
        mixin = getattr(cls, "adaptkit_layer_mixin", None)
        _WRAPPERS[cls] = type(f"Adapted{cls.__name__}",
                              (AdaptedLayer, cls) if mixin is None else (mixin, AdaptedLayer, cls),
                              {"kind": kind, "_base_cls": cls,
                               "forward": AdaptedLayer.forward,
                               "extra_repr": AdaptedLayer.extra_repr,
                               "__module__": __name__})
    return _WRAPPERS[cls].__new__(_WRAPPERS[cls])


def weight_shape(m: nn.Module) -> list[int]:
    """Dense weight shape of a base or wrapped layer: ``weight.shape``, or (out, in) for a
    quantised Linear whose ``weight`` holds packed bytes (adaptkit.nf4.NF4Linear)."""
    w = m.weight
    return list(w.shape) if w.is_floating_point() else [m.out_features, m.in_features]


def adapted_layers(model: nn.Module):
    """(path, AdaptedLayer) pairs of ``model``."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, AdaptedLayer)]


class _Conv1D(nn.Module):
    """Stand-in for GPT-2's Conv1D, weight (in, out); ``base_kind`` knows it by its name."""

    def __init__(self, nf: int, nx: int, device=None):
        super().__init__()
        self.nf, self.weight = nf, nn.Parameter(torch.empty(nx, nf, device=device))


_Conv1D.__name__ = "Conv1D"


def stand_in(kind: str, shape, weight: torch.Tensor | None = None, prepare=None) -> AdaptedLayer:
    """A wrapped base of ``kind`` with weight ``shape`` and no model around it (a meta weight
    unless ``weight`` is given): enough for ``spec.build`` / ``delta_weight`` /
    ``merge_weight`` from a file's layer table (``ak.peft_compat``, the command line).
    ``prepare(module)`` runs before wrapping (``spec.prepare_base``: QLoRA quantises there).
    Conv geometry beyond the weight shape enters no delta."""
    s = tuple(shape)
    convs = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}
    if kind not in KINDS or len(s) < 2 or kind == "conv" and len(s) not in convs:
        raise AdaptkitError(f"unknown base kind {kind!r} with weight shape {list(s)}")
    m = {"linear": lambda: nn.Linear(s[1], s[0], bias=False, device="meta"),
         "conv1d_t": lambda: _Conv1D(s[1], s[0], device="meta"),
         "embedding": lambda: nn.Embedding(s[0], s[1], device="meta"),
         "conv": lambda: convs[len(s)](s[1], s[0], s[2:], bias=False, device="meta")}[kind]()
    if weight is not None:
        m.weight = nn.Parameter(weight, requires_grad=False)
    return wrap(prepare(m) if prepare else m)
