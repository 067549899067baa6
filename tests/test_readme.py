"""The README's Python code runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run_as_written() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert len(blocks) >= 2
    namespace: dict[str, object] = {"__name__": "readme"}  # not __main__: no serve()
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert "policy" in namespace
