"""The GPU check (scripts/gpu_check.py) as a bare GPU machine runs it: from a checkout with
nothing installed, `PYTHONPATH=. python3 scripts/gpu_check.py`. Without CUDA it ends at once,
each CUDA check reported as skipped with the reason, in the JSON it writes to $OUT."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the check runs for real (minutes)")


def _checkout(tmp_path) -> Path:
    """The tracked folders a checkout has, copied without any install or build output."""
    tree = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache")
    for folder in ("moe_prefetch", "scripts", "tests"):
        shutil.copytree(ROOT / folder, tree / folder, ignore=ignore)
    return tree


def _env(tree: Path, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OUT")}
    return {**env, "PYTHONPATH": ".", "OUT": str(out)}


def test_runs_end_to_end_without_cuda_from_a_bare_checkout(tmp_path):
    tree = _checkout(tmp_path)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "scripts/gpu_check.py"], cwd=tree, env=_env(tree, out), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["schema"] == "moe-prefetch/gpu-check" and report["verdict"] == "passed"
    # the package came from the checkout on PYTHONPATH, not from an installed copy
    assert Path(report["environment"]["moe_prefetch_from"]) == (tree / "moe_prefetch").resolve()
    names = ["exactness", "decode", "syncs", "link", "memory", "cpulane", "lanes", "bench", "tests"]
    assert list(report["checks"]) == names
    for name, check in report["checks"].items():
        assert check["status"] == "skipped", name
        assert check["summary"].startswith("no CUDA device: torch"), check["summary"]
        assert f"[skipped] {name}" in proc.stdout


def test_the_shell_entry_point_puts_the_checkout_on_the_path(tmp_path):
    tree = _checkout(tmp_path)
    out = tmp_path / "out"
    env = {**_env(tree, out), "PY": sys.executable}
    env.pop("PYTHONPATH")
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--only", "decode"], cwd=tree, env=env, text=True,
                          capture_output=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert list(report["checks"]) == ["decode"]
    assert Path(report["environment"]["moe_prefetch_from"]) == (tree / "moe_prefetch").resolve()


def _runner():
    spec = importlib.util.spec_from_file_location("gpu_check_runner", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_check_that_breaks_or_overruns_is_reported_not_fatal():
    """Each check runs in its own process under its cap: one that raises is an error with its
    last line, one that overruns is stopped (with its children) and reported as a timeout."""
    runner = _runner()
    broken = runner._child("no-such-check", "cpu", True, cap=60)
    assert broken["status"] == "error" and "KeyError" in broken["summary"]
    slow = runner._child("memory", "cpu", True, cap=1)
    assert slow["status"] == "timeout" and slow["seconds"] < 30


def test_lanes_and_bench_simulate_with_the_cpu_lane_measured_in_the_same_run(tmp_path, monkeypatch):
    """The first GPU run simulated with a desktop's CPU lane and came out 3.3x optimistic: the
    `cpulane` check's figures, shared through the run's folder, replace the desktop's three
    CPU-lane times for the lanes and bench checks; without them, the desktop's stand, said so."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import gpu_checks

    monkeypatch.setenv("GPU_CHECK_SHARED", str(tmp_path))
    desktop, measured = gpu_checks._host_profile()
    assert not measured
    lane = {"framework_layer_s": 1.5e-3, "runtime_layer_s": 2.5e-4, "framework_token_s": 4e-3}
    (tmp_path / "cpu_lane.json").write_text(json.dumps({**lane, "lane_layers": 8}))
    host, measured = gpu_checks._host_profile()
    assert measured and host.name != desktop.name
    assert {k: getattr(host, k) for k in lane} == lane
    assert host.expert_bytes_per_s == desktop.expert_bytes_per_s  # the rest is the desktop's
