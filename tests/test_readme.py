"""The README's training-loop example runs as printed (so the documentation cannot rot)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_training_loop_example_runs(capsys):
    text = README.read_text()
    section = text.split("## Use it in a training loop", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 25  # the issue asks for a ~20-line example
    exec(compile(code, str(README), "exec"), {})
    assert "loss" in capsys.readouterr().out
