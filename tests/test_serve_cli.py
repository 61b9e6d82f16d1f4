"""`moe-prefetch serve` through typer's CliRunner: it takes `run`'s runtime options (the same
definitions), and a mistake is one line and exit code 2 before anything loads."""

from __future__ import annotations

import socket

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from moe_prefetch.cli.main import app

RUNTIME_OPTIONS = (
    "model",
    "tokenizer",
    "device",
    "cache_budget",
    "cache_slots",
    "profile",
    "cache_policy",
    "host",
    "predictor",
    "lookahead",
    "predictor_path",
    "on_miss",
    "experts_dtype",
)


def params(command: str) -> dict:
    return {p.name: p for p in get_command(app).commands[command].params}


def test_serve_takes_every_runtime_option_of_run_with_the_same_help():
    run, serve = params("run"), params("serve")
    for name in RUNTIME_OPTIONS:
        assert name in serve, f"serve lacks --{name.replace('_', '-')}"
        assert (serve[name].opts, serve[name].help, serve[name].default) == (
            run[name].opts,
            run[name].help,
            run[name].default,
        )
    assert serve["bind"].default == "127.0.0.1" and serve["host"].opts == ["--host"]  # the lane profile, as in run


@pytest.fixture()
def runner(monkeypatch, tmp_path):
    monkeypatch.delenv("MOE_PREFETCH_DEBUG", raising=False)
    monkeypatch.setenv("MOE_PREFETCH_PROFILES", str(tmp_path / "no-profiles-here"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return CliRunner()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--port", "70000"], "--port 70000"),
        (["--queue", "-1"], "--queue -1"),
        (["--max-body", "10"], "--max-body"),
        (["--chat-template", "/no/such/template.jinja"], "--chat-template"),
        (["--cache-slots", "8", "--profile", "rtx3060-12gb"], "give one of"),
        (["--lookahead", "0"], "--lookahead"),
        (["--host", "no-such-host"], "no-such-host"),
        (["--model", "/no/such/checkpoint"], "does not exist"),
    ],
)
def test_serve_mistakes_are_one_line_before_loading(runner, args, needle):
    result = runner.invoke(app, ["serve", *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert "loading" not in result.stderr


def test_a_port_in_use_is_one_line_before_loading(runner):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["serve", "--port", str(port)])
    assert result.exit_code == 2 and "cannot listen on 127.0.0.1:" in result.stderr, result.output
    assert "loading" not in result.stderr
