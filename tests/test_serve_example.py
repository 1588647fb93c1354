"""The serving example's --quick mode end to end (examples/serve_adapters.py): a tiny random
transformers Llama with a LoRA, a DoRA and a LoKr adapter answers a mixed batch inside
``ak.route`` with ``generate``; every row must equal that row generated alone with its adapter."""
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_serve_adapters_quick(capsys):
    import serve_adapters

    rc = serve_adapters.main(["--quick", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = re.findall(r"^  row (\d) \[(\w+)\].*\n +-> (\[.*\])\n +same as the row alone: (\w+) "
                      r"\(max \|score diff\| (\S+)\)", out, re.M)
    assert [(int(i), a) for i, a, *_ in rows] == list(enumerate(["pirate", "french", "base", "shout",
                                                                  "french", "pirate"])), out
    assert all(same == "yes" and float(d) < 1e-4 for *_, same, d in rows), out
    answers = [ans for _, _, ans, _, _ in rows]
    assert len(set(answers)) > 3, out  # the adapters (and the base) answer differently
    assert re.search(r"^tokens/s: mixed batch \S+, one adapter at a time \S+ ", out, re.M), out
    assert "all rows match their adapter run alone" in out
