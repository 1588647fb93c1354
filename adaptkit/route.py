"""``ak.route``: a different adapter for each row of a batch (multi-adapter serving).

    with ak.route(model, ["a", "b", None, "a"]):   # row i (dim 0) uses names[i]; None: the base
        model.generate(input_ids, ...)

Row i's output equals running row i alone with ``ak.set_active(model, names[i])`` (``None``:
under ``ak.disabled``). Ideas from Punica (Chen et al., 2023, arXiv 2310.18547) and S-LoRA
(Sheng et al., 2023, arXiv 2311.03285): one base GEMM for the whole batch, the adapters'
low-rank parts batched across rows.

How a layer computes under route (docs/ARCHITECTURE.md, "Serving: ak.route"). Entering
replaces each adapted layer's active tuple by one ``_Router`` (a stand-in adapter with
``fuses_base``, so ``AdaptedLayer.forward`` hands it the whole call; no core hook needed)::

    y = base(x)                                   one GEMM, every row, (N, ..., out)
    LoRA / DoRA / GeoLoRA rows (fast form, Linear-like): per-row factors, gathered on entry
        A_rows (N, r_max, in), B_rows (N, out, r_max) = s_i B_i, zero for other rows
        y += bmm(bmm(x, A_rows^T), B_rows^T)      x viewed (N, T, in); exact: zero rows add 0
        y = g_rows y + b (1 - g_rows)             DoRA's m / ||W + s B A||_row; 1 elsewhere
    every other adapter (generic form):           rows of one adapter through its own update
        y[idx] = adapter.update(x[idx], y[idx], layer)

Measured on CPU (fp32, 1 thread, rank 16, 4 adapters over 8 rows; per layer, relative to one
LoRA for the whole batch): per-row factors gathered on entry then ``bmm`` 1.08-1.18x at decode
(1 token a row) and 0.7-1.04x at 256-token prefill; gathering them on every call 1.9-2.4x at
decode (the gathers cost as much as the matmuls); sort-by-adapter segments (index_select,
two linears, index_add per adapter) 1.3-1.7x at decode, 0.9-1.05x at prefill; one masked
rank-(n r) LoRA 1.15-1.18x at decode, 1.0-1.1x at prefill. So: the gathered ``bmm``, with the
gather done on entry while the batch has at most ``CACHE_ROWS`` rows (above, per call, so the
cache stays bounded).

The fast form runs only when no adapter parameter needs a gradient (``torch.no_grad``,
inference mode, or frozen adapters) and no LoRA dropout is live; otherwise every row takes the
generic form, which is differentiable (training under route works, dropout included).
The stacked factors are a snapshot taken on entry: change adapter weights outside the context.
``ak.set_active`` (or ``ak.inject``) inside the context replaces the routers, so the rest of
the context runs that active set for every row; leaving it still restores the state from before.

A layer whose input's dim 0 is not the batch is refused with an AdaptkitError, never
computed wrongly. Adapted parameters (``target_parameters``: MoE experts) see the tokens of
every row flattened in row order: their module runs once per adapter group and keeps each
group's tokens (``_OwnerRouter``; the per-group form, no batched fast form).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn

from .errors import AdaptkitError
from .inject import check_model, refresh, state
from .layer import AdaptedLayer, Adapter, adapted_layers
from .methods.dora import DoRAAdapter
from .methods.geolora import GeoLoRAAdapter
from .methods.lora import LoRAAdapter

# batch rows up to which the fast form's per-row factors are gathered once on entry (memory
# N * r * (in + out) a layer); a larger batch gathers them from the stack on every call
CACHE_ROWS = 64
# base kinds whose input is (N, ..., in) and whose update is x A^T B^T (the fast form's math);
# an NF4 base is kind "linear"
FAST_KINDS = ("linear", "conv1d_t")


def _lora_pair(a) -> tuple[torch.Tensor, torch.Tensor]:
    return a.lora_A, a.scale * a.lora_B.float()


def _geolora_pair(a) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, V = a.factors()  # (out, r), (r, r), (in, r): delta = s U S V^T
    return S @ V.t(), a.scale * U.float()


# adapter type (exact: a subclass may compute something else) -> its update as a low-rank
# pair (A (r, in), s B (out, r)), delta = s B A; a method joins the fast form with one entry
LOW_RANK = {LoRAAdapter: _lora_pair, DoRAAdapter: _lora_pair, GeoLoRAAdapter: _geolora_pair}


class _LowRankRows:
    """The fast form on one layer: per-row factors for the rows whose adapter has a low-rank
    pair (``LOW_RANK``: LoRA, DoRA, GeoLoRA) of one dtype (ranks may differ: padded with
    zeros, which add 0). DoRA's rescale is per row too: ``out = g * (y + s B A x) + b (1 - g)``
    with ``g = m / ||W + s B A||_row`` fixed while the weights are (g = 1: LoRA, None rows).

    stack_A (k+1, r, in), stack_B (k+1, out, r) with s folded into B, stack_G (k+1, out);
    slot k is zeros (rows using no low-rank adapter here); idx (N,) the slot of each row."""

    def __init__(self, layer: AdaptedLayer, ads: list[Adapter], slots: list[int]):
        with torch.no_grad():
            pairs = [LOW_RANK[type(a)](a) for a in ads]  # (r_j, in), (out, r_j)
            a0 = pairs[0][0]
            r = max(a.shape[0] for a, _ in pairs)
            n_out, n_in = pairs[0][1].shape[0], a0.shape[1]
            kw: dict[str, Any] = {"device": a0.device, "dtype": a0.dtype}
            A = torch.zeros(len(ads) + 1, r, n_in, **kw)  # (k+1, r, in)
            B = torch.zeros(len(ads) + 1, n_out, r, **kw)  # (k+1, out, r)
            G = torch.ones(len(ads) + 1, n_out, device=kw["device"])  # (k+1, out) fp32
            for j, (a, (pa, pb)) in enumerate(zip(ads, pairs)):
                A[j, : pa.shape[0]] = pa
                B[j, :, : pa.shape[0]] = pb
                if isinstance(a, DoRAAdapter):
                    G[j] = a.lora_magnitude.float() / a.row_norm(layer)
            self.idx = torch.tensor(slots, device=kw["device"])
            self.dtype = kw["dtype"]
            self.dora = any(isinstance(a, DoRAAdapter) for a in ads)
            Bt = B.transpose(1, 2).contiguous()  # (k+1, r, out)
            gain = G if self.dora else None
            if len(slots) <= CACHE_ROWS:
                self.stack = None
                self.A_rows, self.Bt_rows = A[self.idx], Bt[self.idx]  # (N, r, in), (N, r, out)
                self.G_rows = None if gain is None else gain[self.idx]  # (N, out)
            else:
                self.stack = (A, Bt, gain)

    def apply(self, x: torch.Tensor, y: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        """Every row's update on the base output y (x (N, ..., in), y (N, ..., out))."""
        if self.stack is None:
            A, Bt, G = self.A_rows, self.Bt_rows, self.G_rows
        else:  # gathered per call: (N, r, in), (N, r, out), (N, out)
            sA, sBt, sG = self.stack
            A, Bt, G = sA[self.idx], sBt[self.idx], None if sG is None else sG[self.idx]
        x3 = x.reshape(x.shape[0], -1, x.shape[-1]).to(self.dtype)  # (N, ..., in) -> (N, T, in)
        h = torch.bmm(x3, A.transpose(1, 2))  # (N, T, r)
        y3 = y.reshape(y.shape[0], -1, y.shape[-1])  # (N, ..., out) -> (N, T, out)
        if y.dtype == self.dtype:
            t = torch.baddbmm(y3, h, Bt)
        else:
            t = y3 + torch.bmm(h, Bt).to(y.dtype)
        if G is not None:  # DoRA rows: g t + b (1 - g); g = 1 elsewhere leaves t as it is
            g = G.to(y.dtype).unsqueeze(1)  # (N, 1, out)
            b = layer.bias
            t = t * g if b is None else torch.addcmul(b.to(y.dtype) * (1 - g), g, t)
        return t.view(y.shape)  # (N, T, out) -> (N, ..., out)


