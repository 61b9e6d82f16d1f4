"""Run the suite against the installed transformers and say what changed upstream.

`make test-latest` installs the newest transformers into .venv-latest and runs this. It prints,
per architecture of transformers' experts interface, whether it is new since the tested list
(`SUPPORTED`) and whether its exactness test passes, then the suite's totals. Moving the pin in
constraints.txt is then a decision taken on that table, not a surprise on a fresh clone.

    python scripts/upstream_check.py [pytest args...]   # default: the whole suite
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_exactness import SKIPPED  # noqa: E402
from tiny_models import interface_model_types, pinned_version  # noqa: E402

from moe_prefetch.experts.layout import SUPPORTED  # noqa: E402

_EXACTNESS = re.compile(r"test_load_matches_stock\[(?P<arch>\w+)-\w+\]")


class Outcomes:
    """pytest plugin: each test's outcome, and the first line of each failure."""

    def __init__(self):
        self.by_test: dict[str, str] = {}
        self.reason: dict[str, str] = {}

    def pytest_runtest_logreport(self, report):
        if report.failed or report.when == "call" or (report.when == "setup" and report.skipped):
            if self.by_test.get(report.nodeid) != "failed":
                self.by_test[report.nodeid] = report.outcome
            if report.failed and report.nodeid not in self.reason:
                text = str(report.longrepr).strip().splitlines()
                errors = [line for line in text if line.startswith("E ")]
                self.reason[report.nodeid] = (errors[0][2:].strip() if errors else text[-1])[:160]


def main(argv: list[str]) -> int:
    outcomes = Outcomes()
    code = pytest.main(argv or ["-q", "-p", "no:cacheprovider", str(ROOT / "tests")], plugins=[outcomes])

    arch_outcome: dict[str, set[str]] = defaultdict(set)
    arch_reason: dict[str, str] = {}
    for nodeid, outcome in outcomes.by_test.items():
        match = _EXACTNESS.search(nodeid)
        if match:
            arch_outcome[match["arch"]].add(outcome)
            if nodeid in outcomes.reason:
                arch_reason.setdefault(match["arch"], outcomes.reason[nodeid])

    available = set(interface_model_types())
    tested = sorted(available - set(SKIPPED))
    print(f"\ntransformers {transformers.__version__} (pinned in constraints.txt: {pinned_version('transformers')})")
    print(f"{'architecture':<22} {'status':<10} exactness")
    for arch in tested:
        status = "new" if arch not in SUPPORTED else "supported"
        results = arch_outcome.get(arch, set())
        verdict = "failed" if "failed" in results else ("passed" if "passed" in results else "not run")
        line = f"{arch:<22} {status:<10} {verdict}"
        if verdict == "failed":
            line += f": {arch_reason.get(arch, '')}"
        if status == "new" or verdict != "passed":
            print(line)
    gone = sorted(set(SUPPORTED) - available)
    counts = defaultdict(int)
    for outcome in outcomes.by_test.values():
        counts[outcome] += 1
    new = [a for a in tested if a not in SUPPORTED]
    failing = [a for a in tested if "failed" in arch_outcome.get(a, set())]
    print(
        f"{len(tested)} architectures tested: {len(new)} new ({', '.join(new) or 'none'}), "
        f"{len(failing)} failing ({', '.join(failing) or 'none'}); "
        f"supported but absent from this release: {', '.join(gone) or 'none'}"
    )
    print(f"suite: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
    return int(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
