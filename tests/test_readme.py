"""Every Python snippet in the README runs, and its first screen holds exactly the two set-up commands."""

from __future__ import annotations

import os
import re
import subprocess
import sys

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _blocks(lang: str) -> list[str]:
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.DOTALL)


def test_quick_start_has_exactly_the_two_commands():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    first_screen = "\n".join(text.splitlines()[:40])
    block = re.search(r"## Quick start\n\n```\n(.*?)```", first_screen, flags=re.DOTALL)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]


def test_python_snippets_run(tmp_path):
    snippets = _blocks("python")
    assert snippets
    for i, code in enumerate(snippets):
        path = tmp_path / f"snippet_{i}.py"
        path.write_text(code)
        done = subprocess.run([sys.executable, str(path)], cwd=tmp_path, capture_output=True, check=False, text=True, timeout=600)
        assert done.returncode == 0, f"README snippet {i} failed:\n{code}\n{done.stderr[-3000:]}"
