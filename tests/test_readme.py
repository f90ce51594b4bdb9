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
