"""The adapted layer: a base module plus named adapters, and the Adapter protocol.

Module diagram (one wrapped ``nn.Linear``; the same for Conv / Embedding / GPT-2 Conv1D / NF4)::

        x ──► layer.base.forward (W, b) ──────────────────┐
        │                                                 ▼
        ├──► adapters["a"].update(x, y, layer) ─► y + Δ_a(x) ─► ... ─► y
        └──► adapters["b"] ...

The wrapper *is* an instance of the base class (a dynamic subclass, ``AdaptedLinear`` of
``nn.Linear`` etc.) and takes over the base's own ``weight`` / ``bias`` Parameters, so
``isinstance`` checks in user code still hold and the base state-dict keys are unchanged.
Adapter parameters live under ``<path>.adapters.<name>.<param>``. What depends on the kind
of base (its op, its weight's layout and storage) is asked of ``layer.base``, one
:class:`adaptkit.base.Base` per kind, which also keeps the original module for ``unwrap``.

An adapter implements :class:`Adapter`: ``update`` and ``delta_weight`` are required,
``delta_weight`` being the one source of truth that fast forward paths must agree with
(docs/ARCHITECTURE.md, "Invariants").
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn

from .base import BASES, KINDS, Base, base_for
from .errors import AdaptkitError

try:
    from torch.compiler import is_compiling
except ImportError:  # torch 2.2
    from torch._dynamo import is_compiling


def tracing() -> bool:
    """True while torch.compile traces the forward. Adapters then skip eager-only machinery
    that dynamo cannot trace without a graph break or a recompile: caches keyed on data
    pointers / versions, Python-side dicts filled on first use, custom autograd Functions
    with in-place outputs, and Python branches on tensor values."""
    return is_compiling()


def base_kind(m: nn.Module) -> str | None:
    """The kind of an adaptable base (see adaptkit/base.py), or None."""
    if isinstance(m, AdaptedLayer):
        return None if m.owns_adapters else m.kind
    b = base_for(m)
    return None if b is None else b.kind


class Adapter(nn.Module):
    """One named adapter on one layer. A method writes the first two; the rest have defaults.

    update(x, y, layer)        y plus this adapter's contribution to the output (y: the base
                               output, possibly holding other adapters' updates already)
    delta_weight(layer)        the dense update, fp32, in the base weight's native shape
    merge_weight(layer, w32)   the merged weight from an fp32 weight (default: w32 + delta)
    unmerge_weight(layer, w32) its inverse (default: w32 - delta; DoRA overrides both)
    attach(layer)              once, on joining the layer (residual inits change W here)
    layer_state() / load_layer_state(state, path)  per-layer JSON saved in the file (a rank)
    update_weight(w, layer)    on a "param" base, the weight its module sees (default: w + delta)
    base_forward(x, layer)     the base output, when ``fuses_base`` and first in the active set
    """

    merged: bool = False
    # True: when first in the active set, ``base_forward(x, layer)`` computes the base output
    # (DoRA pushes its A rows through the same GEMM as x; LoRA runs base and update as one
    # autograd node, methods/lora_fused.py)
    fuses_base: bool = False

    def update(self, x: torch.Tensor, y: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self, layer: AdaptedLayer) -> torch.Tensor:
        raise NotImplementedError

    def merge_weight(self, layer: AdaptedLayer, w32: torch.Tensor) -> torch.Tensor:
        return w32 + self.delta_weight(layer)

    def unmerge_weight(self, layer: AdaptedLayer, w32: torch.Tensor) -> torch.Tensor:
        return w32 - self.delta_weight(layer)

    def attach(self, layer: AdaptedLayer) -> None:
        pass

    def layer_state(self) -> dict[str, Any]:
        return {}

    def load_layer_state(self, state: dict[str, Any], path: str) -> None:
        pass

    def base_forward(self, x: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        return layer.base.forward(layer, x)

    def update_weight(self, w: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        """A "param" base (adaptkit/param_base.py): the weight its module's forward sees, from
        ``w`` (differentiable). Default: ``w + delta_weight``; LoRA folds it in one baddbmm."""
        return w + self.delta_weight(layer).to(w.dtype)


@runtime_checkable
class AdapterLayer(Protocol):
    """What adaptkit's free functions (inject, merge, io, combine) rely on in a layer that
    carries adapters: a mapping of :class:`Adapter` by name, its :class:`~adaptkit.base.Base`,
    and per-layer merge bookkeeping. :class:`AdaptedLayer` implements it."""

    adapters: Any
    base: Base

    def set_active(self, names: list[str]) -> None: ...
    def dense_weight(self, extra: list[str] | None = None) -> torch.Tensor: ...
    def merge(self, names: list[str] | None = None, check: bool = True) -> None: ...
    def unmerge(self) -> None: ...
    def unload(self, requantize: bool = False) -> nn.Module: ...


class AdaptedLayer(nn.Module):
    """Mixin of the wrapper classes (implements :class:`AdapterLayer`); see the module
    docstring. Everything that depends on the kind of base is asked of ``self.base``."""

    _base_cls: type
    base: Base
    adapters: MutableMapping[str, Adapter]  # an nn.ModuleDict at run time
    weight: torch.Tensor
    bias: torch.Tensor | None
    _active: tuple[Adapter, ...]
    _active_names: list[str]
    kind: str  # the Base's kind ("linear", "conv1d_t", "conv", "embedding")
    # True for a module that carries its own adapter (ak.MoRALinear): inject never wraps it
    # and the model's active set (ak.set_active, refresh) leaves its adapter alone
    owns_adapters: bool = False

    def _adopt(self, module: nn.Module, base: Base) -> None:
        nn.Module.__init__(self)
        for k, v in module.__dict__.items():  # in_features, stride, padding_idx, nf, ...
            if k not in self.__dict__ and not k.startswith("_") or k in ("_reversed_padding_repeated_twice",):
                self.__dict__[k] = v
        self.training = module.training
        self._parameters.update(module._parameters)  # same Parameter objects: keys unchanged
        self._buffers.update(module._buffers)
        self._modules.update(module._modules)
        if "bias" not in self._parameters:
            self.__dict__["bias"] = None  # Embedding: lets base ops / adapters say layer.bias
        self.adapters = nn.ModuleDict()  # type: ignore[assignment]
        self.__dict__["base"] = base  # holds the original module, outside the module tree
        self.__dict__["kind"] = base.kind  # a plain attribute: adapters read it on every call
        self.__dict__["_active"] = ()  # unmerged active adapters, in order
        self.__dict__["_active_names"] = []

    # ---- views through the base (the adapters' API) -------------------------------------
    @property
    def out_features(self) -> int:
        return self.base.features(self)[0]

    @property
    def in_features(self) -> int:
        """Fan-in of the 2D view: in (linear), in/groups*k (conv), vocab (embedding)."""
        return self.base.features(self)[1]

    @property
    def param_kw(self) -> dict[str, Any]:
        """device / dtype for adapter parameters (an NF4 base: its compute dtype)."""
        return self.base.param_kw(self)

    def base_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The frozen base computation with an arbitrary dense weight (dense reference)."""
        return self.base.op(self, x, weight, bias)

    def to_2d(self, w: torch.Tensor) -> torch.Tensor:
        """Native weight -> (out, in_flat) view."""
        return self.base.to_2d(w)

    def from_2d(self, d: torch.Tensor) -> torch.Tensor:
        """(out, in_flat) -> native weight shape."""
        return self.base.from_2d(d, self)

    # ---- forward ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self._active
        if act and act[0].fuses_base:
            y = act[0].base_forward(x, self)
        else:
            y = self.base.forward(self, x)
        for a in act:
            y = a.update(x, y, self)
        return y

    # ---- active set, merge / unmerge --------------------------------------------------
    def set_active(self, names: list[str]) -> None:
        self.__dict__["_active_names"] = list(names)
        self.__dict__["_active"] = tuple(
            self.adapters[n] for n in names if n in self.adapters and not self.adapters[n].merged
        )

    def dense_weight(self, extra: list[str] | None = None) -> torch.Tensor:
        """fp32 ``W + Σ delta`` of the named adapters (the dense reference)."""
        w = self.base.read(self)
        for n in extra or []:
            w = self.adapters[n].merge_weight(self, w)
        return w

    def merge(self, names: list[str] | None = None, check: bool = True) -> None:
        """Fold the named adapters (default: the active ones) into W, accumulating in fp32;
        NaN/inf refuses and changes nothing."""
        names = self._active_names if names is None else names
        todo = [n for n in names if n in self.adapters and not self.adapters[n].merged]
        if not todo:
            return
        w = self.dense_weight(todo)
        if check and not torch.isfinite(w).all():
            raise AdaptkitError(
                f"merge: adapters {todo} give a non-finite weight at this layer; "
                f"nothing was merged. Check the adapter weights for NaN/inf"
            )
        self.base.write(self, w)
        for n in todo:
            self.adapters[n].merged = True
        self.set_active(self._active_names)

    def unmerge(self) -> None:
        """Undo merges in reverse order (exact where the math allows, always for NF4)."""
        done = [n for n, a in self.adapters.items() if a.merged]
        if not done:
            return
        if not self.base.restore(self):
            w = self.base.read(self)
            for n in reversed(done):
                w = self.adapters[n].unmerge_weight(self, w)
            self.base.write(self, w)
        for n in done:
            self.adapters[n].merged = False
        self.set_active(self._active_names)

    def unload(self, requantize: bool = False) -> nn.Module:
        """The plain module ``ak.merge`` puts back (a quantised base: a dense layer, or with
        ``requantize`` a re-quantised one; see the Base)."""
        return self.base.unload(self, requantize)

    def unwrap(self) -> nn.Module:
        """The original module, holding this wrapper's (possibly merged) parameters."""
        return self.base.unwrap(self)

    def extra_repr(self) -> str:
        return f"{self._base_cls.__name__}: {self.base.module.extra_repr()}"

    def __reduce_ex__(self, protocol):
        # torch.save(model) / pickle: rebuild the run-time wrapper class from the base class
        return _unpickle, (self._base_cls,), self.__getstate__()


