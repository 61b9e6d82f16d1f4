"""`moe-prefetch serve`: one offloaded model behind an OpenAI-compatible HTTP endpoint.

Built on the standard library's http.server (nothing more to install). Read bottom-up:
schema.py (the OpenAI wire format), text.py (token ids to streamed text, stop sequences),
queue.py (one generation at a time, a bounded line), metrics.py (Prometheus text), engine.py
(the model, its prompts and generation through `moe_prefetch.generation`, as `run` does),
routes.py (the HTTP handler), server.py (listening and shutting down).
"""

from .engine import Engine
from .server import Server

__all__ = ["Engine", "Server"]
