"""Load time with int4/int8 experts: quantizing at load (and writing the copy) against reading
the quantized copy, on a copy of a checkpoint folder (default: the demo). Prints seconds.

    PYTHONPATH=. python scripts/bench_quantized_copy.py [--model demo] [--repeats 3]
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import moe_prefetch
from moe_prefetch.model.folders import resolve_path


def timed_load(folder: Path, experts_dtype: str) -> float:
    start = time.perf_counter()
    _, runtime = moe_prefetch.load(folder, device="cpu", cache_slots=12, experts_dtype=experts_dtype)
    seconds = time.perf_counter() - start
    runtime.detach()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        shutil.copytree(resolve_path(args.model), folder, ignore=shutil.ignore_patterns("moe_prefetch"))
        timed_load(folder, "auto")  # warm the page cache and the imports
        print(f"auto (no copy): {min(timed_load(folder, 'auto') for _ in range(args.repeats)):.3f} s")
        for experts_dtype in ("int8", "int4"):
            quantizing, reading = [], []
            for _ in range(args.repeats):
                shutil.rmtree(folder / "moe_prefetch", ignore_errors=True)
                quantizing.append(timed_load(folder, experts_dtype))
                reading.append(timed_load(folder, experts_dtype))
            print(
                f"{experts_dtype}: quantize at load and write the copy {min(quantizing):.3f} s, "
                f"read the copy {min(reading):.3f} s (best of {args.repeats})"
            )


if __name__ == "__main__":
    main()
