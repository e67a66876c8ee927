"""Every ```python block of the README and of docs/ runs as written (the API tour, the 3D medical example,
the conversion and interop examples). Blocks that need files a user brings are ```text blocks."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [
    (f"{path.relative_to(ROOT)}[python block {i}]", textwrap.dedent(block))
    for path in DOCUMENTS
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S))
]


def test_readme_has_python_examples():
    assert sum(name.startswith("README.md") for name, _ in BLOCKS) >= 2


@pytest.mark.parametrize(("name", "block"), BLOCKS, ids=[name for name, _ in BLOCKS])
def test_documented_block_runs(name, block):
    exec(compile(block, name, "exec"), {"__name__": name})
