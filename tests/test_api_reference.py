"""The API reference builds offline from the docstrings, and names every public object."""

import importlib
import inspect
import pathlib
import sys
import types

import pytest

SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import build_api_reference as api  # noqa: E402


def test_every_public_name_is_documented(tmp_path):
    assert api.main(["--out", str(tmp_path)]) == 0
    index = (tmp_path / "index.md").read_text()
    for module_name in api.PUBLIC_MODULES:
        page = (tmp_path / f"{module_name}.md").read_text()
        assert f"({module_name}.md)" in index
        for name in api.public_names(importlib.import_module(module_name)):
            assert f"## `{name}`" in page, (module_name, name)


def test_signatures_and_docstrings_are_in_the_pages(tmp_path):
    api.build(tmp_path)
    page = (tmp_path / "longreach.md").read_text()
    import longreach
    assert f"local_attention{inspect.signature(longreach.local_attention)}" in page
    assert inspect.getdoc(longreach.local_attention).splitlines()[0] in page
    nn_page = (tmp_path / "longreach.nn.md").read_text()
    assert "### `LocalSelfAttention.new_cache() -> 'SlidingKVCache'`" in nn_page


def test_an_undocumented_public_name_fails_the_build(tmp_path, monkeypatch):
    fake = types.ModuleType("longreach_fake_public")
    fake.__doc__ = "A module with one undocumented function."

    def undocumented(x):
        return x

    undocumented.__module__ = fake.__name__
    fake.undocumented = undocumented
    fake.__all__ = ["undocumented"]
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setattr(api, "PUBLIC_MODULES", api.PUBLIC_MODULES + [fake.__name__])
    assert api.main(["--out", str(tmp_path)]) == 1
    assert api.build(tmp_path) == ["longreach_fake_public.undocumented"]
