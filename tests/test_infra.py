"""What the commands leave in a checkout: every folder they make is git-ignored, and infra/screenshot.sh
never overwrites a picture (the README's above all) unless asked to."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "infra" / "screenshot.sh"
# A stand-in for Chromium: writes a small file where `--screenshot=` says (no browser on a test machine).
FAKE_CHROMIUM = """#!/usr/bin/env bash
for arg in "$@"; do
  case "$arg" in --screenshot=*) printf 'PNG %s\\n' "$SHOT_NUMBER" > "${arg#--screenshot=}" ;; esac
done
"""

# What each command makes in the checkout, by the command's own default (README, Makefile, infra/).
MADE_BY_COMMANDS = [
    ".venv/bin/python",  # make
    "wanflow.egg-info/PKG-INFO",  # make (pip install -e)
    "outputs/batch-demo-20260101-000000/fox/fox-s1.mp4",  # make demo, wanflow demo / generate (--out)
    ".wanflow/catalog.db",  # the embedded catalog
    ".prefect/prefect.db",  # make demo's PREFECT_HOME (the local server's state and log)
    ".prefect/wanflow-server.log",
    "run/worker-gpu0.log",  # infra/start-workers.sh
    "run/worker-cpu.pid",
    "run/screenshots/prefect-run-20260101-000000.png",  # infra/screenshot.sh
    "t2v-1.3B_832x480_s42_two_cats.mp4",  # python -m wan.generate
    ".pytest_cache/v/cache/lastfailed",  # pytest
    ".ruff_cache/CACHEDIR.TAG",  # ruff
    "flows/__pycache__/shard.cpython-311.pyc",
    "build/lib/wan/model.py",  # pip wheel . / python -m build
    "dist/wanflow-0.1.0-py3-none-any.whl",
]


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs git")
def test_every_folder_the_commands_make_is_ignored():
    done = subprocess.run(["git", "check-ignore", "--no-index", "--stdin", "-v", "-n"], cwd=REPO, text=True,
                          input="\n".join(MADE_BY_COMMANDS) + "\n", capture_output=True)  # fmt: skip
    not_ignored = [line.split("\t")[-1] for line in done.stdout.splitlines() if line.startswith("::")]
    assert not not_ignored, f"not in .gitignore: {not_ignored}"
    kept = ["docs/prefect-run.png", "infra/screenshot.sh", "flows/run.py", "tests/run/x.py"]
    done = subprocess.run(
        ["git", "check-ignore", "--no-index", *kept], cwd=REPO, text=True, capture_output=True
    )
    assert done.stdout == "", f"ignored but part of the source: {done.stdout}"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A copy of what screenshot.sh needs: the script and a committed picture, under a WANFLOW_HOME."""
    (tmp_path / "infra").mkdir()
    shutil.copy(SCRIPT, tmp_path / "infra" / "screenshot.sh")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "prefect-run.png").write_bytes(b"the committed picture\n")
    chromium = tmp_path / "fake-chromium"
    chromium.write_text(FAKE_CHROMIUM)
    chromium.chmod(0o755)
    return tmp_path


def shoot(home: Path, *args: str, number: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANFLOW_HOME": str(home), "CHROMIUM": str(home / "fake-chromium"),
           "SHOT_NUMBER": str(number)}  # fmt: skip
    env.pop("RUN_DIR", None)
    script = str(home / "infra" / "screenshot.sh")
    return subprocess.run(
        ["bash", script, *args], cwd=home, env=env, text=True, capture_output=True, timeout=60
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_screenshot_never_overwrites_the_committed_picture_unless_asked(home: Path):
    url = "http://127.0.0.1:9/runs/flow-run/x"  # a page given: no API is asked for the newest run
    picture = home / "docs" / "prefect-run.png"
    committed = digest(picture)

    for number in (1, 2):  # no OUT: a new file under run/screenshots/ each time, even within one second
        made = shoot(home, url, number=number)
        assert made.returncode == 0, made.stderr
    shots = sorted((home / "run" / "screenshots").glob("prefect-run-*.png"))
    assert sorted(p.read_text() for p in shots) == ["PNG 1\n", "PNG 2\n"] and digest(picture) == committed

    for out in ("docs/prefect-run.png", str(picture), "docs/../docs/prefect-run.png"):
        refused = shoot(home, out, url)
        assert refused.returncode == 2 and "pass --update" in refused.stderr, refused.stderr
        refused = shoot(home, "--force", out, url)  # --force is for other files, not this one
        assert refused.returncode == 2 and "pass --update" in refused.stderr
    assert digest(picture) == committed

    other = home / "elsewhere.png"
    assert shoot(home, str(other), url).returncode == 0 and other.read_text() == "PNG 1\n"
    refused = shoot(home, str(other), url, number=2)
    assert refused.returncode == 2 and "pass --force" in refused.stderr and other.read_text() == "PNG 1\n"
    assert (
        shoot(home, "--force", str(other), url, number=2).returncode == 0 and other.read_text() == "PNG 2\n"
    )

    assert shoot(home, "--update", "a.png", url).returncode == 2  # --update takes no OUT
    assert shoot(home, "a.png", "b.png").returncode == 2  # one OUT
    updated = shoot(home, "--update", url, number=3)
    assert updated.returncode == 0, updated.stderr
    assert picture.read_text() == "PNG 3\n"
    assert [p.name for p in (home / "docs").iterdir()] == ["prefect-run.png"]  # no partial file left


def test_screenshot_leaves_the_picture_alone_when_chromium_writes_nothing(home: Path):
    (home / "fake-chromium").write_text("#!/usr/bin/env bash\nexit 1\n")
    picture = home / "docs" / "prefect-run.png"
    failed = shoot(home, "--update", "http://127.0.0.1:9/")
    assert failed.returncode == 1 and "wrote nothing" in failed.stderr
    assert picture.read_bytes() == b"the committed picture\n"
    assert [p.name for p in (home / "docs").iterdir()] == ["prefect-run.png"]
