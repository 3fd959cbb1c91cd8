#!/usr/bin/env python3
"""Builds the API reference (Markdown) from the public modules' docstrings, offline.

    python scripts/build_api_reference.py [--out build/docs/api]

One page per public module plus an index. The public names of a module are its
``__all__`` (or, without one, the functions and classes it defines whose names do
not start with ``_``); a class page lists its public methods. Every public function,
class and method must have a docstring (a method overriding a documented one, such as
an nn.Module's forward documented in its class docstring, inherits its base's): a missing one fails the build with the
names, so the reference cannot silently lose an entry (tests/test_api_reference.py
runs this in ``make test``). Nothing is downloaded: only ``inspect`` on the
installed package.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pathlib
import sys
from typing import Iterable, List, Tuple

# The modules users import, in the order the index lists them.
PUBLIC_MODULES = [
    "longreach",
    "longreach.nn",
    "longreach.hf",
    "longreach.flash_attn_interface",
    "longreach.distributed",
    "longreach.padding",
    "longreach.positional",
    "longreach.position_ids",
    "longreach.dropout",
    "longreach.reference",
]


def public_names(module) -> List[str]:
    names = getattr(module, "__all__", None)
    if names is not None:
        return [n for n in names if not n.startswith("__")]
    return sorted(
        n for n, obj in vars(module).items()
        if not n.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
        and getattr(obj, "__module__", None) == module.__name__)


def documented(obj) -> bool:
    return inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj) or callable(obj)


def signature_of(name: str, obj, method: bool = False) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return name
    if method:  # drop self / cls, as the call is written
        sig = sig.replace(parameters=list(sig.parameters.values())[1:])
    return f"{name}{sig}"


def public_methods(cls) -> Iterable[Tuple[str, object]]:
    for name, member in vars(cls).items():
        if (name.startswith("_") and name != "__init__") or name == "extra_repr":
            continue  # extra_repr: nn.Module's print hook, not API
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        if isinstance(member, property):
            yield name, member
        elif inspect.isfunction(member):
            yield name, member


def module_page(module_name: str, missing: List[str]) -> str:
    module = importlib.import_module(module_name)
    lines = [f"# `{module_name}`", "", inspect.getdoc(module) or "", ""]
    for name in public_names(module):
        obj = getattr(module, name)
        if inspect.ismodule(obj):
            lines += [f"## `{name}`", "", f"Module: see `{obj.__name__}`.", ""]
            continue
        if not documented(obj):  # constants and type aliases: name and value only
            lines += [f"## `{name}`", "", f"`{name} = {obj!r}`", ""]
            continue
        doc = inspect.getdoc(obj)
        if not doc:
            missing.append(f"{module_name}.{name}")
        kind = "class" if inspect.isclass(obj) else "function"
        lines += [f"## `{name}` ({kind})", "", "```python", signature_of(name, obj), "```", "", doc or "", ""]
        if inspect.isclass(obj):
            for method_name, method in public_methods(obj):
                if method_name == "__init__":
                    continue  # the class signature above is __init__'s
                mdoc = inspect.getdoc(method)
                if not mdoc:
                    missing.append(f"{module_name}.{name}.{method_name}")
                title = method_name if isinstance(method, property) else signature_of(method_name, method, method=True)
                lines += [f"### `{name}.{title}`", "", mdoc or "", ""]
    return "\n".join(lines).rstrip() + "\n"


def build(out: pathlib.Path) -> List[str]:
    """Writes the pages into `out`; returns the public names without a docstring."""
    out.mkdir(parents=True, exist_ok=True)
    missing: List[str] = []
    index = ["# longreach API reference", "",
             "Generated from the docstrings by `scripts/build_api_reference.py` (`make docs`).", ""]
    for module_name in PUBLIC_MODULES:
        page = module_page(module_name, missing)
        (out / f"{module_name}.md").write_text(page)
        summary = (inspect.getdoc(importlib.import_module(module_name)) or "").split("\n")[0]
        index.append(f"- [`{module_name}`]({module_name}.md): {summary}")
    (out / "index.md").write_text("\n".join(index) + "\n")
    return missing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="build/docs/api", help="output folder (default build/docs/api)")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    missing = build(out)
    if missing:
        print("build_api_reference: public names without a docstring:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 1
    print(f"build_api_reference: {len(PUBLIC_MODULES)} modules written to {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
