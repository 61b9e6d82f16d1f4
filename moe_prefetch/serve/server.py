"""The listening server: a thread per connection (the standard library's ThreadingHTTPServer),
the one engine, the line of waiting requests and the metrics, and a shutdown that leaves
nothing half-written.

Shutdown, in order: refuse new turns and send the waiting away (503); tell the running
generation to stop at its next token (its client gets a well-formed error, not a cut-off
body); stop accepting; end the idle keep-alive connections; wait for the handlers; then give
back the model's device memory and host store.
"""

from __future__ import annotations

import logging
import socket
import threading
from http.server import ThreadingHTTPServer

from .engine import Engine
from .metrics import Metrics
from .queue import Turns
from .routes import Handler

log = logging.getLogger(__name__)

DEFAULT_QUEUE = 8  # requests that may wait for the model; more get 503
DEFAULT_MAX_BODY = 4 * 2**20  # bytes of a request body (a long prompt is well under this)
CLOSE_WAIT_S = 30.0  # how long shutdown waits for the handlers to finish their responses


class Server(ThreadingHTTPServer):
    """`Server(engine, bind=..., port=...)` listens at once; `start()` serves on a thread,
    `close()` shuts down as the module docstring says. Port 0 picks a free port (`.port`)."""

    daemon_threads = True  # a handler never keeps the process alive; close() waits for them itself
    allow_reuse_address = True

    def __init__(
        self,
        engine: Engine,
        *,
        bind: str = "127.0.0.1",
        port: int = 8000,
        api_key: str | None = None,
        max_waiting: int = DEFAULT_QUEUE,
        max_body: int = DEFAULT_MAX_BODY,
    ):
        self.engine = engine
        self.api_key = api_key or None
        self.turns = Turns(max_waiting)
        self.max_body = max_body
        stats = engine.stats()
        self.metrics = Metrics(
            {
                "model": engine.name,
                "device": str(stats.get("device", "?")),
                "experts_dtype": str(stats.get("experts_dtype", "?")),
                "predictor": str(stats.get("predictor", "?")),
                "on_miss": str(stats.get("on_miss", "?")),
            }
        )
        self.metrics.runtime(stats)
        self._connections: dict[threading.Thread, socket.socket] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        self.address_family = family
        super().__init__((bind, port), Handler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        host = self.server_address[0]
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def start(self) -> Server:
        self._thread = threading.Thread(target=self.serve_forever, name="moe-prefetch-serve", daemon=True)
        self._thread.start()
        return self

    def process_request_thread(self, request, client_address) -> None:
        with self._lock:
            self._connections[threading.current_thread()] = request
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._connections.pop(threading.current_thread(), None)

    def close(self) -> None:
        """Shut down (see the module docstring) and detach the model. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.turns.close()
        self.engine.stopping.set()
        if self._thread is not None:
            self.shutdown()  # serve_forever returns: no new connections are accepted
        with self._lock:
            open_ = dict(self._connections)
        for sock in open_.values():
            try:
                # A handler waiting for its next request reads end-of-stream and leaves; one that is
                # answering has its body already and can still write its response.
                sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        for thread in open_:
            thread.join(CLOSE_WAIT_S)
        left = [t for t in open_ if t.is_alive()]
        if left:
            log.warning("%d connections still open after %.0fs; closing anyway", len(left), CLOSE_WAIT_S)
        self.server_close()
        self.engine.close()
