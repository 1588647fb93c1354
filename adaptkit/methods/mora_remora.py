r"""ReMoRA: MoRA's merge-and-reset schedule (Jiang et al., 2024, arXiv 2405.12130, §3;
reference ``train.py::ResetReloraCallback``).

Every ``merge_every`` optimizer steps, on every MoRA module (``MoRALinear`` and active
``MoRA`` adapters): W ← W + ΔW with ΔW = D·M·C (out, in) accumulated in fp32 and cast back
to W's dtype, M (r̂, r̂) ← 0, the type cycles {1→2→1} (cycle=2) or {1→2→3→4→1} (cycle=4)
so successive updates use different compressions and the merged sum exceeds rank r̂, and
the optimizer state of M (or all of it) is dropped. The model's function is unchanged by
a merge-and-reset. The LR warmup restart of the reference is left to the user's scheduler.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import AdaptkitError
from ..layer import AdaptedLayer, adapted_layers
from .mora import MoRA, MoRAAdapter, check_type

CYCLES = {1: {}, 2: {1: 2, 2: 1}, 4: {1: 2, 2: 3, 3: 4, 4: 1}}  # ReMoRA type maps
RESETS = ("adapter", "all", "none")


def mora_modules(model: nn.Module, names=None) -> list[tuple[str, AdaptedLayer, MoRAAdapter]]:
    """(path, layer, MoRA adapter) of every MoRALinear and every MoRA adapter of ``names``
    (default: the active adapters) in ``model``; a MoRALinear's path is its own."""
    out = []
    for p, layer in adapted_layers(model):
        own = layer.owns_adapters
        for n in layer._active_names if names is None or own else names:
            a = layer.adapters[n] if n in layer.adapters else None
            if isinstance(a, MoRAAdapter):
                out.append((p if own else f"{p}[{n}]", layer, a))
    return out


@torch.no_grad()
def merge_and_reset_mora_linear(
    model: nn.Module, cycle: int = 1, optimizer=None, reset_optimizer: str = "adapter", names=None
) -> list[str]:
    """One ReMoRA step on every MoRA module: W += ΔW (fp32, cast back to W's dtype; an
    already-merged adapter just keeps its update), M = 0, type ← CYCLES[cycle][type], and
    the optimizer state of M ("adapter") or all state ("all") dropped. Returns the paths."""
    mods = _targets(model, cycle, reset_optimizer, names)
    bad = [p for p, _, m in mods if not torch.isfinite(m.mora_M).all()]
    if bad:
        raise AdaptkitError(f"ReMoRA: non-finite mora_M at {bad}; nothing was merged")
    for _, layer, m in mods:
        if m.merged:  # the base keeps the update; M restarts from 0
            m.merged = False
            layer.set_active(layer._active_names)
        else:
            layer.base.write(layer, m.merge_weight(layer, layer.base.read(layer)))
        m.reset(CYCLES[cycle].get(m.mora_type))
        if optimizer is not None and reset_optimizer == "adapter":
            optimizer.state.pop(m.mora_M, None)
    if optimizer is not None and reset_optimizer == "all":
        optimizer.state.clear()
    return [p for p, _, _ in mods]


def _targets(model, cycle, reset_optimizer, names):
    if cycle not in CYCLES:
        raise AdaptkitError(
            f"ReMoRA: cycle={cycle!r} is not one of {sorted(CYCLES)} (1: keep the type, 2: 1<->2, 4: 1->2->3->4->1)"
        )
    if reset_optimizer not in RESETS:
        raise AdaptkitError(f"ReMoRA: reset_optimizer={reset_optimizer!r} is not one of {RESETS}")
    mods = mora_modules(model, names)
    if not mods:
        raise AdaptkitError(
            "ReMoRA: the model has no MoRALinear and no active MoRA adapter; "
            "use ak.inject(model, ak.MoRA(...)) or apply_mora_linear(model) first"
        )
    off = [f"{p} (type {m.mora_type!r})" for p, _, m in mods if cycle != 1 and m.mora_type not in CYCLES[cycle]]
    if off:
        raise AdaptkitError(
            f"ReMoRA: cycle={cycle} maps types {sorted(CYCLES[cycle])} only, but "
            f"{off[:4]} use another type; use cycle=1 (keep the type)"
        )
    return mods


def update_model_mora_linear(
    model: nn.Module, optimizer, step: int, merge_every: int, cycle: int = 2, reset_optimizer: str = "adapter"
) -> bool:
    """Stateless ReMoRA: merge-and-reset when ``step`` (> 0) is a multiple of ``merge_every``."""
    if step > 0 and step % merge_every == 0:
        merge_and_reset_mora_linear(model, cycle, optimizer, reset_optimizer)
        return True
    return False


class ReMoRA:
    """Periodic merge-and-reset, called once per optimizer step::

        remora = ReMoRA(model, opt, merge_every=2000, cycle=2)
        for batch in data: loss(model, batch).backward(); opt.step(); opt.zero_grad(); remora.step()

    ``merge_every`` defaults to the MoRA spec's (or the MoRALinear's) ``merge_every``.
    ``state_dict()`` / ``load_state_dict()`` keep the step count and current types so a
    resumed run interprets the saved M with the right type."""

    def __init__(
        self,
        model: nn.Module,
        optimizer=None,
        merge_every: int | None = None,
        cycle: int = 2,
        reset_optimizer: str = "adapter",
        names=None,
    ):
        self.model, self.optimizer, self.cycle, self.names = model, optimizer, cycle, names
        self.reset_optimizer, self.steps = reset_optimizer, 0
        mods = _targets(model, cycle, reset_optimizer, names)
        if merge_every is None:
            specs = getattr(model.__dict__.get("_adaptkit"), "specs", {})
            found = {s.merge_every for s in specs.values() if isinstance(s, MoRA)}
            found |= {l.merge_every for _, l, _ in mods if l.owns_adapters}
            found.discard(None)
            merge_every = found.pop() if len(found) == 1 else merge_every
        if isinstance(merge_every, bool) or not isinstance(merge_every, int) or merge_every < 1:
            raise AdaptkitError(
                f"ReMoRA: merge_every={merge_every!r} must be a positive int (the "
                f"specs give none or several); pass e.g. merge_every=2000"
            )
        self.merge_every = merge_every

    def step(self) -> bool:
        """Count one step; merge-and-reset every ``merge_every`` steps (returns True then)."""
        self.steps += 1
        return update_model_mora_linear(
            self.model, self.optimizer, self.steps, self.merge_every, self.cycle, self.reset_optimizer
        )

    def state_dict(self) -> dict:
        return {"steps": self.steps, "types": {p: m.mora_type for p, _, m in mora_modules(self.model, self.names)}}

    def load_state_dict(self, sd: dict) -> None:
        mods = {p: m for p, _, m in mora_modules(self.model, self.names)}
        if set(sd.get("types", {})) != set(mods):
            raise AdaptkitError(
                f"ReMoRA.load_state_dict: paths {sorted(sd.get('types', {}))} do "
                f"not match the model's MoRA modules {sorted(mods)}"
            )
        for p, t in sd["types"].items():
            check_type("ReMoRA", t, mods[p].r_hat, f" at '{p}'")
            mods[p].mora_type = t
        self.steps = int(sd["steps"])
