"""`serve`: keep one model loaded and answer OpenAI-style requests (moe_prefetch.serve).

Takes `run`'s model and runtime options (options.py); the listening address is `--bind`, since
`--host` already names the host-lane profile. Ctrl-C or SIGTERM shut down cleanly (exit 0).
"""

from __future__ import annotations

import ipaddress
import signal
import socket
import threading
from pathlib import Path
from typing import Annotated

import typer

from moe_prefetch.errors import ConfigError
from moe_prefetch.serve.server import DEFAULT_MAX_BODY, DEFAULT_QUEUE  # stdlib only: --help stays quick

from . import options
from .app import Command, app, stderr


@app.command(cls=Command)
def serve(
    model: options.Model = "demo",
    bind: Annotated[
        str, typer.Option(help="Address to listen on; 0.0.0.0 (or ::) lets other machines in.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on; 0 picks a free one.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="MOE_PREFETCH_API_KEY",
            help="Clients must send 'Authorization: Bearer KEY' (every route but /health).",
        ),
    ] = None,
    queue: Annotated[
        int, typer.Option(help="Requests that may wait while one generates; more get 503 with Retry-After.")
    ] = DEFAULT_QUEUE,
    chat_template: Annotated[
        Path | None,
        typer.Option(help="Jinja chat template for /v1/chat/completions (default: the tokenizer's own)."),
    ] = None,
    max_body: Annotated[int, typer.Option(help="Largest request body in bytes; larger gets 413.")] = DEFAULT_MAX_BODY,
    tokenizer: options.Tokenizer = None,
    device: options.Device = None,
    cache_budget: options.CacheBudget = None,
    cache_slots: options.CacheSlots = None,
    profile: options.Profile = None,
    cache_policy: options.CachePolicy = None,
    host: options.Host = None,
    predictor: options.Predictor = None,
    lookahead: options.Lookahead = None,
    predictor_path: options.PredictorPath = None,
    on_miss: options.OnMiss = None,
    experts_dtype: options.ExpertsDtype = None,
):
    """Serve the model over HTTP, compatible with OpenAI's API: /v1/completions, /v1/chat/completions
    (streamed or not), /v1/models, plus /metrics (Prometheus) and /health. One generation at a time."""
    from moe_prefetch.model.folders import resolve_path
    from moe_prefetch.serve.engine import Engine
    from moe_prefetch.serve.server import Server

    load_options, runtime_config = options.runtime_options(
        device=device,
        cache_budget=cache_budget,
        cache_slots=cache_slots,
        profile=profile,
        cache_policy=cache_policy,
        host=host,
        predictor=predictor,
        lookahead=lookahead,
        predictor_path=predictor_path,
        on_miss=on_miss,
        experts_dtype=experts_dtype,
    )
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port} must be in 0..65535 (0 picks a free port)")
    if queue < 0:
        raise ConfigError(f"--queue {queue} must be 0 or more (0: refuse every request while one generates)")
    if max_body < 1024:
        raise ConfigError(f"--max-body {max_body} must be at least 1024 bytes")
    if chat_template is not None and not chat_template.expanduser().is_file():
        raise ConfigError(f"--chat-template {chat_template} is not a file; pass a Jinja template file")
    load_options = options.size_for_profile(load_options, runtime_config, profile, resolve_path(model))
    _check_port(bind, port)  # before loading, which can take minutes
    err = stderr()
    err.print(f"loading {model} ...", style="dim", markup=False, highlight=False)
    engine = Engine.load(model, load_options, tokenizer=tokenizer, chat_template=chat_template)
    try:
        server = Server(engine, bind=bind, port=port, api_key=api_key, max_waiting=queue, max_body=max_body)
    except OSError as error:  # taken while the model loaded
        engine.close()
        raise _cannot_listen(bind, port, error) from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server.start()
    reach = (
        "this machine only"
        if _loopback(bind)
        else "other machines too" + ("" if api_key else "; anyone who can reach it can use the model: set --api-key")
    )
    err.print(
        f"serving {engine.name} at {server.url}/v1 (listening on {bind}: {reach}); Ctrl-C stops",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    try:
        while not stop.wait(0.5):  # a timed wait, so Ctrl-C is seen promptly in the main thread
            pass
    except KeyboardInterrupt:
        pass
    err.print("stopping: finishing open responses ...", style="dim", markup=False, highlight=False)
    server.close()
    err.print("stopped", markup=False, highlight=False)


def _check_port(bind: str, port: int) -> None:
    """Fail now, not after loading the model, when the address cannot be listened on."""
    try:
        infos = socket.getaddrinfo(bind, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
            probe.bind(infos[0][4])
    except OSError as error:
        raise _cannot_listen(bind, port, error) from None


def _cannot_listen(bind: str, port: int, error: OSError) -> ConfigError:
    reason = error.strerror or str(error)
    return ConfigError(f"cannot listen on {bind}:{port} ({reason}); pick another --port, or another --bind")


def _loopback(bind: str) -> bool:
    try:
        return ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return bind == "localhost"
