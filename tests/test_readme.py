"""The README's snippets, run as a user pastes them: every ```python block in order in one
namespace, then every line of the ```bash blocks after the set-up commands (with this
interpreter as ``python``), all in a scratch directory."""
import os
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def _commands() -> list[list[str]]:
    cmds = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("python -m adaptkit"):
                cmds.append([sys.executable] + shlex.split(line)[1:])
    return cmds


def test_setup_commands_open_the_readme():
    first = _blocks("bash")[0].splitlines()
    assert [ln.split("#")[0].strip() for ln in first] == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert (README.parent / script).is_file()
    assert "scripts/test.sh" in (README.parent / ".ci" / "run").read_text()


def test_python_snippets_and_cli_lines_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mod = types.ModuleType("readme")  # a real module: torch.compile looks classes up by module
    monkeypatch.setitem(sys.modules, "readme", mod)
    ns = mod.__dict__
    blocks = _blocks("python")
    assert len(blocks) >= 6
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"README.md python block {i}", "exec"), ns)
        except Exception as e:  # name the block that broke
            raise AssertionError(f"README python block {i} failed: {e!r}\n{code}") from e
    cmds = _commands()
    assert {c[3] for c in cmds} == {"inspect", "merge", "convert"}
    env = dict(os.environ, PYTHONPATH=str(README.parent))
    for cmd in cmds:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, f"{' '.join(cmd[1:])}: {r.stderr}"
    assert (tmp_path / "merged.safetensors").is_file() and (tmp_path / "back.safetensors").is_file()
