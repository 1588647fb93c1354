"""The main job's --quick path end to end: probe, LoRA (and QLoRA) fine-tune, save, load,
merge, checks."""
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))


def _merge_diff(out: str) -> float:
    m = re.search(r"^merged plain model vs adapted model: max \|logit diff\| (\S+);", out, re.M)
    assert m, out
    return float(m.group(1))


def test_finetune_sentiment_quick(tmp_path, capsys, monkeypatch):
    import finetune_sentiment
    monkeypatch.chdir(tmp_path)
    rc = finetune_sentiment.main(["--quick"])
    out, err = capsys.readouterr()
    assert rc == 0, out
    for bar in ("probe: embed train", "probe: embed test", "lora train", "lora evaluate",
                "loaded evaluate", "merged evaluate"):  # every long step shows progress
        assert f"{bar}: 100%" in err, err
    assert re.search(r"^lora: 36 adapted layers", out, re.M), out
    assert "loaded adapter vs trained model: max |logit diff| 0.00e+00" in out
    assert "plain modules: True; original state-dict keys: True" in out
    assert _merge_diff(out) < 1e-4
    assert os.listdir(tmp_path / "runs") == ["sentiment_lora.safetensors"]
    assert (tmp_path / "runs" / "sentiment_lora.safetensors").stat().st_size > 100_000


def test_finetune_sentiment_quick_qlora(tmp_path, capsys, monkeypatch):
    """--qlora really runs QLoRA (NF4 encoder Linears), and merging the NF4 base + ΔW into a
    dense model keeps the logits (measured 3.2e-5)."""
    import finetune_sentiment
    monkeypatch.chdir(tmp_path)  # the default --out: a file of its own, not the LoRA run's
    rc = finetune_sentiment.main(["--quick", "--qlora"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert os.listdir(tmp_path / "runs") == ["sentiment_qlora.safetensors"]
    assert "saved adapter: runs/sentiment_qlora.safetensors" in out
    assert re.search(r"^qlora: 36 adapted layers", out, re.M), out
    assert re.search(r"^qlora fine-tune: accuracy", out, re.M), out
    assert not re.search(r"^lora", out, re.M), out
    assert "loaded adapter vs trained model: max |logit diff| 0.00e+00" in out
    assert "plain modules: True; original state-dict keys: True" in out
    assert _merge_diff(out) < 1e-4