_WRAPPERS: dict[type, type[AdaptedLayer]] = {}


def wrap(module: nn.Module) -> AdaptedLayer:
    """Wrap ``module`` (no copy of its parameters); returns it if already wrapped."""
    if isinstance(module, AdaptedLayer):
        return module
    base = base_for(module)
    if base is None:
        raise AdaptkitError(f"cannot wrap {type(module).__name__}: not an adaptable base")
    layer = _unpickle(type(module))
    layer._adopt(module, base)
    return layer


def _unpickle(cls: type, *_) -> AdaptedLayer:
    """An empty instance of the wrapper class of ``cls`` (made once per base class). Also
    what pickle calls (``AdaptedLayer.__reduce_ex__``): the wrapper classes are made at run
    time, so pickle cannot find them by name, but it can find the base class."""
    if cls not in _WRAPPERS:
        _WRAPPERS[cls] = type(
            f"Adapted{cls.__name__}",
            (AdaptedLayer, cls),
            {
                "_base_cls": cls,
                "forward": AdaptedLayer.forward,
                "extra_repr": AdaptedLayer.extra_repr,
                "__module__": __name__,
            },
        )
    wrapper = _WRAPPERS[cls]
    return wrapper.__new__(wrapper)


def weight_shape(m: nn.Module) -> list[int]:
    """Dense weight shape of a base or wrapped layer: ``weight.shape``, or (out, in) for a
    quantised Linear whose ``weight`` holds packed bytes (adaptkit.nf4.NF4Linear)."""
    lin: Any = m  # a Linear-like module; nn.Module attributes are untyped
    w = lin.weight
    return list(w.shape) if w.is_floating_point() else [lin.out_features, lin.in_features]


