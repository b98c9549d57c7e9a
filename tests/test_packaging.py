"""What the package asks of the machines people run it on: Python 3.11 and 3.12, and a torch range that takes
the CUDA builds they use as well as the CPU wheel `make` installs here."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirement(name: str) -> Requirement:
    found = [Requirement(r) for r in PROJECT["dependencies"] if Requirement(r).name == name]
    assert len(found) == 1, (name, found)
    return found[0]


def test_python_311_and_312_are_accepted():
    python = SpecifierSet(PROJECT["requires-python"])
    assert "3.11.9" in python and "3.12.4" in python


def test_torch_is_a_range_that_takes_the_builds_people_run():
    torch = _requirement("torch").specifier
    for version in ("2.6.0", "2.11.0", "2.13.0"):  # the H200 machine runs 2.11; these machines 2.13
        assert torch.contains(version), (version, str(torch))
    assert torch.contains("2.13.0+cpu") and torch.contains("2.11.0+cu130")  # local build tags too


def test_make_keeps_an_installed_torch_and_installs_the_cpu_wheel_otherwise():
    makefile = (ROOT / "Makefile").read_text()
    line = next(line for line in makefile.splitlines() if "torch==" in line)
    assert "import torch" in line and "||" in line, line  # pip runs only when .venv has no torch
    assert _requirement("torch").specifier.contains(line.split("torch==")[1].split('"')[0])
