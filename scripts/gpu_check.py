"""The GPU check in one call: every CUDA figure this project needs, in at most 6 minutes.

    PYTHONPATH=. python3 scripts/gpu_check.py [--budget 330] [--only NAME ...] [--device cpu]

Runs the checks of scripts/gpu_checks.py (exactness in bf16 against stock for each on_miss;
compressed experts decoded on the device against the CPU's decode; synchronisations per MoE
layer beyond stock; pinned link GB/s and copy/compute overlap inside the runtime; memory before
attach, after a long generate and after detach; per-layer lane times beside the simulator's;
a streaming decode bench; the CUDA tests), each in its own process under its own time cap, so
one that fails, hangs or breaks the CUDA context does not stop the rest. Prints one line per
check as it ends and writes everything as JSON to $OUT/gpu_check.json when OUT is set, else
runs/gpu_check.json (rewritten after every check, so a run cut short keeps what it measured).

Needs only torch and transformers (and psutil, numpy, safetensors) of the machine: nothing
installed from this repository. Without CUDA each CUDA check is reported as skipped with the
reason; `--device cpu` instead runs the checks that can run on a CPU, small (a dry run of
their code). Exits 1 when a check failed, errored or ran out of time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python3 scripts/gpu_check.py` from a bare checkout
    sys.path.insert(0, str(ROOT))

SCHEMA = "moe-prefetch/gpu-check"
VERSION = 1
BUDGET_S = 330  # of the 6 minutes a device run gets; the rest for start-up and transfers
MIN_START_S = 10  # a check is not started with less than this left


def _environment() -> dict:
    import torch
    import transformers

    import moe_prefetch

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "cuda_available": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "cpu_count": os.cpu_count(),
        # where the package came from: this checkout, not an installed copy
        "moe_prefetch_from": str(Path(moe_prefetch.__file__).resolve().parent),
    }


def _output_path() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "gpu_check.json" if out else ROOT / "runs" / "gpu_check.json"


def _write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, path)


def _run_one(name: str, device: str, small: bool, result: Path) -> int:
    """Child process: one check, its result as JSON in `result`."""
    import logging

    import gpu_checks  # scripts/ is on sys.path: this file's folder
    import torch

    # The library's warnings stay visible (an unpinned store makes every link figure pageable);
    # the small-cache warning is what these checks ask for, and transformers' chatter is noise.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for logger in ("transformers", "moe_prefetch.runtime.sizing"):
        logging.getLogger(logger).setLevel(logging.ERROR)

    fn, _ = gpu_checks.CHECKS[name]
    began = time.perf_counter()
    outcome = fn(torch.device(device), small)
    outcome["seconds"] = time.perf_counter() - began
    result.write_text(json.dumps(outcome, default=str))
    return 0


def _child(name: str, device: str, small: bool, cap: float) -> dict:
    """Run check `name` in its own process (its own CUDA context) for at most `cap` seconds."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--device", device]
        command += ["--result", str(result)] + (["--small"] if small else [])
        began = time.perf_counter()
        # its own session: on a timeout the whole group goes (pytest's children too)
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            output, _ = proc.communicate(timeout=cap)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            timed_out = True
        seconds = time.perf_counter() - began
        text = output.decode(errors="replace")
        if timed_out:
            return {"status": "timeout", "summary": f"stopped at its cap of {cap:.0f} s", "seconds": seconds,
                    "log": text[-3000:]}  # fmt: skip
        if proc.returncode != 0 or not result.exists():
            last = [line for line in text.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
            return {"status": "error", "summary": last[0][:300], "seconds": seconds, "log": text[-6000:]}
        outcome = json.loads(result.read_text())
        outcome["seconds"] = seconds  # with the process's start: what the budget pays
        if text.strip():
            outcome["log"] = text[-3000:]
        return outcome


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all checks together")
    parser.add_argument("--only", nargs="+", default=None, help="run only these checks, in this order")
    parser.add_argument("--device", default=None, help="cuda (the default when there is one) or cpu (a dry run)")
    parser.add_argument("--small", action="store_true", help="small shapes (the default on a CPU)")
    parser.add_argument(
        "--cap-scale", type=float, default=None, help="multiply each check's time cap (default: 1 on CUDA, 5 on a CPU)"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    if args.child:
        return _run_one(args.child, args.device, args.small, Path(args.result))

    import gpu_checks
    import torch

    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = args.device or ("cuda" if cuda else None)
    small = args.small or device == "cpu"
    scale = args.cap_scale or (5.0 if device == "cpu" else 1.0)  # the caps are sized for the GPU machine
    names = args.only or list(gpu_checks.CHECKS)
    unknown = [n for n in names if n not in gpu_checks.CHECKS]
    if unknown:
        parser.error(f"unknown check(s) {', '.join(unknown)}; the checks are {', '.join(gpu_checks.CHECKS)}")
    if device is not None and device.startswith("cuda") and not cuda:
        parser.error(f"--device {device} but torch {torch.__version__} sees no CUDA device")
    path = _output_path()
    report = {
        "schema": SCHEMA,
        "version": VERSION,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": device or "none",
        "small": small,
        "budget_s": args.budget,
        "environment": _environment(),
        "checks": {},
    }
    print(f"gpu-check: {report['environment']['gpu'] or 'no CUDA device'}, torch {torch.__version__}, "
          f"transformers {report['environment']['transformers']}; writing {path}", flush=True)  # fmt: skip
    failed = False
    # Files the checks share (the CPU lane measured by `cpulane`, read by lanes and bench): fresh
    # for each run, so a figure never comes from an earlier run or another machine.
    os.environ["GPU_CHECK_SHARED"] = tempfile.mkdtemp(prefix="gpu-check-")
    for name in names:
        _, cap = gpu_checks.CHECKS[name]
        cap *= scale
        left = args.budget - (time.perf_counter() - started)
        if device is None:
            outcome = gpu_checks.skipped(f"no CUDA device: torch {torch.__version__} (CUDA build {torch.version.cuda})"
                                         " sees none; run on a GPU machine, or --device cpu for a dry run")  # fmt: skip
        elif device == "cpu" and name in gpu_checks.CUDA_ONLY:
            outcome = gpu_checks.skipped(f"{name} measures CUDA behaviour; skipped in a dry run on the CPU")
        elif left < MIN_START_S:
            outcome = {"status": "timeout", "summary": f"not started: {left:.0f} s of the budget left", "seconds": 0}
        else:
            outcome = _child(name, device, small, min(cap, left))
        report["checks"][name] = outcome
        failed |= outcome["status"] in ("fail", "error", "timeout")
        print(f"[{outcome['status']}] {name} ({outcome.get('seconds', 0):.0f} s): {outcome['summary']}", flush=True)
        if outcome["status"] in ("error", "timeout") and outcome.get("log"):
            print("    " + "\n    ".join(outcome["log"].strip().splitlines()[-15:]), flush=True)
        report["seconds"] = time.perf_counter() - started
        _write(path, report)
    counts = {}
    for outcome in report["checks"].values():
        counts[outcome["status"]] = counts.get(outcome["status"], 0) + 1
    report["seconds"] = time.perf_counter() - started
    report["verdict"] = "failed" if failed else "passed"
    _write(path, report)
    tally = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    print(f"gpu-check {report['verdict']} in {report['seconds']:.0f} s: {tally}; JSON in {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
