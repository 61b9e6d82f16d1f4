import logging
import os
import re
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
logging.getLogger("transformers").setLevel(logging.ERROR)
# Tiny models: one intra-op thread. With more, OpenMP workers spin-wait on a shared CPU and a
# tiny model's step takes 10-50x longer (measured: mixtral tiny generate 8 s vs 0.01 s).
torch.set_num_threads(1)
# Quantized copies of the demos go to a cache folder (moe_prefetch/model/quantized_copy.py): a fresh one
# per session, so tests never read a copy an earlier run left and never fill ~/.cache.
os.environ.setdefault("MOE_PREFETCH_CACHE", tempfile.mkdtemp(prefix="moe-prefetch-cache-"))

from tiny_models import make_model, save_model  # noqa: E402

if "mutmut" in sys.modules:
    # make mutate forks each mutant's test run from a server that has collected the tests. The first
    # tiny model of a type costs ~1.6 s of CPU (transformers imports its code on first use; 5 ms
    # after): build one of each type the modules' own tests use here, once, not once per mutant.
    _rng = torch.random.get_rng_state()
    for _model_type in ("mixtral", "olmoe", "qwen3_moe"):
        make_model(_model_type)
    torch.random.set_rng_state(_rng)


@pytest.fixture(autouse=True)
def restore_logging():
    """Each test starts from the same logging: `logging.disable` undone, and the package's logger
    back to its level and handlers (the CLI sets both). Tests that read warnings must not depend
    on which tests ran before them."""
    disabled = logging.root.manager.disable
    package = logging.getLogger("moe_prefetch")
    level, handlers = package.level, list(package.handlers)
    yield
    logging.disable(disabled)
    package.setLevel(level)
    package.handlers[:] = handlers


# `make mutate`: each mutated module against its own tests (mutmut picks, per mutant, the tests of
# its selection that reach the function; this narrows them to the module's own files, so a
# survivor costs seconds, not the minutes of every end-to-end test that happens to pass through).
OWN_TESTS = {
    "moe_prefetch.runtime.scheduler": ("test_scheduler.py", "test_uploads.py", "test_fast_path.py"),
    "moe_prefetch.runtime.cache": ("test_cache.py", "test_policies.py", "test_scheduler.py", "test_fast_path.py"),
    "moe_prefetch.runtime.placement": ("test_hybrid.py", "test_uploads.py"),
    "moe_prefetch.runtime.uploads": ("test_uploads.py",),
    "moe_prefetch.predict.evaluate": ("test_evaluate.py", "test_m2r2.py"),
    "moe_prefetch.predict.m2r2": ("test_m2r2.py",),
    "moe_prefetch.report.profiling": ("test_profiling.py",),
}


def _keep_own_tests(config, items) -> None:
    """Under mutmut: never the tests marked e2e (a demo model or a CLI run costs seconds per
    mutant, over a thousand mutants, and the modules' unit tests pin the same rules; a mutant
    only e2e tests would kill survives, and tests/mutation_survivors.md says so), and for a
    mutant (MUTANT_UNDER_TEST names it) only its module's own test files."""
    if "mutmut" not in sys.modules:
        return
    match = re.match(r"(.*?)\.x[_\u01c1]", os.environ.get("MUTANT_UNDER_TEST", ""))
    own = OWN_TESTS.get(match.group(1)) if match else None
    kept = [
        item
        for item in items
        if (own is None or item.path.name in own) and item.get_closest_marker("e2e") is None  # stats too
    ]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept


def pytest_collection_modifyitems(config, items):
    _keep_own_tests(config, items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class _Checkpoints(dict):
    """model type -> (folder, stock model), saved with `save_pretrained` on first use."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, model_type):
        folder = self.root / model_type
        self[model_type] = (folder, save_model(model_type, folder))
        return self[model_type]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """model type -> (folder, stock model) for any architecture in tiny_models, each saved once."""
    return _Checkpoints(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture
def host_lane_beside_the_device(monkeypatch):
    """`auto` places misses as on a machine whose host lane runs beside the device (no cost
    for splitting a layer between lanes), so layer calls that mix host and device experts are
    checked. On a CPU device the runtime counts that cost and copies small experts instead
    (tests/test_hybrid.py::test_on_a_cpu_device_auto_copies_small_experts_and_runs_large_ones_in_place)."""
    monkeypatch.setattr("moe_prefetch.runtime.runtime.CPU_SPLIT_CALL_S", 0.0)
