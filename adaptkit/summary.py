"""``ak.summary``: trainable / total parameters, per adapter and per layer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .inject import check_model, state
from .layer import adapted_layers, weight_shape


@dataclass
class Summary:
    trainable: int
    total: int
    per_adapter: dict[str, dict]
    per_layer: list[tuple[str, str, str, int]]  # (path, adapter, method, params)

    def __str__(self) -> str:
        table = [("layer", "adapter", "method", "params")]
        table += [(p, a, m, f"{n:,d}") for p, a, m, n in self.per_layer]
        w = [max(len(r[i]) for r in table) for i in range(4)]
        rows = [f"{p:{w[0]}s} {a:{w[1]}s} {m:{w[2]}s} {n:>{w[3]}s}" for p, a, m, n in table]
        for a, d in self.per_adapter.items():
            k = d.get("merged_layers", 0)
            status = ["active"] * bool(d["active"]) + (
                ["merged"] if k and k == d["layers"] else [f"merged in {k}/{d['layers']} layers"] * bool(k)
            )
            rows.append(
                f"adapter {a!r}: {d['method']}, {d['layers']} layers, {d['params']:,} params"
                + (f" ({', '.join(status)})" if status else "")
            )
        rows.append(
            f"trainable {self.trainable:,} / total {self.total:,} ({100 * self.trainable / max(self.total, 1):.3f}%)"
        )
        return "\n".join(rows)

    __repr__ = __str__


def summary(model: nn.Module) -> Summary:
    """Trainable / total parameters, per adapter and per layer. A quantised (NF4) weight is
    a buffer of packed bytes; it counts as its out x in parameters, as in the float model."""
    check_model(model, "summary")
    st = state(model)
    per_layer = []
    # merged: folded into the base weights by ak.merge(model, unload=False) (on every layer
    # that carries it; merged_layers counts them, as layer.merge can fold a single layer)
    per_adapter: dict[str, dict[str, Any]] = {
        n: {"method": s.method, "layers": 0, "params": 0, "active": n in st.active, "merged": False, "merged_layers": 0}
        for n, s in st.specs.items()
    }
    for path, layer in adapted_layers(model):
        for n, a in layer.adapters.items():
            if n not in st.specs:  # a module's own adapter (ak.MoRALinear)
                continue
            k = sum(p.numel() for p in a.parameters())
            per_layer.append((path, n, st.specs[n].method, k))
            per_adapter[n]["layers"] += 1
            per_adapter[n]["params"] += k
            per_adapter[n]["merged_layers"] += bool(a.merged)
    for d in per_adapter.values():
        d["merged"] = d["layers"] > 0 and d["merged_layers"] == d["layers"]
    quant = [
        m
        for m in model.modules()
        if isinstance(w := getattr(m, "weight", None), torch.Tensor) and not w.is_floating_point()
    ]
    # their packed bytes and scales are frozen Parameters (so FSDP2 shards them): not counted
    skip = {id(p) for m in quant for k, p in m.named_parameters(recurse=False) if k != "bias"}
    params = [p for p in model.parameters() if id(p) not in skip]
    packed = sum(math.prod(weight_shape(m)) for m in quant)
    return Summary(
        sum(p.numel() for p in params if p.requires_grad),
        sum(p.numel() for p in params) + packed,
        per_adapter,
        per_layer,
    )
