"""The "param" base kind: adapters on an ``nn.Parameter`` that its module uses directly.

transformers 5.x keeps MoE experts as 3-D Parameters of a module that is not a Linear
(``MixtralExperts.gate_up_proj`` (experts, 2*inter, hidden), ``down_proj`` (experts,
hidden, inter), both used as ``F.linear(x, W[e])``, so (experts, out, in)). Such a
parameter is selected by ``target_parameters`` (a regex over ``<module path>.<param name>``)
and gets a :class:`ParamLayer`, an :class:`~adaptkit.layer.AdaptedLayer` whose Base is
:class:`ParamBase`, so merge / unmerge / dense_weight / save / load stay the generic ones::

    W  (out, in)  or  (E, out, in)        2-D / 3-D; an owner with ``is_transposed = True``
                                          stores 3-D as (E, in, out) (view: W^T per expert)
    adapters see (*lead, out, in):  lead = () or (E,), one adapter per expert

Placement (``ParamLayer.place``): the owner module keeps its Parameter (state-dict key
unchanged) and its class is swapped in place for a run-time subclass ``Hosted<Cls>`` whose
``forward`` presents the adapted weight to the owner's own forward: for the duration of the
call ``owner._parameters[name]`` holds ``ParamLayer.present()`` = W + the active adapters'
updates (``Adapter.update_weight``; LoRA: one ``baddbmm`` over all experts), then the
Parameter is put back. The ParamLayer itself sits in ``owner._modules[name]`` (module
lookup finds the Parameter first), so its path is the parameter path and adapter keys read
``<param path>.adapters.<name>.lora_A``.

Cost (docs/ARCHITECTURE.md, "Parameter bases"): in the dense form each forward builds one
adapted weight the size of the parameter (the whole expert stack) and training
back-propagates a dense gradient of that size through it before it reaches the low-rank
factors: the price of not owning the forward. A single eager LoRA avoids it by presenting a
factored weight (``LowRankWeight`` in methods/lora_param.py) whose expert GEMMs run
``W x + s B (A x)``; anything else takes the dense form.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn as nn

from .base import Base, register_base
from .errors import AdaptkitError
from .layer import AdaptedLayer, base_kind


@register_base
class ParamBase(Base):
    """One Parameter ``name`` of ``module`` (the owner); never chosen by ``base_for``."""

    kind = "param"

    def __init__(self, module: nn.Module, name: str = "weight", transposed: bool = False):
        super().__init__(module)
        self.name, self.transposed = name, transposed

    @classmethod
    def accepts(cls, m):
        return False

    def lead(self, layer) -> tuple[int, ...]:
        return tuple(layer.weight.shape[:-2])

    def features(self, layer):
        d1, d2 = layer.weight.shape[-2:]
        return (d2, d1) if self.transposed else (d1, d2)

    def to_2d(self, w):
        return w.transpose(-1, -2) if self.transposed else w  # (*lead, d1, d2) -> (*lead, out, in)

    def from_2d(self, d, layer):
        return d.transpose(-1, -2) if self.transposed else d  # (*lead, out, in) -> native

    def op(self, layer, x, weight, bias):
        raise AdaptkitError(
            f"'{self.name}' of {type(self.module).__name__} is used by its module's own forward; "
            f"there is no per-parameter op (run the module)"
        )

    def forward(self, layer, x):
        return self.op(layer, x, None, None)

    def unwrap(self, layer) -> None:  # type: ignore[override]  # nothing to put back
        """Take the layer out of its owner (the owner keeps its, possibly merged, Parameter);
        None: nothing is put back at the parameter path."""
        layer.release()

    def unload(self, layer, requantize: bool = False) -> None:  # type: ignore[override]
        return self.unwrap(layer)

    @classmethod
    def stand_in(cls, shape):
        owner = nn.Module()
        owner.weight = nn.Parameter(torch.empty(*shape, device="meta"))
        return ParamLayer(owner, "weight")


def _owner_class(m: nn.Module) -> type:
    return getattr(type(m), "_ak_orig", type(m))


class ParamLayer(AdaptedLayer):
    """The adapted layer of one Parameter (see the module docstring). ``weight`` is the
    owner's Parameter object itself; it is skipped in this layer's state dict (the owner
    saves it under its own key)."""

    base: ParamBase

    def __init__(self, owner: nn.Module, name: str):
        nn.Module.__init__(self)
        w = cast(nn.Parameter, owner._parameters[name])
        self._parameters["weight"] = w
        self.training = owner.training
        self.adapters = nn.ModuleDict()  # type: ignore[assignment]
        transposed = w.dim() == 3 and getattr(owner, "is_transposed", False) is True
        self.__dict__.update(
            bias=None,
            base=ParamBase(owner, name, transposed),
            kind="param",
            _active=(),
            _active_names=[],
            _base_cls=_owner_class(owner),
        )

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        pass  # the weight is the owner's; adapters are sub-modules

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        pass

    def present(self) -> torch.Tensor:
        """The weight the owner's forward sees: W and each active adapter's update."""
        w = cast(torch.Tensor, self._parameters["weight"])
        for a in self._active:
            w = a.update_weight(w, self)
        return w

    def forward(self) -> torch.Tensor:  # type: ignore[override]  # the owner calls present()
        return self.present()

    # ---- placement --------------------------------------------------------------------
    def place(self) -> None:
        """Host the owner (class swap, once) and register this layer under the parameter's name."""
        owner, name = self.base.module, self.base.name
        if owner._modules.get(name) is self:
            return
        if not hasattr(type(owner), "_ak_orig"):
            owner.__class__ = _hosted(type(owner))
            owner.__dict__["_ak_params"] = []
        owner._modules[name] = self  # Module.__getattr__ finds the Parameter first
        owner.__dict__["_ak_params"].append(name)

    def release(self) -> None:
        owner, name = self.base.module, self.base.name
        if owner._modules.get(name) is not self:
            return
        del owner._modules[name]
        owner.__dict__["_ak_params"].remove(name)
        if not owner.__dict__["_ak_params"]:
            del owner.__dict__["_ak_params"]
            owner.__class__ = cast(Any, type(owner))._ak_orig

    def extra_repr(self) -> str:
        return f"{self._base_cls.__name__}.{self.base.name}: {list(self.weight.shape)}"

    def __reduce_ex__(self, protocol):
        return nn.Module.__reduce_ex__(self, protocol)


