"""The shipped demo models, `demo` (Mixtral, 8 experts top-2) and `demo-fine` (Qwen3-MoE, 64
experts top-8), by name: exact against stock transformers with eviction, and through the CLI."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

import moe_prefetch
from moe_prefetch.cli.main import app
from moe_prefetch.errors import ModelNotFoundError
from moe_prefetch.model.folders import DEMO_DIR, DEMOS, resolve_path

DEMO_NAMES = sorted(DEMOS)


def test_demo_fine_is_fine_grained_small_and_shares_the_demo_tokenizer():
    folder = resolve_path("demo-fine")
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "qwen3_moe"
    assert (config.num_experts, config.num_experts_per_tok) == (64, 8)
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 40 * 2**20
    assert (folder / "tokenizer.json").read_bytes() == (DEMO_DIR / "tokenizer.json").read_bytes()
    card = (folder / "README.md").read_text()
    assert "perplexity" in card and "scripts/train_demo_model.py" in card and "scripts/train_demo_adapters.py" in card


def test_unbuilt_demo_names_the_script(monkeypatch, tmp_path):
    monkeypatch.setitem(DEMOS, "demo-fine", tmp_path / "missing")
    with pytest.raises(ModelNotFoundError, match="train_demo_model.py"):
        resolve_path("demo-fine")


@pytest.mark.parametrize("name", DEMO_NAMES)
def test_load_by_name_matches_stock_with_eviction(name):
    stock = AutoModelForCausalLM.from_pretrained(resolve_path(name), dtype=torch.float32).eval()
    top_k = stock.config.num_experts_per_tok
    model, runtime = moe_prefetch.load(
        name, device="cpu", cache_slots=top_k + 2, predictor="m2r2", lookahead=2, dtype=torch.float32
    )
    try:
        ids = torch.tensor([[5, 71, 300, 12, 999, 41, 7, 2048]])
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, stock(ids).logits, atol=1e-4, rtol=0)
        kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        assert torch.equal(model.generate(ids, **kwargs), stock.generate(ids, **kwargs))
        stats = runtime.stats()
        assert stats["evictions"] > 0 and stats["prefetch_issued"] > 0
    finally:
        runtime.detach()


@pytest.mark.parametrize("name", DEMO_NAMES)
def test_cli_run_with_a_small_cache_writes_the_report(name, tmp_path):
    top_k = AutoConfig.from_pretrained(resolve_path(name)).num_experts_per_tok
    args = ["run", "--model", name, "--cache-slots", str(3 * top_k), "--predictor", "m2r2", "--prompt", "import os"]
    result = CliRunner().invoke(app, [*args, "--max-new-tokens", "4", "--device", "cpu", "--report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["summary"]["tokens_generated"] == 4
    assert (tmp_path / "report.html").stat().st_size > 0


def test_cli_eval_predictor_and_bench_on_demo_fine(tmp_path):
    runner = CliRunner()
    data = tmp_path / "heldout.txt"
    text = "import os\n\ndef main(argv):\n    for name in argv:\n        print(os.path.join(name, 'x'))\n"
    data.write_text(text * 24)
    out = tmp_path / "eval.json"
    args = ["eval-predictor", "--model", "demo-fine", "--data", str(data), "--max-tokens", "512", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    recall = json.loads(out.read_text())["predictors"]
    assert {"next-gate", "m2r2"} <= set(recall) and set(recall["m2r2"]["by_distance"]) == {"1", "2", "3"}
    bench = tmp_path / "bench.json"
    args = ["bench", "--model", "demo-fine", "--tokens", "3", "--predictors", "none,m2r2", "--device", "cpu"]
    args += ["--cache-fractions", "0.25", "--profiles", "rtx3060-12gb"]
    result = runner.invoke(app, [*args, "--json", str(bench)])
    assert result.exit_code == 0, result.output
    meta = json.loads(bench.read_text())["meta"]
    assert meta["experts_total"] == 6 * 64 and meta["top_k"] == 8


def test_load_on_cpu_keeps_the_checkpoints_dtype():
    """A bf16 checkpoint stays bf16 on a CPU device (its experts too): built in fp32 it read twice
    the expert bytes and converted them on every use. float16 becomes fp32 there (CPU half
    matmuls are emulated); a `dtype` given wins."""
    model, runtime = moe_prefetch.load("demo-fine", device="cpu", cache_slots=16)
    try:
        assert model.dtype == torch.bfloat16 and runtime.spec.dtype == torch.bfloat16
        assert runtime.stats()["experts_dtype"] == "bfloat16"
    finally:
        runtime.detach()
    model, runtime = moe_prefetch.load("demo", device="cpu", cache_slots=16)  # saved as float16
    try:
        assert model.dtype == torch.float32 and runtime.spec.dtype == torch.float32
    finally:
        runtime.detach()
