"""A fresh virtual environment: ``pip install .`` without the dev extras, then the README's quick start.

The venv sees the system's site-packages (``--system-site-packages``) so that torch and the other core
dependencies are not downloaded again (an unpinned torch could pull a multi-GB CUDA build); the project itself
is installed into the venv from a copy of this checkout with the system's pip and setuptools
(``--without-pip``; ``--no-deps --no-index --no-build-isolation``: nothing is fetched), and the test then checks that every core dependency the package declares is importable at a version
that satisfies it, and that the quick start runs from the installed copy, not from ``src/``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHECK = textwrap.dedent("""
    import importlib.metadata as md, sys
    from packaging.requirements import Requirement

    def core(dist):
        for line in md.requires(dist) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                yield req

    missing, closure, todo = [], {"dualpath"}, ["dualpath"]
    while todo:  # the declared core dependencies and theirs, extras excluded
        for req in core(todo.pop()):
            name = req.name.lower().replace("_", "-")
            try:
                have = md.version(req.name)
            except md.PackageNotFoundError:
                missing.append(f"{req.name}: not installed")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                missing.append(f"{req.name}: {have} does not satisfy {req.specifier}")
            if name not in closure:
                closure.add(name)
                todo.append(req.name)
    assert not missing, missing

    owners = md.packages_distributions()

    class OnlyDeclared:
        # refuse a third-party module that no declared core dependency provides: the system site-packages of
        # this venv hold the dev extras too, which a user's fresh install would not have
        def find_spec(self, name, path=None, target=None):
            top = name.partition(".")[0]
            dists = {d.lower().replace("_", "-") for d in owners.get(top, [])}
            if path is None and dists and not dists & closure:
                raise ModuleNotFoundError(f"{name} (from {sorted(dists)}) is not a declared core dependency")
            return None

    sys.meta_path.insert(0, OnlyDeclared())
    import dualpath
    assert "site-packages" in dualpath.__file__ and sys.prefix in dualpath.__file__, dualpath.__file__
    print("deps ok", dualpath.__file__)
""")

QUICK_START = textwrap.dedent("""
    import dualpath

    cfg = dualpath.load_config(env={}, cluster={"block_tokens": 16})
    with dualpath.Session(cfg) as s:
        prompt = list(range(1, 200))
        first = s.run_turn(prompt, gen_tokens=8)
        again = s.run_turn(prompt + first.tokens + [5, 6], gen_tokens=8)
    assert again.hit_tokens == 192 and len(again.tokens) == 8, again
    print("quick start ok", again.hit_tokens, again.path)
""")


@pytest.mark.slow
def test_pip_install_into_a_fresh_venv_then_the_quick_start(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DUALPATH_", "PYTHONPATH"))}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    src = tmp_path / "checkout"  # what a build reads, copied: the build leaves nothing in the working tree
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    res = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-compile", "--no-deps", "--no-index",
                          "--no-build-isolation", str(src)], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run([str(py), "-c", CHECK + QUICK_START], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "deps ok" in res.stdout and "quick start ok 192" in res.stdout