def adapted_layers(model: nn.Module) -> list[tuple[str, AdaptedLayer]]:
    """(path, AdaptedLayer) pairs of ``model``."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, AdaptedLayer)]


def stand_in(kind: str, shape, weight: torch.Tensor | None = None, prepare=None) -> AdaptedLayer:
    """A wrapped base of ``kind`` with weight ``shape`` and no model around it (a meta weight
    unless ``weight`` is given): enough for ``spec.build`` / ``delta_weight`` /
    ``merge_weight`` from a file's layer table (``ak.peft_compat``, the command line).
    ``prepare(module)`` runs before wrapping (``spec.prepare_base``: QLoRA quantises there).
    Conv geometry beyond the weight shape enters no delta."""
    s = tuple(shape)
    cls = next((b for b in BASES if b.kind == kind), None)
    dims = {"conv": (3, 4, 5), "param": (2, 3)}.get(kind, (2,))
    if cls is None or len(s) not in dims:
        raise AdaptkitError(f"unknown base kind {kind!r} with weight shape {list(s)}; kinds: {list(KINDS)}")
    m = cls.stand_in(s)
    if weight is not None:
        m.weight = nn.Parameter(weight, requires_grad=False)
    return wrap(prepare(m) if prepare else m)


def stand_in_adapter(spec, entry: dict, path: str, weight: torch.Tensor | None, tensors: dict | None, where: str = ""):
    """A stand-in layer for one entry of a file's layer table (kind, shape, state) holding
    ``weight``, with ``spec``'s adapter built on it and its layer state restored, as ``ak.load``
    does; the file's ``tensors`` (None: not checked) must hold every parameter it needs. Returns (layer, adapter,
    {parameter name: file key}); attaching and loading the tensors is the caller's."""
    layer = stand_in(entry["kind"], entry["shape"], weight, lambda m: spec.prepare_base(m, path))
    a = spec.build(layer, path)
    a.load_layer_state(entry.get("state", {}), path)
    keys = {k: f"{path}.{k}" for k in a.state_dict()}
    missing = sorted(q for q in keys.values() if tensors is not None and q not in tensors)
    if missing:
        raise AdaptkitError(f"{where}the adapter lacks {missing} for '{path}'")
    return layer, a, keys
