"""The README's `zo2tier finetune` shell snippet runs (with fewer steps, to stay fast)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

README = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "README.md")


def test_cli_snippet_runs(tmp_path):
    with open(README, encoding="utf-8") as f:
        text = f.read()
    section = text.split("## Fine-tune on your data: `zo2tier finetune`", 1)[1]
    script = re.search(r"```bash\n(.*?)```", section, flags=re.DOTALL).group(1)
    assert "--steps 1000" in script
    script = script.replace("--steps 1000", "--steps 6")  # the same command, shorter
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, check=False, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["steps"] == 6
    assert (tmp_path / "runs/out/curves.png").exists() and (tmp_path / "runs/out/model/config.json").exists()
