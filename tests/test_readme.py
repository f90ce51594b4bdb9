"""The README's quick start and reference stay true to the code."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from update_readme import render  # noqa: E402


def test_config_reference_matches_dataclasses():
    readme = (ROOT / "README.md").read_text()
    assert render(readme) == readme, "README config reference is stale: run python scripts/update_readme.py"


def test_quick_start_commands_are_make_targets_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert f"make {target}" in readme
        assert re.search(rf"^{target}:", makefile, re.M), f"Makefile has no {target} target"
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_cpu_constraints_pin_torch():
    assert "torch==2.13.0" in (ROOT / "requirements-cpu.txt").read_text()
    assert "torch==" not in (ROOT / "pyproject.toml").read_text()


def test_conda_environment_installs_the_cpu_torch_and_every_dependency():
    import yaml

    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))

    def name(spec):
        return re.split(r"[<>=!\[ ]", spec, maxsplit=1)[0].strip().lower().replace("_", "-")

    # conda-forge's CPU metapackage, and no torch for pip to resolve to PyPI's CUDA build
    assert any(name(d) == "pytorch-cpu" for d in conda)
    assert not any(name(d) in ("pytorch", "pytorch-gpu", "cudatoolkit", "pytorch-cuda") for d in conda)
    assert not any(name(d) == "torch" for d in pip), "pip would install PyPI's default (CUDA) torch wheel"
    # every dependency of pyproject.toml (torch as pytorch-cpu) is in one of the two sections
    text = (ROOT / "pyproject.toml").read_text()
    deps = re.findall(r'^\s+"([^"]+)",$', text.split("dependencies = [")[1].split("]")[0], re.M)
    have = {name(d) for d in conda + pip} | {"torch"}
    missing = [d for d in deps if name(d) not in have]
    assert not missing, f"environment.yml lacks {missing}"
    assert "-e ." in pip
