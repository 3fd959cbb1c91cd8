"""The ```python blocks of README.md and docs/*.md, in order, with their line numbers."""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


class Snippet(NamedTuple):
    path: str  # relative to the repository root
    line: int  # of the first code line
    code: str


def documents() -> List[str]:
    return ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))


def snippets(path: str) -> List[Snippet]:
    text = (ROOT / path).read_text()
    return [Snippet(path, text[: m.start()].count("\n") + 2, m.group(1)) for m in _BLOCK.finditer(text)]
