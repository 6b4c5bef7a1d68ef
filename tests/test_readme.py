"""The README's example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    match = re.search(r"<!-- readme-example.*?-->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its marked example"
    return match.group(1)


def test_readme_example_runs(capsys):
    namespace: dict = {}
    exec(compile(readme_example(), str(README), "exec"), namespace)
    assert capsys.readouterr().out.startswith("True")
    cell = namespace["deq"].f
    assert all(p.grad is not None for p in cell.parameters())
