"""Load test of the retrieval API on loopback: queries/s and latency with concurrent clients.

Fills (or reuses) a library of `--entries` keys, starts `python -m retrieval_api` on a free
127.0.0.1 port, then `--clients` concurrent clients send POST /v1/query for `--duration`
seconds (at most `--max-requests` in total) and the run stops by itself. `--hostile N` adds N
clients that keep sending an oversize query (`--hostile-mib` MiB of zeros as JSON lists), and a
probe times GET /healthz every 50 ms throughout.

    .venv/bin/python benchmarks/api_load.py --library /tmp/spot_bench_100k --entries 100000 --clients 16
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from library import KINDS, Library

BACKBONE = "bench"
REPO = Path(__file__).resolve().parents[1]


def fill(root: Path, entries: int, length: int, d: int) -> float:
    """Publish random keys until the library holds `entries` keys; returns seconds spent."""
    start = time.perf_counter()
    with Library(root) as lib:
        rng = np.random.default_rng(lib.count())
        while (have := lib.count(role="key")) < entries:
            batch = min(5000, entries - have)
            prompts = rng.standard_normal((batch, length, d), dtype=np.float32)
            lib.publish_many(
                [
                    (p, None, {"task": f"task{have + i}", "backbone": BACKBONE})
                    for i, p in enumerate(prompts)
                ]
            )
    return time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(root: Path, port: int, index: str) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable,
        "-m",
        "retrieval_api",
        "--library",
        str(root),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    argv += ["--index", index, "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "SPOT_API_TOKENS": "bench"}
    proc = subprocess.Popen(argv, cwd=REPO, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def oversize_body(mib: float, d: int) -> bytes:
    """A JSON query of zeros whose prompt has as many d-wide rows as fit in `mib` MiB."""
    row = "[" + ", ".join(["0.0"] * d) + "]"
    rows = max(1, int(mib * 2**20) // (len(row) + 2))
    return f'{{"backbone": "{BACKBONE}", "prompt": [{", ".join([row] * rows)}]}}'.encode()


async def hostile(url: str, body: bytes, deadline: float, outcomes: dict[str, int]) -> None:
    """Send `body` as a query again and again until `deadline`, counting the outcomes."""
    headers = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=headers) as http:
        while time.perf_counter() < deadline:
            try:
                outcome = str((await http.post("/v1/query", content=body)).status_code)
            except httpx.HTTPError as err:
                outcome = type(err).__name__
            outcomes[outcome] = outcomes.get(outcome, 0) + 1


async def probe(url: str, deadline: float, latencies: list[float]) -> None:
    """Time GET /healthz every 50 ms until `deadline`."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            await http.get("/healthz")
            latencies.append(time.perf_counter() - start)
            await asyncio.sleep(0.05)


def _ms(seconds: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.array(seconds) * 1e3, q)), 1) if seconds else None


async def load(
    url: str,
    bodies: list[bytes],
    clients: int,
    duration: float,
    max_requests: int,
    oversize: bytes | None = None,
    hostiles: int = 0,
) -> dict[str, object]:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    hostile_outcomes: dict[str, int] = {}
    health: list[float] = []
    deadline = time.perf_counter() + duration

    async def client(worker: int) -> None:
        async with httpx.AsyncClient(
            base_url=url, timeout=60, headers={"Content-Type": "application/json"}
        ) as http:
            i = worker
            while (
                time.perf_counter() < deadline
                and len(latencies) + sum(errors.values()) < max_requests
            ):
                start = time.perf_counter()
                try:
                    response = await http.post("/v1/query", content=bodies[i % len(bodies)])
                    outcome = str(response.status_code)
                except httpx.HTTPError as err:
                    outcome = type(err).__name__
                if outcome == "200":
                    latencies.append(time.perf_counter() - start)
                else:
                    errors[outcome] = errors.get(outcome, 0) + 1
                i += clients

    start = time.perf_counter()
    extra = [hostile(url, oversize, deadline, hostile_outcomes) for _ in range(hostiles)]
    await asyncio.gather(
        *(client(w) for w in range(clients)), *extra, probe(url, deadline, health)
    )
    elapsed = time.perf_counter() - start
    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 1),
        "qps": round(len(latencies) / elapsed, 1),
        "p50_ms": _ms(latencies, 50),
        "p99_ms": _ms(latencies, 99),
        "hostile_outcomes": hostile_outcomes,
        "healthz_p99_ms": _ms(health, 99),
        "healthz_max_ms": round(max(health) * 1e3, 1) if health else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--library",
        type=Path,
        required=True,
        help="library directory (filled if short of --entries)",
    )
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument(
        "--key-length",
        type=int,
        default=2,
        help="L of the published keys (small keeps the disk use low)",
    )
    parser.add_argument("--query-length", type=int, default=100, help="L of the query prompts")
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--metric", choices=("mean", "token"), default="mean")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--index", choices=KINDS, default="flat")
    parser.add_argument("--hostile", type=int, default=0, help="clients sending oversize queries")
    parser.add_argument("--hostile-mib", type=float, default=30.0, help="MiB of a hostile query")
    args = parser.parse_args()

    fill_s = fill(args.library, args.entries, args.key_length, args.d)
    start = time.perf_counter()
    with Library(args.library, index_kind=args.index) as lib:  # build and save the index up front
        lib.query(np.ones((1, args.d), np.float32), BACKBONE, args.metric, args.k)
    index_s = time.perf_counter() - start
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((64, args.query_length, args.d), dtype=np.float32)
    bodies = [
        json.dumps(
            {
                "prompt_base64": base64.b64encode(q.astype("<f4").tobytes()).decode(),
                "shape": list(q.shape),
                "backbone": BACKBONE,
                "metric": args.metric,
                "k": args.k,
            }
        ).encode()
        for q in queries
    ]
    port = free_port()
    server = start_server(args.library, port, args.index)
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(load(url, bodies[:1], 1, 60.0, 2))  # server loads the index file
        oversize = oversize_body(args.hostile_mib, args.d) if args.hostile else None
        result = asyncio.run(
            load(
                url, bodies, args.clients, args.duration, args.max_requests, oversize, args.hostile
            )
        )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    config = {k: v for k, v in vars(args).items() if k != "library"}
    print(
        json.dumps(
            {
                "config": config,
                "fill_s": round(fill_s, 1),
                "index_build_s": round(index_s, 1),
                "load": os.getloadavg(),
                **result,
            }
        )
    )


if __name__ == "__main__":
    main()
