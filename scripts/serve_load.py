"""A small, bounded, local load test of `moe-prefetch serve`: every request is answered or
refused with 503, none is lost, and the server's memory stays flat from round to round.

    python scripts/serve_load.py                       # demo on CPU: 3 rounds of 20 requests from 4 clients
    python scripts/serve_load.py --requests 40 --clients 8 --rounds 5 --queue 2

It starts the server itself (`python -m moe_prefetch serve --port 0`, on this machine only),
sends each round's requests from `--clients` threads (half streamed, half not; none retried;
a refused client pauses as Retry-After says, at most --pause-max seconds, before its next),
prints a line per round (answered, refused with 503, lost, latency, tokens/s, the server's
resident memory) and the memory growth after the first round, and stops the server with
SIGTERM. Exit status 1 when a request was lost or the server did not exit cleanly.
Only the standard library and psutil (a dependency of the project).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import psutil

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ("def add(a, b):", "import os\n", "class Codec(codecs.Codec):", "for i in range(10):")


class ServerProcess:
    """`moe-prefetch serve ARGS --port 0` in a child process; `url` once it listens."""

    def __init__(self, args: list[str], timeout_s: float = 180.0):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moe_prefetch", "serve", *args, "--port", "0"],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        listening = threading.Event()

        def drain():  # read stderr to the end, so the server never blocks on a full pipe
            for line in self.proc.stderr:
                self.lines.append(line.rstrip("\n"))
                if " at http://" in line:
                    listening.set()
            listening.set()

        threading.Thread(target=drain, daemon=True).start()
        if not listening.wait(timeout_s) or self.proc.poll() is not None:
            self.proc.kill()
            raise RuntimeError("the server did not start:\n" + "\n".join(self.lines))
        found = next(m for m in map(re.compile(r"at (http://\S+)/v1").search, self.lines) if m)
        self.url = found.group(1)

    @property
    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def stop(self, timeout_s: float = 120.0) -> int | None:
        """SIGTERM, then the exit code (None: it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None


def request(url: str, i: int, *, max_tokens: int, key: str | None, pause_max_s: float = 0.0) -> dict:
    """One completion (streamed when i is odd): its status, tokens and seconds, or what went wrong.
    Refused (503), the client pauses as Retry-After says, at most `pause_max_s`, and goes on."""
    parts = urlsplit(url)
    stream = i % 2 == 1
    body = {"model": "demo", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0}
    if stream:
        body["stream"] = True
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    start = time.perf_counter()
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), headers)
        reply = conn.getresponse()
        data = reply.read().decode()  # a chunked stream is read to its end (IncompleteRead if cut)
        seconds = time.perf_counter() - start
        if reply.status == 503:
            retry_after = reply.getheader("Retry-After")
            ok = json.loads(data)["error"]["code"] == "queue_full" and retry_after
            if ok and pause_max_s > 0:
                time.sleep(min(float(retry_after), pause_max_s))  # a polite client waits before its next request
            return {"outcome": "refused" if ok else "lost", "seconds": seconds}
        if reply.status != 200:
            return {"outcome": "lost", "why": f"status {reply.status}: {data[:200]}"}
        if stream:
            events = [line[6:] for line in data.splitlines() if line.startswith("data: ")]
            if events[-1] != "[DONE]":
                return {"outcome": "lost", "why": f"stream ended without [DONE]: {events[-1][:200]}"}
            tokens = len(events) - 2  # one event per token, the closing one, [DONE]
        else:
            tokens = json.loads(data)["usage"]["completion_tokens"]
        return {"outcome": "answered", "seconds": seconds, "tokens": tokens}
    except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError) as err:
        return {"outcome": "lost", "why": f"{type(err).__name__}: {err}"}
    finally:
        conn.close()


def load(
    url: str, *, requests: int, clients: int, max_tokens: int = 16, key: str | None = None, pause_max_s: float = 0.0
) -> dict:
    """`requests` completions from `clients` concurrent clients; counts by outcome and figures."""
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(
            pool.map(
                lambda i: request(url, i, max_tokens=max_tokens, key=key, pause_max_s=pause_max_s), range(requests)
            )
        )
    wall = time.perf_counter() - start
    answered = [r for r in results if r["outcome"] == "answered"]
    latencies = sorted(r["seconds"] for r in answered)
    return {
        "requests": requests,
        "answered": len(answered),
        "refused": sum(r["outcome"] == "refused" for r in results),
        "lost": [r.get("why", "?") for r in results if r["outcome"] == "lost"],
        "wall_s": wall,
        "tokens": sum(r["tokens"] for r in answered),
        "p50_s": statistics.median(latencies) if latencies else None,
        "p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20, help="requests per round")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--queue", type=int, default=2, help="the server's --queue (waiting requests)")
    parser.add_argument(
        "--pause-max",
        type=float,
        default=0.5,
        help="seconds a refused client waits at most (Retry-After) before going on",
    )
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    server = ServerProcess(["--model", args.model, "--device", args.device, "--queue", str(args.queue)])
    print(f"server {server.url} (pid {server.proc.pid}), {args.model} on {args.device}, --queue {args.queue}")
    print(f"{args.rounds} rounds of {args.requests} requests from {args.clients} clients, max_tokens {args.max_tokens}")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    server_cpu0 = sum(psutil.Process(server.proc.pid).cpu_times()[:2])
    rss, lost = [server.rss], 0
    for n in range(1, args.rounds + 1):
        r = load(
            server.url,
            requests=args.requests,
            clients=args.clients,
            max_tokens=args.max_tokens,
            pause_max_s=args.pause_max,
        )
        rss.append(server.rss)
        lost += len(r["lost"])
        p = lambda s: "-" if s is None else f"{s:.2f}s"  # noqa: E731
        print(
            f"round {n}: answered {r['answered']}, refused 503 {r['refused']}, lost {len(r['lost'])}; "
            f"latency p50 {p(r['p50_s'])} p95 {p(r['p95_s'])}; {r['tokens'] / r['wall_s']:.1f} tokens/s "
            f"over {r['wall_s']:.1f}s; server RSS {rss[-1] / 2**20:.1f} MiB"
        )
        for why in r["lost"]:
            print(f"  lost: {why}")
    server_cpu = sum(psutil.Process(server.proc.pid).cpu_times()[:2]) - server_cpu0
    wall = time.perf_counter() - wall0
    code = server.stop()
    print(
        f"server RSS: {rss[0] / 2**20:.1f} MiB at start, {rss[1] / 2**20:.1f} after round 1, "
        f"{rss[-1] / 2**20:.1f} at the end: {(rss[-1] - rss[1]) / 2**20:+.1f} MiB after round 1"
    )
    print(
        f"CPU: server {server_cpu:.1f}s, this script {time.process_time() - cpu0:.1f}s over {wall:.1f}s wall "
        f"(server CPU/wall {server_cpu / wall:.2f}); exit code after SIGTERM: {code}"
    )
    return 0 if lost == 0 and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
