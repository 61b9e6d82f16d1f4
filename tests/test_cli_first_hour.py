"""Issue 12, "first hour of a new user": each rough edge found trying the project from a fresh
clone, through typer's CliRunner (user mistakes: exit 2, one line, no traceback)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import assert_one_line_error, make_checkpoint
from tiny_models import save_model
from typer.main import get_command
from typer.testing import CliRunner

from moe_prefetch.cli.main import app
from moe_prefetch.report import html as report_html
from moe_prefetch.report import profiling
from moe_prefetch.report import text as report_text
from moe_prefetch.runtime.config import train_adapters_hint

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


# == Issue 22, a new user's trial: items 2-10, 13-15 ===================================================
ROOT = Path(__file__).resolve().parent.parent


# -- 2. inspect's smallest budget is the one the budget check applies --------------------------------
def test_smallest_budget_is_what_run_accepts(runner):
    """The demo is float16 on a GPU and float32 on a CPU device; either way a budget pays for the
    working buffer before any slot, and inspect says so with the figure run's check uses."""
    data = json.loads(runner.invoke(app, ["inspect", "--model", "demo", "--json"]).stdout)["model"]
    top_k, expert, work = data["min_slots"], data["expert_bytes"], data["work_bytes"]
    assert work == top_k * expert and data["smallest_budget"] == top_k * expert + work  # uncompressed
    smallest = data["smallest_budget_on_cpu"]
    assert smallest == 2 * data["smallest_budget"]  # float32 on the CPU, float16 on a GPU
    text = " ".join(runner.invoke(app, ["inspect", "--model", "demo"]).stdout.split())
    assert f"smallest --cache-budget │ {report_text.fmt_bytes(data['smallest_budget'])}" in text
    assert f"{report_text.fmt_bytes(smallest)} on a CPU device (float32)" in text
    args = [*BASE, "--max-new-tokens", "1", "--prompt", "import os", "--quiet"]
    refused = runner.invoke(app, [*args, "--cache-budget", str(smallest - 1)])
    assert_one_line_error(
        refused,
        f"--cache-budget {smallest - 1} ({report_text.fmt_bytes(smallest - 1)}) holds 1 slot but one layer needs 2",
        f"working buffer of top_k experts decoded for the kernel takes {report_text.fmt_bytes(smallest // 2)} first",
        f"the smallest budget is {report_text.fmt_bytes(smallest)}",
    )
    assert not re.search(r"\d bytes\b", refused.stderr), "every size in one style (fmt_bytes)"
    assert runner.invoke(app, [*args, "--cache-budget", str(smallest)]).exit_code == 0


