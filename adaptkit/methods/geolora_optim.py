"""GeoLoRAOptimizer: the GeoLoRA integrator (arXiv 2410.18720, Alg. 1, with the reference
code's coefficient-step schedule) as an ordinary torch optimizer.

    opt = ak.GeoLoRAOptimizer(model, lr=1e-3, coeff_steps=10)
    for x, y in data:
        loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()

Step ``t`` (counted by the optimizer), with ``c = coeff_steps`` and λ = lr:

* ``t mod (c+1) == 0``: **augmentation** on every GeoLoRA layer: new basis columns from
  QR([U | G_K]) and QR([V | G_L]), and the augmented coefficients
  ``Ŝ = [[S - λ G_S, -λ G_L^T V̄], [-λ Ū^T G_K, 0]]`` (rank r -> min(2r, r_max));
* otherwise a **coefficient-only step** on S with the bases frozen: AdamW (the reference,
  where S belongs to the model's AdamW) or plain SGD (``coeff_optimizer="sgd"``);
* ``t mod (c+1) == truncate_at`` (default c, the GLUE schedule; ``int(3 * c / 4)`` is the
  ViT one): **truncation**: SVD Ŝ = P diag(σ) Q^T, keep r_new columns (rule per the spec's
  ``truncation``: "local_threshold" = first j with ||σ[j:]|| < tau ||σ||, "fixed_rank" = the
  initial rank, "global_budget" = the ``budget`` largest σ over all layers of the adapter),
  clamped to [min_rank, r]; U <- Û P_r, V <- V̂ Q_r, S <- diag(σ_r).

``c = 0`` augments and truncates every step (pure Alg. 1). Every other trainable parameter
(heads, biases, other adapters) is updated every step by a wrapped standard optimizer
(AdamW by default), so one object drives the whole model.

S optimizer state: as the reference, elementwise AdamW moments over the fixed
(r_max, r_max) buffer, neither rotated nor reset when the bases change. With
``rotate_moments=True`` a truncation rotates the first moment into the new coordinates
(m <- P_r^T m Q_r) and resets the second (with its bias-correction count). The paper does
not pin this down.

``param_groups[0]`` is the GeoLoRA group (its ``lr`` is λ); the wrapped optimizer's groups
follow (the same dict objects), so torch LR schedulers drive both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn as nn

from ..errors import AdaptkitError
from ..layer import adapted_layers
from .geolora import GeoLoRAAdapter, budget_ranks, threshold_rank


class GeoLoRAOptimizer(torch.optim.Optimizer):
    """Trains a model carrying active ``ak.GeoLoRA`` adapters; see the module docstring.

    model:           the model (every trainable parameter is optimised).
    lr:              λ of the integrator and of the S steps; also the wrapped optimizer's lr.
    coeff_steps:     c, coefficient-only steps between augmentations (0: pure Alg. 1).
    truncate_at:     phase of the cycle at which to truncate, 0..c (None: c).
    coeff_optimizer: "adamw" (reference) or "sgd" for the coefficient-only steps.
    betas, eps, weight_decay: AdamW settings of the S steps and of the default wrapped AdamW.
    rotate_moments:  rotate S's first moment and reset its second on truncation.
    optimizer:       class (or factory ``f(params, lr=..., **kw)``) for the other parameters.
    optimizer_kwargs: keyword arguments for it (default: lr and the betas / eps / weight_decay
                     above); an ``lr`` here gives the other parameters their own rate.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        *,
        coeff_steps: int = 0,
        truncate_at: int | None = None,
        coeff_optimizer: str = "adamw",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        rotate_moments: bool = False,
        optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
        optimizer_kwargs: dict[str, Any] | None = None,
    ):
        me = "GeoLoRAOptimizer"
        if not isinstance(model, nn.Module):
            raise AdaptkitError(
                f"{me}: expected the model (an nn.Module), got {type(model).__name__}; "
                f"pass the model itself, not model.parameters()"
            )
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr)):
            raise AdaptkitError(f"{me}: lr={lr!r} must be a finite number > 0; use e.g. lr=1e-3")
        if isinstance(coeff_steps, bool) or not isinstance(coeff_steps, int) or coeff_steps < 0:
            raise AdaptkitError(
                f"{me}: coeff_steps={coeff_steps!r} must be an int >= 0 (0 = pure "
                f"Alg. 1; the reference GLUE runs use 30)"
            )
        truncate_at = coeff_steps if truncate_at is None else truncate_at
        if isinstance(truncate_at, bool) or not isinstance(truncate_at, int) or not 0 <= truncate_at <= coeff_steps:
            raise AdaptkitError(
                f"{me}: truncate_at={truncate_at!r} must be an int in [0, coeff_steps="
                f"{coeff_steps}]; use None (= coeff_steps) or int(3 * coeff_steps / 4)"
            )
        if coeff_optimizer not in ("adamw", "sgd"):
            raise AdaptkitError(f"{me}: coeff_optimizer={coeff_optimizer!r} is not 'adamw' or 'sgd'")
        geo: list[tuple[str, str, GeoLoRAAdapter]] = []
        inactive: list[tuple[str, str, GeoLoRAAdapter]] = []
        for path, layer in adapted_layers(model):
            for name, a in layer.adapters.items():
                if isinstance(a, GeoLoRAAdapter):
                    (geo if a.U.requires_grad else inactive).append((path, name, a))
        if not geo:
            hint = (
                f"its GeoLoRA adapter(s) {sorted({n for _, n, _ in inactive})} are inactive: "
                f"ak.set_active(model, [...]) first"
                if inactive
                else "inject one first: ak.inject(model, ak.GeoLoRA(rank=8, tau=0.15, targets=...)), "
                "or use a standard torch optimizer for other methods"
            )
            raise AdaptkitError(
                f"{me}: the model has no trainable GeoLoRA layer (got "
                f"{type(model).__name__} with {len(adapted_layers(model))} adapted "
                f"layers); {hint}"
            )
        self._geo = geo
        self.coeff_steps, self.truncate_at = coeff_steps, truncate_at
        self.coeff_optimizer, self.rotate_moments = coeff_optimizer, bool(rotate_moments)
        self._t = 0
        geo_params = [p for _, _, a in geo for p in (a.U, a.S, a.V)]
        super().__init__(geo_params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.param_groups[0]["name"] = "geolora"
        ids = {id(p) for p in geo_params}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        kw = dict(optimizer_kwargs or {})
        if optimizer in (torch.optim.AdamW, torch.optim.Adam) and optimizer_kwargs is None:
            kw = dict(betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        self.inner = optimizer(others, **({"lr": lr} | kw)) if others else None
        if self.inner is not None:  # same dicts: schedulers and zero_grad see every group
            self.param_groups.extend(self.inner.param_groups)

    # ---- introspection -------------------------------------------------------------------
    def layers(self) -> list[tuple[str, str, GeoLoRAAdapter]]:
        """(module path, adapter name, adapter) of every GeoLoRA layer this optimizer drives."""
        return list(self._geo)

    def ranks(self) -> dict[str, int]:
        """Active rank per layer: ``{path: rank}`` (``{"name/path": rank}`` when several
        GeoLoRA adapters are trained together)."""
        multi = len({n for _, n, _ in self._geo}) > 1
        return {(f"{n}/{p}" if multi else p): a.rank for p, n, a in self._geo}

    def num_params(self) -> int:
        """GeoLoRA parameters at the active ranks, sum of r (in + out) + r^2."""
        return sum(a.num_params() for _, _, a in self._geo)

    # ---- the step ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        merged = [p for p, _, a in self._geo if a.merged]
        if merged:
            raise AdaptkitError(
                f"GeoLoRAOptimizer: the adapter is merged at {merged[:3]}; training a "
                f"merged adapter would double-count it. Unmerge first (ak.merge with "
                f"unload=False is undone by adaptkit.merge.unmerge)"
            )
        if self.inner is not None:
            self.inner.step()
        group = self.param_groups[0]
        phase = self._t % (self.coeff_steps + 1)
        for _, _, a in self._geo:
            if phase == 0:
                a.augment(group["lr"])
            elif a.S.grad is not None:
                if self.coeff_optimizer == "sgd":
                    a.S.sub_(group["lr"] * a.S.grad)
                else:
                    self._adamw(a.S, group)
        if phase == self.truncate_at:
            self.truncate()
        self._t += 1
        return loss

    def _adamw(self, p: torch.Tensor, group: dict) -> None:
        """One AdamW step on S over its whole (r_max, r_max) buffer (elementwise state, as
        the reference's AdamW); two step counts so a reset second moment is bias-corrected
        from its own restart."""
        st = self.state[p]
        if not st:
            st["step"], st["step_sq"] = 0, 0
            st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        b1, b2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        st["step"] += 1
        st["step_sq"] += 1
        g = cast(torch.Tensor, p.grad).float()  # params without a grad were skipped above
        m, v = st["exp_avg"], st["exp_avg_sq"]
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v / (1 - b2 ** st["step_sq"])).sqrt_().add_(eps)
        w = p.float().mul_(1 - lr * wd).addcdiv_(m, denom, value=-lr / (1 - b1 ** st["step"]))
        p.copy_(w)

    @torch.no_grad()
    def truncate(self) -> None:
        """Truncate every layer now (the schedule calls this at ``truncate_at``). Call it once
        after training that stopped mid-cycle to drop the augmented directions the rule does not
        keep, so the saved adapter has the truncated ranks."""
        svds = [a.svd() for _, _, a in self._geo]
        targets: list[int] = [0] * len(self._geo)
        budget_groups: dict[str, list[int]] = {}
        for i, (_, name, a) in enumerate(self._geo):
            if a.truncation == "local_threshold":
                targets[i] = threshold_rank(svds[i][1], a.tau)
            elif a.truncation == "fixed_rank":
                targets[i] = a.init_rank
            else:
                budget_groups.setdefault(name, []).append(i)
        for idx in budget_groups.values():
            counts = budget_ranks([svds[i][1] for i in idx], cast(int, self._geo[idx[0]][2].budget))  # set: "budget"
            for i, k in zip(idx, counts):
                targets[i] = k
        for i, (_, _, a) in enumerate(self._geo):
            P, sig, Q = svds[i]
            r_new = a.clamp_rank(targets[i])
            st = self.state.get(a.S)
            if self.rotate_moments and st:
                r = a.rank
                m = P[:, :r_new].t() @ st["exp_avg"][:r, :r] @ Q[:, :r_new]  # (r_new, r_new)
                st["exp_avg"].zero_()
                st["exp_avg"][:r_new, :r_new] = m
                st["exp_avg_sq"].zero_()
                st["step_sq"] = 0
            a.truncate(r_new, P, sig, Q)

    # ---- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """{"geolora": S moments by parameter index, the group's settings and the step
        count; "inner": the wrapped optimizer's state dict}. Ranks live in the model's
        state dict (and adapter file), not here."""
        params = self.param_groups[0]["params"]
        index = {id(p): i for i, p in enumerate(params)}
        return {
            "geolora": {
                "t": self._t,
                "coeff_steps": self.coeff_steps,
                "truncate_at": self.truncate_at,
                "group": {k: v for k, v in self.param_groups[0].items() if k != "params"},
                "state": {index[id(p)]: dict(s) for p, s in self.state.items() if s},
            },
            "inner": None if self.inner is None else self.inner.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or set(state_dict) != {"geolora", "inner"}:
            raise AdaptkitError(
                "GeoLoRAOptimizer.load_state_dict: expected the dict written by "
                "GeoLoRAOptimizer.state_dict() (keys 'geolora', 'inner')"
            )
        geo, params = state_dict["geolora"], self.param_groups[0]["params"]
        bad = [i for i in geo["state"] if not 0 <= int(i) < len(params)]
        if bad or (state_dict["inner"] is None) != (self.inner is None):
            raise AdaptkitError(
                f"GeoLoRAOptimizer.load_state_dict: the checkpoint was written for "
                f"another model (parameter indices {bad[:5]}, wrapped optimizer "
                f"{'absent' if state_dict['inner'] is None else 'present'} there); "
                f"build the optimizer on the same model"
            )
        self._t = int(geo["t"])
        self.param_groups[0].update(geo["group"])
        self.state.clear()
        for i, s in geo["state"].items():
            p = params[int(i)]
            self.state[p] = {k: (v.to(p.device).clone() if torch.is_tensor(v) else v) for k, v in s.items()}
        if self.inner is not None:
            self.inner.load_state_dict(state_dict["inner"])
