"""Optional dependencies: which pip extra installs each, and one clear error when one is missing.

The core package needs torch only. `longreach.hf` needs transformers (`longreach[hf]`); the
command-line study and benchmark plots need tqdm and matplotlib (`longreach[study]`).
"""

from __future__ import annotations

import importlib.util
from typing import Sequence

EXTRA_OF = {"transformers": "hf", "tqdm": "study", "matplotlib": "study"}


class MissingExtraError(ModuleNotFoundError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(modules: Sequence[str], feature: str) -> None:
    """Raise MissingExtraError unless every module in `modules` (keys of EXTRA_OF) is importable."""
    absent = [name for name in modules if importlib.util.find_spec(name) is None]
    if absent:
        extras = sorted({EXTRA_OF[name] for name in absent})
        install = " ".join(f"'longreach[{extra}]'" for extra in extras)
        error = MissingExtraError(
            f"{feature} needs {' and '.join(absent)}, which {'is' if len(absent) == 1 else 'are'} not installed; "
            f"install {'it' if len(absent) == 1 else 'them'} with: pip install {install} "
            f"(or pip install {' '.join(absent)})"
        )
        error.name = absent[0]
        raise error