# -- 3, 5, 6. bench on a checkpoint without adapters, with its own defaults --------------------------
@pytest.fixture(scope="module")
def benched(tokenized, tmp_path_factory):
    """bench's defaults on a checkpoint without adapters, at a cache below top_k x MoE layers (0.125
    of 16 experts: 2 slots) and at it (0.25)."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    args = ["bench", "--model", str(tokenized), "--cache-fractions", "0.125,0.25", "--tokens", "3"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    return result, json.loads(out.read_text())


def test_bench_defaults_leave_m2r2_out_with_a_note(benched, tokenized):
    result, data = benched
    assert {r["predictor"] for r in data["rows"] if r["tokens_per_s"] is not None} == {
        "none",
        "previous-token",
        "next-gate",
        "oracle",
    }
    adapters = tokenized / "m2r2_adapters.safetensors"
    note = " ".join(result.stderr.split())
    assert f"note: m2r2 left out: no adapters at {adapters}; {train_adapters_hint(adapters, str(tokenized))}" in note


def test_bench_says_what_the_weights_are(benched, runner):
    assert "(weights as loaded from the folder; measured on cpu)" in benched[0].stdout
    assert "trained" not in benched[0].stdout
    demo = runner.invoke(
        app,
        ["bench", "--predictors", "none", "--cache-fractions", "0.5", "--tokens", "2", "--profiles", "h200"]
        + ["--device", "cpu"],
    )
    assert demo.exit_code == 0 and "bench demo (trained weights: a shipped demo; measured on cpu)" in demo.stdout


def test_bench_table_fits_and_explains_only_its_columns(benched):
    result, data = benched
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 120
    measured = [r for r in data["rows"] if r["tokens_per_s"] is not None]
    for row in data["rows"]:  # every row on one line, its numbers whole
        cells = [f" {row['predictor']} ", *(f" {report_text.rate(v)}" for v in row["simulated"].values())]
        assert any(all(c in line for c in cells) for line in lines), cells
    for row in measured:
        if row["predictor"] == "none":  # nothing predicted: precision and recall do not apply
            line = next(line for line in lines if line.split()[:3] == ["wait", "none", f"{row['cache_fraction']:g}"])
            assert line.split()[5:7] == ["-", "-"], line
    legend = " ".join(lines[lines.index(next(line for line in lines if "on miss:" in line)) :])
    assert "three-lane" not in legend and "bound PROFILE" not in legend  # no bound column, no bound legend
    for term in ("pf prec:", "pf recall:", "sim PROFILE:", "rtx3060-12gb", "all-resident:", "tok/s:"):
        assert term in legend, term
    # the small-cache warning: once for the whole bench, not once per configuration
    assert " ".join(result.stderr.split()).count("below top_k x MoE layers") == 1, result.stderr


# -- 4. the README's simulate --shape command runs as written ------------------------------------------
def test_readme_simulate_shape_command_runs(runner):
    command = re.search(r"`moe-prefetch (simulate --shape [^`]+)`", (ROOT / "README.md").read_text())[1]
    result = runner.invoke(app, command.split())
    assert result.exit_code == 0, result.output
    assert "predictor m2r2" in result.stdout  # a demo's routing: its own trained predictor
    args = ["simulate", "--shape", "olmoe-1b-7b", "--profile", "h200", "--tokens", "2"]
    random = runner.invoke(app, args)  # random routing has no recorded predictions: none
    assert random.exit_code == 0 and "predictor none" in random.stdout, random.output


# -- 7. inspect --experts-dtype -------------------------------------------------------------------------
def test_inspect_sizes_the_experts_dtype_asked_for(tokenized, runner):
    plain = json.loads(runner.invoke(app, ["inspect", "--model", str(tokenized), "--json"]).stdout)
    result = runner.invoke(app, ["inspect", "--model", str(tokenized), "--experts-dtype", "int4", "--json"])
    assert result.exit_code == 0, result.output
    int4 = json.loads(result.stdout)
    by_dtype = plain["model"]["expert_bytes_by_dtype"]
    assert int4["model"]["expert_bytes"] == by_dtype["int4"] < plain["model"]["expert_bytes"] == by_dtype["auto"]
    assert int4["model"]["experts_dtype"] == "int4"
    assert int4["model"]["all_miss_bytes_per_token"] == 2 * 2 * by_dtype["int4"]  # top-2, 2 MoE layers
    assert [f["slots"] for f in int4["profiles"]] == [f["by_experts_dtype"]["int4"]["slots"] for f in int4["profiles"]]
    text = " ".join(
        runner.invoke(app, ["inspect", "--model", str(tokenized), "--experts-dtype", "int4"]).stdout.split()
    )
    assert "experts as int4" in text and f"{report_text.fmt_bytes(by_dtype['int4'])} (int4, decoded to float32" in text
    assert_one_line_error(runner.invoke(app, ["inspect", "--experts-dtype", "int3"]), "--experts-dtype int3")


# -- 8. a config.json path names its folder ---------------------------------------------------------------
def test_run_takes_the_config_json_of_a_folder(tokenized, runner):
    result = runner.invoke(app, [*BASE, "--model", str(tokenized / "config.json"), "--prompt", "def f(x):", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["text"]
    weights = next(tokenized.glob("*.safetensors"))
    assert_one_line_error(
        runner.invoke(app, [*BASE, "--model", str(weights), "--prompt", "x"]),
        "is a file, not a model folder",
        "the folder that holds config.json",
    )


# -- 9. a dense model says so before anything about its tokenizer -------------------------------------------
def test_dense_model_without_tokenizer_is_called_dense(runner, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    for args in (["--prompt", "x"], ["--prompt-ids", "1,2"]):
        assert_one_line_error(runner.invoke(app, [*BASE, "--model", str(tmp_path), *args]), "'llama' is dense")


def test_missing_tokenizer_names_the_files_looked_for(bare, runner):
    result = runner.invoke(app, [*BASE, "--model", str(bare), "--prompt", "x"])
    assert_one_line_error(result, "no usable tokenizer (none of tokenizer.json, tokenizer.model", "--prompt-ids")
    assert "one of: )" not in result.stderr


# -- 10. the report's lanes axis and a run without a predictor ---------------------------------------------
def test_report_axis_ticks_are_round_and_no_predictor_says_so(small_cache_run, runner):
    out = small_cache_run[1]
    run = profiling.load_run(out)
    assert run["stats"]["predictor"] == "none"
    shown = " ".join(runner.invoke(app, ["report", str(out)]).stdout.split())
    assert "prefetch precision │ - (no predictor)" in shown and "prefetch recall │ - (no predictor)" in shown
    page = (out / "report.html").read_text()
    lanes = page[page.index("<h2>Lanes per token</h2>") : page.index("<h2>Loads against compute</h2>")]
    assert "time per token (ms)" in lanes and "seconds per token" not in lanes
    ticks = [float(t) for t in re.findall(r'text-anchor="end" class="tick">([0-9.]+) ms</text>', lanes)]
    assert len(ticks) == 5 and ticks[0] == 0
    step = ticks[1]
    assert ticks == pytest.approx([i * step for i in range(5)])
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert round(mantissa, 6) in (1, 1.5, 2, 2.5, 3, 4, 5), ticks  # a round step, not 3.35
    tallest = max(v for t in run["tokens"][1:] for v in t["lanes"].values() if v is not None)
    assert 1e3 * tallest <= ticks[-1] < 2.5 * 1e3 * tallest  # the bars fit, and fill a fair share


# -- 13. options are checked before torch loads ---------------------------------------------------------------
def test_bad_options_answer_before_torch_loads():
    """Each mistake is refused (exit 2) with torch still unimported: no seconds spent loading it."""
    cases = [
        ["run", "--cache-slots", "0"],
        ["run", "--lookahead", "9"],
        ["run", "--predictor", "nextgate"],
        ["run", "--model", "/no/such/folder"],
        ["inspect", "--experts-dtype", "int3"],
        ["bench", "--predictors", "nextgate"],
        ["bench", "--lookahead", "9"],
        ["simulate", "--shape", "mixtral-8x7b", "--profile", "h200", "--predictor", "nextgate"],
        ["simulate", "--trace", "nowhere", "--profile", "h200", "--predictor", "nextgate"],
        ["serve", "--cache-slots", "0"],
        ["serve", "--port", "70000"],
        ["serve", "--model", "/no/such/folder"],
        ["serve", "--chat-template", "/no/such/template.jinja"],
    ]
    script = (
        "import json, sys\n"
        "from typer.testing import CliRunner\n"
        "from moe_prefetch.cli.main import app\n"
        "out = []\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    result = CliRunner().invoke(app, args)\n"
        "    out.append([args, result.exit_code, 'torch' in sys.modules])\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True, env=env, check=True
    )
    for args, code, torch_loaded in json.loads(done.stdout):
        assert code == 2 and not torch_loaded, (args, code, torch_loaded)


# -- 14. one hint for missing adapters ----------------------------------------------------------------------
def test_missing_adapters_hint_is_the_same_everywhere(tokenized, runner, tmp_path):
    adapters = tokenized / "m2r2_adapters.safetensors"
    bench = runner.invoke(app, ["bench", "--model", str(tokenized), "--predictors", "none,m2r2"])
    assert_one_line_error(bench, train_adapters_hint(adapters, str(tokenized)), "--data FILE")
    missing = tmp_path / "adapters.safetensors"
    result = runner.invoke(
        app,
        [*BASE, "--model", str(tokenized), "--prompt", "x", "--predictor", "m2r2", "--predictor-path", str(missing)],
    )
    assert_one_line_error(result, train_adapters_hint(missing))


# -- 15. make demo prints the summary once ----------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_runs_once_and_writes_the_report():
    dry = subprocess.run(
        ["make", "-n", "-o", "install", "-C", str(ROOT), "demo"], capture_output=True, text=True, check=True
    ).stdout
    calls = re.findall(r"moe-prefetch (\w+)", dry)
    assert calls == ["run"], dry  # `run` prints the summary; a `report` after it would print it again
    assert "--report runs/demo" in dry  # which writes runs/demo/run.json and report.html
