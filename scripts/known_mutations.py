"""Mistakes the suite once let through (issue 24), applied one at a time to a copy of the package,
each against the tests that must now catch it. Run by `make mutate` before the mutation tool.

Each mutation is an exact text replacement in one module. The working tree is never touched: the
package and tests are copied to a temporary folder, the copy's module is changed, pytest runs
there, and the module is put back before the next one. A mutation whose text no longer appears
(the code changed) is reported as stale: update it here, keeping its intent.

    python scripts/known_mutations.py            # all; exit 1 if any survives or is stale
    python scripts/known_mutations.py scheduler  # only those whose name contains "scheduler"
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments: the tests that must fail


MUTATIONS = [
    Mutation(
        "m2r2 training: no optimizer step",
        "moe_prefetch/predict/m2r2.py",
        "    opt.step()\n",
        "",
        ("tests/test_m2r2.py", "-k", "training or resumes"),
    ),
    Mutation(
        "evaluate: every recall halved",
        "moe_prefetch/predict/evaluate.py",
        "recall = (_overlap(pred_k, actual) / k).mean().item()",
        "recall = (_overlap(pred_k, actual) / k).mean().item() / 2",
        ("tests/test_evaluate.py",),
    ),
    Mutation(
        "evaluate: previous-token's margin wraps to another sequence's token",
        "moe_prefetch/predict/evaluate.py",
        'torch.roll(data.get("chosen", target), 2, 0).masked_fill(~has_prev2[:, None], -1)[rows]',
        'torch.roll(data.get("chosen", target), 2, 0)[rows]',
        ("tests/test_evaluate.py",),
    ),
    Mutation(
        "profiling: decode tokens/s doubled",
        "moe_prefetch/report/profiling.py",
        '"decode_tokens_per_s": _ratio(len(decode), decode_wall)',
        '"decode_tokens_per_s": _ratio(2 * len(decode), decode_wall)',
        ("tests/test_profiling.py",),
    ),
    Mutation(
        "profiling: H2D bytes/s doubled",
        "moe_prefetch/report/profiling.py",
        'h2d, h2d_basis = _ratio(sum(e["bytes"] for e in timed), busy)',
        'h2d, h2d_basis = _ratio(2 * sum(e["bytes"] for e in timed), busy)',
        ("tests/test_profiling.py",),
    ),
    Mutation(
        "profiling: decode hit rate counts the prefill",
        "moe_prefetch/report/profiling.py",
        'decode_hits, decode_misses = sum(t["hits"] for t in decode), sum(t["misses"] for t in decode)',
        'decode_hits, decode_misses = sum(t["hits"] for t in tokens), sum(t["misses"] for t in tokens)',
        ("tests/test_profiling.py",),
    ),
    Mutation(
        "bench: decode hit rate counts the prefill",
        "moe_prefetch/evidence/bench.py",
        'touches nearly every expert."""\n    decode = [r for r in trace if r["step"] > warmup]',
        'touches nearly every expert."""\n    decode = [r for r in trace if r["step"] >= warmup]',
        ("tests/test_hybrid.py", "-k", "bench_hit_rate"),
    ),
    Mutation(
        "scheduler: prefetch protection removed",
        "moe_prefetch/runtime/scheduler.py",
        "        return protected\n",
        "        return lambda key: False\n",
        ("tests/test_scheduler.py",),
    ),
    Mutation(
        "scheduler: stale prefetches not demoted",
        "moe_prefetch/runtime/scheduler.py",
        "            self.cache.demote((layer_idx, expert_id))",
        "            pass",
        ("tests/test_scheduler.py",),
    ),
    Mutation(
        "runtime: a store-sized buffer leaked on every detach",
        "moe_prefetch/runtime/runtime.py",
        "        self.store.close()\n",
        "        globals().setdefault('_LEAKED', []).append(torch.ones(self.store.nbytes, dtype=torch.uint8))\n"
        "        self.store.close()\n",
        ("tests/test_memory.py", "-k", "attach_detach and cpu"),
    ),
    Mutation(
        "runtime: 3 MiB leaked on every detach",
        "moe_prefetch/runtime/runtime.py",
        "        self.store.close()\n",
        "        globals().setdefault('_LEAKED', []).append(torch.ones(3 * 2**20, dtype=torch.uint8))\n"
        "        self.store.close()\n",
        ("tests/test_memory.py", "-k", "attach_detach and cpu"),
    ),
    Mutation(
        "host lane: int8 projections scaled by 0.9",
        "moe_prefetch/experts/host_kernels.py",
        'return torch._weight_int8pack_mm(x, parts["q"], scale)',
        'return torch._weight_int8pack_mm(x, parts["q"], scale) * 0.9',
        ("tests/test_compression.py", "-k", "host_lane_reads_int8 and torch"),
    ),
    Mutation(
        "host lane: the compiled int8 kernel scales by 0.9 (its self-check must refuse it)",
        "moe_prefetch/experts/cpu_kernels.c",
        "int8_dot(xf, q + r * k, k) * scale[r]",
        "int8_dot(xf, q + r * k, k) * scale[r] * 0.9f",
        ("tests/test_cpu_kernels.py", "-k", "host_lane_runs_the_compiled_int8"),
    ),
]


def _pytest(folder: Path, args, log) -> int:
    env = {**os.environ, "PYTHONPATH": str(folder), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *args]
    return subprocess.run(cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT).returncode


def main(argv: list[str]) -> int:
    chosen = [m for m in MUTATIONS if not argv or any(a in m.name for a in argv)]
    with tempfile.TemporaryDirectory(prefix="known-mutations-") as tmp:
        folder = Path(tmp)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for name in ("moe_prefetch", "tests"):
            shutil.copytree(ROOT / name, folder / name, ignore=ignore)
        shutil.copy(ROOT / "pyproject.toml", folder)
        log_path = ROOT / "mutants-known.log"
        failures = 0
        with open(log_path, "w") as log:
            start = time.perf_counter()
            for tests in dict.fromkeys(m.tests for m in chosen):  # each selection once, in order
                log.write(f"== baseline: {' '.join(tests)}\n")
                log.flush()
                if _pytest(folder, tests, log) != 0:
                    print(f"the unchanged code fails {' '.join(tests)}; see {log_path}")
                    return 1
            print(f"baseline: the unchanged code passes every selection ({time.perf_counter() - start:.0f} s)")
            for mutation in chosen:
                target = folder / mutation.path
                original = target.read_text()
                if original.count(mutation.old) != 1:
                    print(f"STALE     {mutation.name}: the text to replace is not in {mutation.path} once")
                    failures += 1
                    continue
                target.write_text(original.replace(mutation.old, mutation.new))
                try:
                    log.write(f"\n== {mutation.name}: {' '.join(mutation.tests)}\n")
                    log.flush()
                    start = time.perf_counter()
                    code = _pytest(folder, mutation.tests, log)
                finally:
                    target.write_text(original)
                seconds = time.perf_counter() - start
                if code == 1:
                    print(f"caught    {mutation.name} ({seconds:.0f} s)")
                else:
                    verdict = "SURVIVED " if code == 0 else f"ERROR {code}  "
                    print(f"{verdict}{mutation.name}: {' '.join(mutation.tests)} ({seconds:.0f} s)")
                    failures += 1
        print(f"log: {log_path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
