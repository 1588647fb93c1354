r"""Trainable tokens: train a few rows of an embedding (new tokens, e.g. a chat template's
added special tokens) and keep the rest of the vocabulary frozen. PEFT's
``TrainableTokensConfig`` / ``LoraConfig(trainable_token_indices=...)`` (PEFT 0.21); no paper.

    E'[t] = values[k]   if t == token_ids[k]   else   E[t]
    delta_weight = rows(token_ids) <- values - E0[token_ids],  zero elsewhere      (V, d)

Shapes (V = num_embeddings, d = embedding_dim, n = len(token_ids)):
    token_values: (n, d)  the trained rows, the only parameter (and the only tensor saved; the
                          ids are in the spec). ``init="copy"`` starts them at the base rows, so
                          the output is unchanged; ``"random"``: N(0, 1), as PEFT's
                          ``init_weights=False``.
    base_rows:    (n, d)  E0[token_ids] when the adapter joined the layer (not saved: read
                          again from the model on load), so the update is additive like every
                          other method's and stacks with LoRA on the same embedding.

Tied weights: a module whose ``weight`` *is* the adapted embedding's Parameter (the
``lm_head`` of SmolLM2 / Llama 3.2 / Qwen, a T5 ``shared`` embedding) is adapted with it by a
tied adapter that owns nothing and reads the owner's rows: the logits of the trained ids use
the trained rows (lm_head ``y[..., ids] += x (values - E0[ids])^T``). The tied group shares
one ``merged`` flag, as the layers share one weight: merging any of them writes the delta
once, and ``ak.merge`` hands back modules still sharing one Parameter. See
docs/ARCHITECTURE.md ("Trainable tokens").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import AdaptkitError
from ..layer import AdaptedLayer, Adapter, base_kind
from ..peft_config import PeftForm, err
from ..spec import AdapterSpec, Pattern, register_method

INITS = ("copy", "random")


@register_method
@dataclass(frozen=True)
class TrainableTokens(AdapterSpec):
    """Trains rows ``token_ids`` of the ``nn.Embedding`` layers ``targets`` matches (default:
    every ``embed_tokens``); modules tied to them follow. ``rank`` / ``alpha`` are unused."""

    method = "trainable_tokens"
    token_ids: tuple[int, ...] = ()
    init: str = "copy"
    targets: Pattern = r"(.*\.)?embed_tokens"

    def validate(self) -> None:
        name, ids = type(self).__name__, self.token_ids
        if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise AdaptkitError(
                f"{name}: token_ids must be a list of ints, got {ids!r:.80}; use e.g. token_ids=[49152]"
            )
        if not ids:
            raise AdaptkitError(f"{name}: token_ids is empty; list the token ids to train, e.g. token_ids=[49152]")
        neg = [i for i in ids if i < 0]
        if neg:
            raise AdaptkitError(f"{name}: token_ids {neg} are negative; token ids count from 0")
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise AdaptkitError(f"{name}: token_ids lists {dup} more than once; give each id once")
        if self.init not in INITS:
            raise AdaptkitError(f"{name}: init={self.init!r} is not one of {INITS}")
        object.__setattr__(self, "token_ids", tuple(ids))

    def supports(self, kind: str) -> bool:
        return kind in ("embedding", "linear")  # linear: only tied to an adapted embedding (link)

    def build(self, layer: AdaptedLayer, path: str) -> TokensAdapter:
        vocab = layer.weight.shape[0]  # Embedding (V, d); a tied Linear head (V, d) too
        over = [i for i in self.token_ids if i >= vocab]
        if over:
            raise AdaptkitError(
                f"TrainableTokens: token_ids {over} are out of range for '{path}' "
                f"({type(layer.base.module).__name__} with {vocab} rows); resize the embedding "
                f"first (transformers: model.resize_token_embeddings) or drop those ids"
            )
        if layer.kind == "embedding":
            pad = layer.padding_idx
            if pad is not None and pad in self.token_ids:
                raise AdaptkitError(
                    f"TrainableTokens: token_ids holds {pad}, the padding_idx of '{path}', whose row "
                    f"gets no gradient in nn.Embedding; drop it from token_ids"
                )
            if layer.max_norm is not None:
                raise AdaptkitError(
                    f"TrainableTokens cannot adapt '{path}': its max_norm renormalises looked-up "
                    f"rows in place, which a row update cannot reproduce; use max_norm=None"
                )
        return TokensAdapter(layer, self.token_ids, self.init)

    # ---- tied weights: two hooks that ak.inject / ak.load call in their plan ------------
    def tied_paths(self, model: nn.Module, paths: list[str]) -> list[str]:
        """``paths`` plus every other module whose ``weight`` is the very Parameter of a
        targeted Embedding (a tied lm_head), which must see the same rows."""
        from ..targets import _inside_wrapper

        mods = dict(model.named_modules())
        tied = {
            id(m._parameters.get("weight")) for p in paths if base_kind(m := mods.get(p, nn.Module())) == "embedding"
        }
        extra = [
            n
            for n, m in mods.items()
            if n not in paths
            and base_kind(m) in ("embedding", "linear")
            and id(m._parameters.get("weight")) in tied
            and not _inside_wrapper(n, model)
        ]
        return list(paths) + extra

    def link(self, built: list) -> list[str]:
        """Tie the planned adapters that share one weight to the first Embedding's (the
        owner); a module sharing no weight with an adapted Embedding is an error."""
        owners: dict[int, TokensAdapter] = {}
        errors = []
        for _, layer, a in built:
            w = id(layer._parameters["weight"])
            if w in owners:
                a.tie(owners[w])
            elif layer.kind == "embedding":
                owners[w] = a
        for path, layer, a in built:
            if layer.kind != "embedding" and a.owner is None:
                errors.append(
                    f"TrainableTokens: targets selects '{path}' ({type(layer.base.module).__name__}), "
                    f"but only nn.Embedding rows train (a Linear head whose weight is tied to an "
                    f"adapted Embedding follows it); narrow targets to the embedding"
                )
        return errors


class TokensAdapter(Adapter):
    """The rows of one embedding, or (``owner`` set by :meth:`TrainableTokens.link`) a layer
    tied to another adapter's rows; see the module docstring."""

    owner: TokensAdapter | None = None  # set in __dict__: the owner lives in another layer's tree
    ids: torch.Tensor  # (n,) buffers and parameter (registered in __init__)
    lut: torch.Tensor  # (V,)
    base_rows: torch.Tensor  # (n, d)
    token_values: nn.Parameter  # (n, d)

    def __init__(self, layer: AdaptedLayer, token_ids: tuple[int, ...], init: str):
        super().__init__()
        w = layer.weight.detach()
        self.__dict__["owner"] = None  # a plain attribute: the owner lives in another layer's tree
        ids = torch.tensor(token_ids, dtype=torch.long, device=w.device)
        self.register_buffer("ids", ids, persistent=False)
        if layer.kind != "embedding":
            return  # a tied head: owns nothing, reads the owner's rows (link)
        # token -> its slot + 1; 0 for the untrained tokens (a zero row in update)
        lut = torch.zeros(w.shape[0], dtype=torch.long, device=w.device)
        self.register_buffer("lut", lut.index_copy(0, ids, torch.arange(1, len(ids) + 1, device=w.device)), False)
        self.register_buffer("base_rows", w[ids].clone(), persistent=False)  # (n, d)
        vals = w[ids].clone() if init == "copy" else torch.randn(len(ids), w.shape[1]).to(w)
        self.token_values = nn.Parameter(vals)  # (n, d)

    def tie(self, owner: TokensAdapter) -> None:
        """Read ``owner``'s rows from now on (dropping this adapter's own)."""
        self._parameters.pop("token_values", None)
        self._buffers.pop("base_rows", None)
        self.__dict__["owner"] = owner

    @property
    def merged(self) -> bool:  # tied layers share the owner's flag (one weight)
        o = self.owner
        return self.__dict__.get("_merged", False) if o is None else o.merged

    @merged.setter
    def merged(self, v: bool) -> None:
        o = self.owner
        if o is None:
            self.__dict__["_merged"] = bool(v)
        else:
            o.merged = v

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (n,), values - base rows (n, d) in fp32) of the group's owner (its device)."""
        o = self.owner or self
        if "token_values" not in o._parameters:
            raise AdaptkitError(
                "TrainableTokens: this layer is tied to an embedding's trainable tokens, but the "
                "embedding is not adapted with it; adapt the embedding (targets) as well"
            )
        v = o.token_values
        return o.ids, v.to(torch.promote_types(v.dtype, torch.float32)) - o.base_rows.float()

    def delta_weight(self, layer: AdaptedLayer) -> torch.Tensor:
        _, d = self.rows()
        w = layer.weight
        d = d.to(w.device)  # a tied head may sit on another device (device_map="auto")
        return torch.zeros(w.shape, dtype=d.dtype, device=w.device).index_copy(0, self.ids, d)  # (V, d)

    def update(self, x: torch.Tensor, y: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        if self.merged:  # merged through another layer of the tied group since set_active
            return y
        _, d = self.rows()
        d = d.to(y.device)  # own ids / lut buffers: on this layer's device, the owner's may differ
        if layer.kind == "embedding":
            slot = self.lut[x]  # (...,) 0 = untrained token
            u = F.embedding(slot, torch.cat([d.new_zeros(1, d.shape[1]), d]))  # (..., d)
            # in fp32: a bf16 row then comes out as exactly the trained value
            return (y.to(u.dtype) + u).to(y.dtype)
        cols = x.to(d.dtype) @ d.t()  # (..., n): the logits of the trained ids
        return y.index_add(-1, self.ids, cols.to(y.dtype))


# ---- PEFT interop (ak.peft_compat) -----------------------------------------------------------
class TrainableTokensPeft(PeftForm):
    """PEFT's ``TrainableTokensConfig`` <-> :class:`TrainableTokens`. Tensor of adapted
    embedding p (the same data; the rows themselves, whatever PEFT's name says):
        p.trainable_tokens_delta (n, d) <-> p.token_values (n, d)
    PEFT writes that tensor again at every module tied to the embedding (lm_head): reading
    drops those copies (adaptkit ties on the model it loads into), writing adds them. In a
    LoRA folder (``LoraConfig(trainable_token_indices=...)``) the tensor is
    p.token_adapter.trainable_tokens_delta and tied copies are not written: :meth:`split`
    and :meth:`join` move it between that folder and two adaptkit adapters."""

    peft_type, prefix = "TRAINABLE_TOKENS", "trainable_tokens_"
    options = frozenset({"token_indices", "init_weights"})
    KEY, IN_LORA = "trainable_tokens_delta", ".token_adapter.trainable_tokens_delta"

    def spec_kwargs(self, cfg: dict) -> dict:
        # init_weights only picks the initial rows; the file holds the trained ones
        return dict(rank=8, alpha=None, token_ids=cfg.get("token_indices"))

    def full_config(self, common: dict, spec: AdapterSpec, layers: dict[str, dict]) -> dict:
        assert isinstance(spec, TrainableTokens)
        if spec.modules_to_save or spec.bias != "none":
            raise err("TrainableTokensConfig has no modules_to_save or bias; save those in another adapter")
        return {
            "peft_type": self.peft_type,
            "task_type": None,
            "inference_mode": True,
            "target_modules": [p for p, d in layers.items() if d["kind"] == "embedding"],
            "token_indices": list(spec.token_ids),
            "init_weights": True,
        }

    def layout(self, kind: str, wshape, key: str, shape) -> tuple[str, tuple]:
        return self.KEY, tuple(shape)

    def check_layer(self, kind: str, shape, path: str, module: nn.Module | None = None) -> None:
        if module is not None and kind == "embedding" and hasattr(module, "embed_scale"):
            raise err(f"'{path}': PEFT's trainable tokens apply embed_scale, adaptkit's do not; exclude this layer")

    def read_groups(self, groups: dict, cfg: dict) -> dict:
        """The file's groups without the tied copies: a group equal to a targeted one that
        ``target_modules`` does not select itself."""
        tm = cfg.get("target_modules")
        if tm is None:
            return groups

        def targeted(p: str) -> bool:
            return (
                re.fullmatch(tm, p) is not None
                if isinstance(tm, str)
                else any(p == t or p.endswith("." + t) for t in tm)
            )

        def same(g: dict, h: dict) -> bool:
            return g.keys() == h.keys() and all(g[k].shape == h[k].shape and torch.equal(g[k], h[k]) for k in g)

        return {
            p: g
            for p, g in groups.items()
            if targeted(p) or not any(q != p and targeted(q) and same(g, h) for q, h in groups.items())
        }

    def write_tensors(self, out: dict, layers: dict[str, dict]) -> dict:
        """Add PEFT's copies of the rows at the tied (non-embedding) layers."""
        from ..peft_compat import PREFIX

        emb = [p for p, d in layers.items() if d["kind"] == "embedding"]
        tied = [p for p, d in layers.items() if d["kind"] != "embedding"]
        if tied and len(emb) != 1:
            raise err(f"tied layers {tied} and embeddings {emb}: PEFT ties to one input embedding")
        return out | {f"{PREFIX}{p}.{self.KEY}": out[f"{PREFIX}{emb[0]}.{self.KEY}"] for p in tied}

    def split(self, cfg: dict, tensors: dict, input_embeddings: str) -> tuple[dict, dict, dict, dict]:
        """A LoRA folder with ``trainable_token_indices`` -> (LoRA config, LoRA tensors,
        TrainableTokens config, its tensors)."""
        tti = cfg["trainable_token_indices"]
        table = tti if isinstance(tti, dict) else {input_embeddings: tti}
        if not table or any(list(v) != list(next(iter(table.values()))) for v in table.values()):
            raise err(
                f"trainable_token_indices={tti!r:.200}: adaptkit's TrainableTokens trains one list of "
                f"ids per adapter; give every layer the same ids"
            )
        tok = {k[: -len(self.IN_LORA)] + "." + self.KEY: v for k, v in tensors.items() if k.endswith(self.IN_LORA)}
        rest = {k: v for k, v in tensors.items() if not k.endswith(self.IN_LORA)}
        if not tok:
            raise err(f"trainable_token_indices={tti!r:.200} but the folder has no *{self.IN_LORA} tensor")
        stored = [k[: -len(self.KEY) - 1] for k in tok]
        tcfg = {
            "peft_type": self.peft_type,
            "target_modules": [n for n in table if any(p.endswith(n) for p in stored)],  # not the tied ones
            "token_indices": list(next(iter(table.values()))),
        }
        return {k: v for k, v in cfg.items() if k != "trainable_token_indices"}, rest, tcfg, tok

    def join(self, cfg: dict, tensors: dict, tcfg: dict, ttensors: dict) -> tuple[dict, dict]:
        """:meth:`split`'s inverse: a LoRA folder's config and tensors carrying the rows."""
        from ..peft_compat import PREFIX

        if cfg.get("peft_type") != "LORA":
            raise err(f"trainable tokens ride along a LoRA / DoRA folder only, not {cfg.get('peft_type')!r}")
        emb, ids = tcfg["target_modules"], tcfg["token_indices"]
        rows = {f"{PREFIX}{p}{self.IN_LORA}": ttensors[f"{PREFIX}{p}.{self.KEY}"] for p in emb}
        return cfg | {"trainable_token_indices": dict.fromkeys(emb, ids)}, tensors | rows


TrainableTokens.peft_form = TrainableTokensPeft()
