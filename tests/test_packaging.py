"""Packaging: the torch the extension was built against (checked at import), the build's refusal
of an environment without that torch, the one version source, the optional extras."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import longreach
from longreach import _build_config, _extras, _torch_check

ROOT = Path(__file__).resolve().parents[1]


def test_build_config_names_the_running_torch():
    assert _build_config.TORCH_VERSION == torch.__version__
    assert _build_config.TORCH_CUDA_VERSION == (torch.version.cuda or "")
    assert _torch_check.mismatch(_build_config.TORCH_VERSION, _build_config.TORCH_CUDA_VERSION,
                                 _build_config.WITH_CUDA_KERNELS, torch.__version__, torch.version.cuda) is None


def test_mismatch_rules():
    # the same release in another flavour: a CPU-only build runs in the CUDA build of torch
    assert _torch_check.mismatch("2.13.0+cpu", "", False, "2.13.0+cu128", "12.8") is None
    assert "torch 2.13.0+cpu, but torch 2.14.1 is installed" in _torch_check.mismatch(
        "2.13.0+cpu", "", False, "2.14.1", None)
    assert "is a CPU build" in _torch_check.mismatch("2.14.1+cu128", "12.8", True, "2.14.1+cpu", None)
    assert "uses CUDA 13.0" in _torch_check.mismatch("2.14.1+cu128", "12.8", True, "2.14.1+cu130", "13.0")
    assert _torch_check.mismatch("2.14.1+cu128", "12.8", True, "2.14.1+cu126", "12.6") is None


def test_import_refuses_another_torch(monkeypatch):
    monkeypatch.setattr(_build_config, "TORCH_VERSION", "2.4.0+cpu")
    with pytest.raises(ImportError) as info:
        _torch_check.check_torch_matches_build()
    message = str(info.value)
    assert f"built against torch 2.4.0+cpu, but torch {torch.__version__} is installed" in message
    assert "pip install --no-build-isolation --no-deps --force-reinstall" in message
    assert "torch==2.4.0" in message


def _run_torch_paths(env_path: str):
    env = dict(os.environ, PYTHONPATH=env_path)
    return subprocess.run([sys.executable, str(ROOT / "cmake" / "torch_paths.py")], capture_output=True,
                          text=True, env=env, timeout=300)


def test_build_without_torch_says_what_to_run(tmp_path):
    # what pip's build isolation looks like to the build: a torch that cannot be imported
    (tmp_path / "torch.py").write_text("raise ImportError('No module named torch (simulated)')\n")
    proc = _run_torch_paths(str(tmp_path))
    assert proc.returncode == 1
    assert f"Your environment has torch {torch.__version__}" in proc.stderr
    assert "pip install --no-build-isolation ." in proc.stderr
    assert proc.stdout == ""


def test_build_against_another_torch_is_refused(tmp_path):
    # an isolated build environment that installed its own torch
    fake = tmp_path / "torch"
    (fake / "utils").mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '9.9.9'\n")
    (fake / "utils" / "cpp_extension.py").write_text("")
    proc = _run_torch_paths(str(tmp_path))
    assert proc.returncode == 1
    assert f"the build sees torch 9.9.9" in proc.stderr and f"has torch {torch.__version__}" in proc.stderr
    assert "--no-build-isolation" in proc.stderr


def test_build_sees_the_installed_torch():
    proc = _run_torch_paths("")
    assert proc.returncode == 0, proc.stderr
    assert f"TORCH_VERSION={torch.__version__}\n" in proc.stdout


def test_one_version_source():
    assert importlib.metadata.version("longreach") == longreach.__version__
    assert f"## {longreach.__version__}" in (ROOT / "CHANGELOG.md").read_text()


def test_typed_and_licensed():
    assert (Path(longreach.__file__).parent / "py.typed").is_file()
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    assert "Apache-2.0" in (ROOT / "pyproject.toml").read_text()


def test_missing_extra_names_it(monkeypatch):
    real = _extras.importlib.util.find_spec
    monkeypatch.setattr(_extras.importlib.util, "find_spec", lambda name: None if name == "tqdm" else real(name))
    with pytest.raises(ModuleNotFoundError, match=r"longreach extrapolate needs tqdm, which is not installed; "
                                                  r"install it with: pip install 'longreach\[study\]'"):
        _extras.require(("tqdm", "matplotlib"), "longreach extrapolate")


def test_cli_names_the_missing_extra(monkeypatch, capsys):
    from longreach.__main__ import main

    real = _extras.importlib.util.find_spec
    monkeypatch.setattr(_extras.importlib.util, "find_spec",
                        lambda name: None if name == "matplotlib" else real(name))
    assert main(["bench", "--plot", "x.png"]) == 2
    assert "pip install 'longreach[study]'" in capsys.readouterr().err


def test_cli_runs_with_a_passive_openmp_wait_policy(monkeypatch):
    from longreach import __main__ as cli

    calls = []
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(cli.os, "execv", lambda path, args: calls.append((path, args)))
    cli._with_passive_openmp(["bench", "--quick"])
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert calls and calls[0][0] == sys.executable
    calls.clear()
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice is kept
    cli._with_passive_openmp(["bench"])
    assert calls == []


# ------------------------------------------------------------ project URLs, README on PyPI --

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)|<(?:a|img)\b[^>]*?(?:href|src)=[\"']([^\"']+)[\"']")


def _project_urls() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]


def test_project_urls_share_one_repository():
    urls = _project_urls()
    assert set(urls) == {"Homepage", "Documentation", "Source", "Issues", "Changelog"}
    repo = urls["Source"]
    assert repo.startswith("https://") and all(url.startswith(repo) for url in urls.values())
    assert urls["Changelog"] == f"{repo}/blob/main/CHANGELOG.md"


def test_readme_links_work_on_pypi():
    # PyPI renders README.md without the repository around it: a relative link (docs/x.md, an
    # image) is broken there. Every link must be absolute or an anchor; those into the repository
    # use pyproject's Source URL and name a file that exists.
    repo = _project_urls()["Source"]
    links = [a or b for a, b in _LINK.findall((ROOT / "README.md").read_text())]
    assert links, "the pattern finds no link: it is broken"
    for link in links:
        assert link.startswith(("https://", "http://", "mailto:", "#")), f"README.md: relative link {link!r}"
        for prefix in (f"{repo}/blob/main/", f"{repo}/tree/main/", f"{repo}/raw/main/"):
            if link.startswith(prefix):
                path = link[len(prefix):].split("#")[0]
                assert (ROOT / path).exists(), f"README.md links to {link}, but {path} is not in the repository"


def test_readme_link_check_can_fail(tmp_path):
    text = "see [the docs](docs/cuda.md) and ![plot](docs/images/x.png) and <img src=\"a.png\">"
    assert [a or b for a, b in _LINK.findall(text)] == ["docs/cuda.md", "docs/images/x.png", "a.png"]