class _Router:
    """Stands in for the active adapters of one layer while a route is entered. With
    ``fuses_base`` set, ``AdaptedLayer.forward`` calls :meth:`base_forward` for the whole
    output, then :meth:`update`, which adds nothing. Adapters that check whether they are
    first in the active set (DoRA, LoRA-MPO) see that they are not, so their ``update`` adds
    their full part to a base output computed without them."""

    fuses_base = True

    def __init__(self, path: str, layer: AdaptedLayer, rows: list[str | None]):
        self.path, self.n = path, len(rows)
        used = [n for n in dict.fromkeys(rows) if n is not None and n in layer.adapters]
        ads = {n: layer.adapters[n] for n in used}
        dev = layer.weight.device

        def index(name: str) -> torch.Tensor | None:  # the rows of one adapter; None: all
            ix = [i for i, n in enumerate(rows) if n == name]
            return None if len(ix) == self.n else torch.tensor(ix, device=dev)

        self.groups = [(ads[n], index(n)) for n in used]  # the generic form, every adapter
        fast = [n for n in used if type(ads[n]) in LOW_RANK] if layer.kind in FAST_KINDS else []
        dtype = [next(ads[n].parameters()).dtype for n in fast]
        fast = [n for n, dt in zip(fast, dtype) if dt == dtype[0]]
        self.rest = [(a, ix) for a, ix in self.groups if not any(a is ads[n] for n in fast)]
        self.low_rank = None
        if fast:
            slot: dict[str | None, int] = {n: j for j, n in enumerate(fast)}
            self.low_rank = _LowRankRows(layer, [ads[n] for n in fast], [slot.get(n, len(fast)) for n in rows])
        fast_ads = [ads[n] for n in fast]
        self.trainable = any(p.requires_grad for a in fast_ads for p in a.parameters())
        self.dropout = any(a.p for a in fast_ads)

    def base_forward(self, x: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        if x.dim() == 0 or x.shape[0] != self.n:
            raise AdaptkitError(
                f"route: the input of '{self.path}' has shape {list(x.shape)}, whose dim 0 is not "
                f"the batch of {self.n} rows given to ak.route (names has {self.n} entries); this "
                f"layer sees the rows flattened or reordered (e.g. MoE token dispatch, beam search "
                f"expanding the batch). Exclude the layer from the adapters or route a batch whose "
                f"dim 0 reaches every adapted layer unchanged"
            )
        y = layer.base.forward(layer, x)
        low_rank = self.low_rank
        fast = low_rank is not None and not (
            (torch.is_grad_enabled() and self.trainable) or (self.dropout and layer.training)
        )
        for a, ix in self.rest if fast else self.groups:
            if ix is None:
                y = a.update(x, y, layer)
            else:  # rows of this adapter through its own update, written back in place of theirs
                y = y.index_copy(0, ix, a.update(x.index_select(0, ix), y.index_select(0, ix), layer))
        if fast and low_rank is not None:
            y = low_rank.apply(x, y, layer)
        return y

    def update(self, x: torch.Tensor, y: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        return y  # base_forward computed every row


class _OwnerRouter:
    """Routes a module whose Parameters are adapted (``target_parameters``: MoE experts). Its
    input holds the tokens of every row flattened in row order ((N, T, d) -> (N*T, d), as
    transformers' MoE blocks do), so token j belongs to row j // (tokens / N). The owner's
    forward runs once per adapter group with that group's adapters presented and keeps the
    output tokens of the group's rows: exact, since the experts compute each token alone."""

    def __init__(self, path: str, layers: list[AdaptedLayer], rows: list[str | None]):
        self.path, self.layers, self.rows = path, layers, rows
        self.groups = list(dict.fromkeys(rows))  # None (the base) is a group too

    def __call__(self, owner: nn.Module, call, args, kwargs):
        x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        n = len(self.rows)
        if x is None or x.dim() == 0 or x.shape[0] % n:
            got = "no tensor" if x is None else f"shape {list(x.shape)}"
            raise AdaptkitError(
                f"route: '{self.path}' got {got}, whose dim 0 is not a multiple of the {n} rows given "
                f"to ak.route, so its tokens cannot be mapped to rows; route a batch whose tokens "
                f"reach this module flattened in row order"
            )
        per = x.shape[0] // n  # tokens of one row
        row_of = torch.arange(x.shape[0], device=x.device) // per  # (tokens,)
        out = None
        try:
            for g in self.groups:
                for layer in self.layers:
                    layer.__dict__["_active"] = (layer.adapters[g],) if g is not None and g in layer.adapters else ()
                y = call(owner, *args, **kwargs)
                if not isinstance(y, torch.Tensor) or y.shape[0] != x.shape[0]:
                    raise AdaptkitError(
                        f"route: '{self.path}' returned {type(y).__name__}, not one tensor of its "
                        f"{x.shape[0]} tokens; this module cannot be routed per row"
                    )
                mine = torch.tensor([r == g for r in self.rows], device=x.device)[row_of]  # (tokens,)
                out = y if out is None else torch.where(mine.view(-1, *[1] * (y.dim() - 1)), y, out)
        finally:
            for layer in self.layers:
                layer.__dict__["_active"] = ()
        return out


def _check_rows(model: nn.Module, names) -> list[str | None]:
    """names as a list, every entry None or an adapter of the model, else one error."""
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise AdaptkitError(
            f"route: names must be a list with one adapter name (or None) per batch row, got "
            f"{type(names).__name__} {names!r}; e.g. ak.route(model, ['a', None, 'b'])"
        )
    rows = list(names)
    if not rows:
        raise AdaptkitError("route: names is empty; give one adapter name (or None) per batch row")
    known = state(model).specs
    bad = sorted({repr(n) for n in rows if not (n is None or isinstance(n, str) and n in known)})
    if bad:
        raise AdaptkitError(
            f"route: unknown adapter name(s) {', '.join(bad)} in names; this model has "
            f"{sorted(known)} (None runs a row on the base alone)"
        )
    return rows


def _check_layers(layers: list[tuple[str, AdaptedLayer]], rows: list[str | None]) -> None:
    merged = [f"'{p}' ({m})" for p, l in layers if (m := [n for n, a in l.adapters.items() if a.merged])]
    if merged:
        raise AdaptkitError(
            f"route: adapters are merged into the base weights at {', '.join(merged[:3])}"
            f"{' ...' if len(merged) > 3 else ''}, so no row could run without them; call "
            f"adaptkit.merge.unmerge(model) first"
        )
    nested = [p for p, l in layers if any(isinstance(a, _Router) for a in l._active)]
    nested += [p for p, l in layers if l.kind == "param" and "_ak_route" in l.base.module.__dict__]
    if nested:
        raise AdaptkitError(
            f"route: the model is already inside ak.route (layer '{nested[0]}'); route contexts "
            f"do not nest, leave the outer one first"
        )


@contextlib.contextmanager
def route(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Run row ``i`` of every batch (dim 0 of each adapted layer's input) with adapter
    ``names[i]`` alone (``None``: the base alone) while inside the context.

    Everything is checked before anything changes (unknown names, merged adapters, nesting);
    the per-row factors are built once here. Leaving the context (also by an exception)
    restores each layer's active adapters exactly. Layers that own their adapter
    (``ak.MoRALinear``) are not routed, as ``ak.set_active`` leaves them alone."""
    check_model(model, "route")
    rows = _check_rows(model, names)
    layers = [(p, l) for p, l in adapted_layers(model) if not l.owns_adapters]
    _check_layers(layers, rows)
    routers: dict[str, _Router] = {}
    owners: dict[int, tuple[str, nn.Module, list[AdaptedLayer]]] = {}
    for p, layer in layers:
        if not any(n is not None and n in layer.adapters for n in rows):
            continue
        if layer.kind == "param":  # grouped by the module that uses the parameter
            owners.setdefault(id(layer.base.module), (p.rpartition(".")[0], layer.base.module, []))[2].append(layer)
        else:
            routers[p] = _Router(p, layer, rows)
    st = state(model)
    saved = {p: (layer._active, layer._active_names) for p, layer in layers}
    active = list(st.active)
    for p, layer in layers:
        layer.__dict__["_active"] = (routers[p],) if p in routers else ()
    for path, owner, owned in owners.values():
        owner.__dict__["_ak_route"] = _OwnerRouter(path, owned, rows)
    try:
        yield model
    finally:
        for _, owner, _ in owners.values():
            owner.__dict__.pop("_ak_route", None)
        if st.active != active:  # set_active inside the context: put the model's set back
            st.active = active
            refresh(model)
        for p, layer in layers:
            layer.__dict__["_active"], layer.__dict__["_active_names"] = saved[p]
