"""Issue 12, "first hour of a new user": each rough edge found trying the project from a fresh
clone, through typer's CliRunner (user mistakes: exit 2, one line, no traceback)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from test_cli import assert_one_line_error, make_checkpoint
from tiny_models import save_model
from typer.main import get_command
from typer.testing import CliRunner

from moe_prefetch.cli.main import app
from moe_prefetch.report import html as report_html
from moe_prefetch.report import profiling

BASE = ["run", "--device", "cpu", "--max-new-tokens", "4"]


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    """A 2-layer top-2 Mixtral (vocab 320) with its tokenizer."""
    return make_checkpoint(tmp_path_factory.mktemp("tokenized"))


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """A Qwen3-MoE (vocab 96) saved by save_pretrained alone: transformers reads an empty tokenizer."""
    folder = tmp_path_factory.mktemp("bare")
    save_model("qwen3_moe", folder)
    return folder


@pytest.fixture()
def runner(monkeypatch, tmp_path):
    monkeypatch.delenv("MOE_PREFETCH_DEBUG", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return CliRunner()


def untokenized_copy(folder, dest):
    dest.mkdir()
    for f in folder.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, dest / f.name)
    return dest


# -- 1. a saved model without a tokenizer ------------------------------------------------------
def test_folder_without_tokenizer_says_what_to_do(bare, runner):
    result = runner.invoke(app, [*BASE, "--model", str(bare), "--prompt", "def f(x):"])
    assert_one_line_error(result, "no usable tokenizer", "--tokenizer", "--prompt-ids")


def test_tokenizer_option_takes_a_folder_or_a_tokenizer_json(tokenized, runner, tmp_path):
    model = untokenized_copy(tokenized, tmp_path / "model")
    outputs = []
    for source in (tokenized, tokenized / "tokenizer.json"):
        result = runner.invoke(
            app, [*BASE, "--model", str(model), "--tokenizer", str(source), "--prompt", "def f(x):", "--json"]
        )
        assert result.exit_code == 0, result.output
        outputs.append(json.loads(result.stdout)["text"])
    assert outputs[0] and outputs[0] == outputs[1]


def test_prompt_ids_run_a_checkpoint_without_tokenizer(bare, runner, tmp_path):
    result = runner.invoke(
        app, [*BASE, "--model", str(bare), "--prompt-ids", "5,6,7", "--cache-slots", "6", "--report", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    shown = result.stdout.split()
    assert shown[:3] == ["5", "6", "7"] and len(shown) == 3 + 4 and all(s.isdigit() for s in shown), result.stdout
    run = profiling.load_run(tmp_path)
    assert run["config"]["prompt_tokens"] == 3 and run["summary"]["tokens_generated"] == 4


@pytest.mark.parametrize("ids, needle", [("1,x", "comma-separated token ids"), ("", "one or more token ids")])
def test_bad_prompt_ids_are_one_line(bare, runner, ids, needle):
    assert_one_line_error(runner.invoke(app, [*BASE, "--model", str(bare), "--prompt-ids", ids]), needle)


# -- 2. a tokenizer of another model -----------------------------------------------------------
def test_ids_beyond_the_vocabulary_name_both_sides(bare, tokenized, runner):
    result = runner.invoke(
        app, [*BASE, "--model", str(bare), "--tokenizer", str(tokenized), "--prompt", "def fibonacci(n):"]
    )
    assert_one_line_error(result, "vocabulary has 96 ids", f"the tokenizer of {tokenized}", "--tokenizer")
    result = runner.invoke(app, [*BASE, "--model", str(bare), "--prompt-ids", "1,96"])
    assert_one_line_error(result, "--prompt-ids gives token id 96", "vocabulary has 96 ids")


# -- 4. simulate takes the report folder, as report does ------------------------------------------
@pytest.fixture(scope="module")
def small_cache_run(tokenized, tmp_path_factory):
    """2 slots for 2 MoE layers at top-2: below the 4 the routing needs to reuse anything."""
    out = tmp_path_factory.mktemp("small")
    result = CliRunner().invoke(
        app, [*BASE, "--model", str(tokenized), "--prompt", "def f(x):", "--cache-slots", "2", "--report", str(out)]
    )
    assert result.exit_code == 0, result.output
    return result, out


def test_simulate_accepts_the_report_folder(small_cache_run, runner):
    result = runner.invoke(app, ["simulate", "--trace", str(small_cache_run[1]), "--profile", "rtx4090-24gb"])
    assert result.exit_code == 0, result.output
    # 11. a hit rate is a percentage, as everywhere else
    assert re.search(r"hit rate \d+\.\d%", result.stdout), result.stdout


# -- 5. messages fit where they are raised ---------------------------------------------------------
@pytest.mark.parametrize(
    "args, needles, absent",
    [
        (["--cache-budget", "1KB"], ["--cache-budget 1KB", "raise --cache-budget"], "slots to"),
        (["--cache-budget", "0"], ["--cache-budget 0 must be positive"], "size '0'"),
        (["--cache-slots", "1"], ["--cache-slots 1 is below top_k=2", "raise --cache-slots to >= 2"], "budget"),
        (["--device", "gpu"], ["--device gpu", "cuda:N"], "device="),
    ],
)
def test_cli_messages_name_the_option_given(tokenized, runner, args, needles, absent):
    result = runner.invoke(app, [*BASE, "--model", str(tokenized), "--prompt", "x", *args])
    assert_one_line_error(result, *needles)
    assert absent not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cli_device_error_speaks_in_options(tokenized, runner):
    result = runner.invoke(app, ["run", "--model", str(tokenized), "--prompt", "x", "--device", "cuda"])
    assert_one_line_error(result, "use --device cpu or --device auto")


# -- 6. a cache below top_k x MoE layers -------------------------------------------------------------
def test_small_cache_is_warned_in_run_and_in_reports(small_cache_run, runner):
    result, out = small_cache_run
    flat = " ".join(result.stderr.split())
    assert flat.count("below top_k x MoE layers = 2 x 2 = 4") == 1, result.stderr
    shown = runner.invoke(app, ["report", str(out)])
    assert shown.exit_code == 0 and "below top_k x MoE layers" in " ".join(shown.stdout.split())
    assert "below top_k x MoE layers = 2 x 2 = 4" in (out / "report.html").read_text()


def test_reports_note_a_layer_that_never_hit(small_cache_run):
    from moe_prefetch.report import text as report_text

    run = profiling.load_run(small_cache_run[1])
    run["layers"][0].update(hits=5, misses=2)
    run["layers"][1].update(hits=0, misses=7)
    run["stats"]["cache_slots"] = 99  # large enough: only the 0% note remains
    notes = report_text.notes(run)
    assert notes == ["MoE layer(s) 1 had a 0% hit rate: every expert they used was copied in on demand"]
    assert notes[0] in report_html.render_html(run)


# -- 7. the demo reads as a demo ------------------------------------------------------------------------
def test_prompt_is_echoed_and_in_the_report(small_cache_run):
    result, out = small_cache_run
    run = profiling.load_run(out)
    assert result.stdout.startswith("def f(x):") and result.stdout.strip() == ("def f(x):" + run["text"]).strip()
    assert '<span class="prompt">def f(x):</span>' in (out / "report.html").read_text()


def test_quiet_prints_only_the_generated_text(tokenized, runner):
    result = runner.invoke(app, [*BASE, "--model", str(tokenized), "--prompt", "def f(x):", "--quiet"])
    assert result.exit_code == 0 and not result.stdout.startswith("def f(x):") and result.stdout.strip()


def test_demo_says_what_it_is(runner, tmp_path):
    result = runner.invoke(app, [*BASE, "--prompt", "import os", "--cache-slots", "12", "--report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "demo model: a 12M-parameter Mixtral" in result.stderr
    assert "trained for 30 minutes on the Python standard library" in (tmp_path / "report.html").read_text()


# -- 8. --data demo-heldout ---------------------------------------------------------------------------
def test_eval_predictor_on_the_demo_heldout_split(runner, tmp_path):
    from moe_prefetch.predict import corpus

    args = ["eval-predictor", "--data", "demo-heldout", "--max-tokens", "256", "--lookahead", "1", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--json", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "e.json").read_text())["data"]
    assert written == [str(corpus.split_file("heldout"))] and str(tmp_path / "cache") in written[0]
    assert corpus.split_file("heldout").read_text(encoding="utf-8") == corpus.read_corpus("heldout")


def test_train_predictor_names_the_train_split(monkeypatch):
    from moe_prefetch.cli import predictor_cmds

    monkeypatch.setattr("moe_prefetch.predict.corpus.split_file", lambda split: f"<{split} file>")
    assert predictor_cmds._data_files(["demo-train", "mine.txt"]) == ["<train file>", "mine.txt"]


# -- 10. help and options -----------------------------------------------------------------------------
def test_bench_help_lists_the_shapes():
    from moe_prefetch.cli import predictor_cmds
    from moe_prefetch.evidence.bench import SHAPES

    assert predictor_cmds.SHAPE_NAMES == tuple(SHAPES)
    result = CliRunner().invoke(app, ["bench", "--help"], env={"COLUMNS": "200"})
    assert "--help of shapes" not in result.stdout
    for name in SHAPES:
        assert name in result.stdout


def test_flags_show_no_type(runner):
    for command in ([], ["run"], ["bench"], ["report"]):
        result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0 and "--quiet" in CliRunner().invoke(app, ["run", "--help"]).stdout
        assert "<bool>" not in result.stdout, command


def test_run_help_gives_defaults():
    params = {p.name: p.help for p in get_command(app).commands["run"].params}
    assert "(default 64)" in params["max_new_tokens"] and "(default 0.0)" in params["temperature"]
    assert "default: as many as free device memory allows" in params["cache_slots"]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--predictors", "none,crystal-ball"], "unknown predictor(s) crystal-ball"),
        (["--cache-fractions", "0.25,2"], "--cache-fractions [2.0] must be shares in (0, 1]"),
        (["--lookahead", "0"], "--lookahead 0"),
        (["--device", "gpu"], "cuda:N"),
        (["--tokens", "0"], "--tokens 0"),
    ],
)
def test_bench_checks_every_option_before_any_work(tokenized, runner, monkeypatch, args, needle):
    def no_work(*a, **k):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr("moe_prefetch.model.loading.load", no_work)
    monkeypatch.setattr("moe_prefetch.evidence.bench.run_bench", no_work)
    result = runner.invoke(app, ["bench", "--model", str(tokenized), "--predictors", "none", *args])
    assert_one_line_error(result, needle)


def test_bench_without_adapters_refuses_m2r2_first(tokenized, runner):
    result = runner.invoke(app, ["bench", "--model", str(tokenized), "--predictors", "none,m2r2", "--tokens", "2"])
    assert_one_line_error(result, "m2r2 needs trained adapters", "train-predictor")