def _host_forward(self, *args, **kwargs):
    """The owner's forward with each adapted Parameter replaced by its adapted weight; under
    ``ak.route`` one such call per adapter group (``_ak_route``, adaptkit/route.py)."""
    routed = self.__dict__.get("_ak_route")
    if routed is not None:
        return routed(self, _host_call, args, kwargs)
    return _host_call(self, *args, **kwargs)


def _host_call(self, *args, **kwargs):
    p, mods, swapped = self._parameters, self._modules, []
    for name in self.__dict__["_ak_params"]:
        layer = mods[name]
        if layer._active:
            swapped.append((name, p[name]))
            p[name] = layer.present()
    try:
        return type(self)._ak_orig.forward(self, *args, **kwargs)
    finally:
        for name, w in swapped:
            p[name] = w


def _rehost(cls: type) -> nn.Module:
    host = _hosted(cls)
    return host.__new__(host)


def _reduce(self, protocol):
    # pickle cannot find the run-time class by name; it can find the owner's class
    return _rehost, (type(self)._ak_orig,), self.__getstate__()


_HOSTS: dict[type, type[nn.Module]] = {}


def _hosted(cls: type) -> type[nn.Module]:
    if cls not in _HOSTS:
        _HOSTS[cls] = type(
            f"Hosted{cls.__name__}",
            (cls,),
            {"forward": _host_forward, "_ak_orig": cls, "__reduce_ex__": _reduce, "__module__": __name__},
        )
    return _HOSTS[cls]


# ---- finding parameter paths ------------------------------------------------------------
def module_at(model: nn.Module, path: str) -> nn.Module | None:
    """The module at ``path`` through ``_modules`` (``get_submodule`` would stop at a hosted
    parameter's name, which resolves to the Parameter), or None."""
    m = model
    for seg in path.split(".") if path else ():
        nxt = m._modules.get(seg)
        if nxt is None:
            return None
        m = nxt
    return m


def param_problem(model: nn.Module, path: str) -> str | None:
    """Why the Parameter at ``path`` cannot be adapted, or None."""
    mpath, _, name = path.rpartition(".")
    owner = module_at(model, mpath)
    w = None if owner is None else owner._parameters.get(name)
    if owner is None or w is None:
        return f"no parameter at '{path}'"
    if isinstance(owner, AdaptedLayer) or base_kind(owner) is not None:
        return (
            f"'{path}' belongs to the {type(owner).__name__} module '{mpath}', which adaptkit adapts as a "
            f"module; select it with targets (not target_parameters)"
        )
    if not mpath:
        return f"'{path}' is a parameter of the root module, which cannot be hosted; wrap the model in a module"
    if w.dim() not in (2, 3) or not w.is_floating_point():
        return (
            f"'{path}' is a {w.dim()}-D {w.dtype} parameter {list(w.shape)}; target_parameters adapts 2-D (out, in) "
            f"and 3-D (experts, out, in) float parameters; narrow the pattern"
        )
    return None


def find(model: nn.Module, path: str) -> nn.Module | None:
    """The module at ``path``; for a parameter path, its ParamLayer (the placed one, or a new
    unplaced one: nothing in the model changes). None if neither; refuses a parameter that
    cannot be adapted."""
    m = module_at(model, path)
    if m is not None or "." not in path:
        return m
    mpath, _, name = path.rpartition(".")
    owner = module_at(model, mpath)
    if owner is None or name not in owner._parameters:
        return None
    bad = param_problem(model, path)
    if bad:
        raise AdaptkitError(bad)
    return ParamLayer(owner, name)


def select_params(model: nn.Module, spec) -> list[str]:
    """Parameter paths ``spec.target_parameters`` selects (after ``exclude`` and
    ``layers_to_transform``), in ``named_modules()`` then registration order."""
    from .targets import layer_index, matches

    pats, out, seen = spec.target_parameters, [], cast(list[str], [])
    for mpath, m in model.named_modules():
        if any(mpath.startswith(q) for q in seen):
            continue
        if isinstance(m, AdaptedLayer):
            seen.append(mpath + ".adapters.")
        if isinstance(m, ParamLayer):
            continue
        for name, w in m._parameters.items():
            path = f"{mpath}.{name}" if mpath else name
            if w is None or not matches(pats, path) or matches(spec.exclude, path):
                continue
            if spec.layers_to_transform is not None:
                if layer_index(path, spec.layers_pattern) not in spec.layers_to_transform:
                    continue
            out.append(path)
    if not out:
        shown = [n for n, w in model.named_parameters() if w.dim() in (2, 3) and ".adapters." not in n][:6]
        raise AdaptkitError(
            f"{type(spec).__name__}: target_parameters={list(pats)} matched no parameter; patterns are "
            f"re.fullmatch-ed against '<module path>.<param name>' paths such as {shown}; "
            f'use e.g. target_parameters=r".*\\.experts\\.down_proj"'
        )
    return out
