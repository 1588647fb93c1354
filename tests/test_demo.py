"""The main job's --quick path end to end: probe, LoRA (and QLoRA) fine-tune, save, load,
merge, checks."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))


def test_finetune_sentiment_quick(tmp_path, capsys):
    import finetune_sentiment
    rc = finetune_sentiment.main(["--quick", "--out", str(tmp_path / "a.safetensors")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "loaded adapter vs trained model: max |logit diff| 0.00e+00" in out
    assert "plain modules: True; original state-dict keys: True" in out
    assert (tmp_path / "a.safetensors").stat().st_size > 100_000


def test_finetune_sentiment_quick_qlora(tmp_path, capsys):
    import finetune_sentiment
    rc = finetune_sentiment.main(["--quick", "--qlora", "--out", str(tmp_path / "q.safetensors")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "loaded adapter vs trained model: max |logit diff| 0.00e+00" in out
    assert "plain modules: True; original state-dict keys: True" in out
