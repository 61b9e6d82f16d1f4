"""The README's first commands: `make demo`'s prompt is the README's, and `make test` installs
Chromium where it can (so the HTML report tests run) without ever failing for it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAKE = shutil.which("make")


def demo_prompt() -> str:
    return re.search(r"^DEMO_PROMPT = (.+)$", (ROOT / "Makefile").read_text(), re.M)[1]


def test_readme_runs_the_demo_prompt():
    prompt = demo_prompt()
    assert "fibonacci" not in prompt
    assert f"printf {prompt} | moe-prefetch run" in (ROOT / "README.md").read_text()


def stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


@pytest.mark.skipif(MAKE is None, reason="needs make")
@pytest.mark.parametrize(
    "present, uid, apt_ok", [(False, 0, True), (False, 0, False), (True, 0, True), (False, 1000, True)]
)
def test_make_chromium_is_best_effort(tmp_path, present, uid, apt_ok):
    log = tmp_path / "apt.log"
    stub(tmp_path, "id", f"echo {uid}")
    fail = "" if apt_ok else '[ "$1" = install ] && exit 100'  # as with no network: update works, install fails
    stub(tmp_path, "apt-get", f'echo "$@" >> {log}; {fail}\nexit 0')
    if present:
        stub(tmp_path, "chromium", "exit 0")
    # Only the stubs on PATH, so a real chromium or apt-get on this machine cannot interfere.
    env = {**os.environ, "PATH": str(tmp_path)}
    result = subprocess.run([MAKE, "-s", "-C", str(ROOT), "chromium"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    calls = log.read_text() if log.exists() else ""
    if present or uid != 0:
        assert calls == "" and result.stdout == "", "nothing to do: silent, no apt-get"
    else:
        assert "install -y -qq chromium" in calls
        assert ("will skip" in result.stdout) == (not apt_ok)


def test_make_test_depends_on_chromium():
    assert re.search(r"^test: .*\bchromium\b", (ROOT / "Makefile").read_text(), re.M)


def test_tiny_config_is_fresh_for_each_caller():
    """A model keeps the config it was built from and may change it (the guards tests set the
    experts implementation): a shared one made test_attach depend on which tests ran first."""
    from tiny_models import make_model, tiny_config

    first = tiny_config("mixtral")
    first.num_local_experts = 3
    make_model("mixtral").set_experts_implementation("eager")
    again = tiny_config("mixtral")
    assert again.num_local_experts == 8 and again is not first
    assert make_model("mixtral").config._experts_implementation != "eager"
