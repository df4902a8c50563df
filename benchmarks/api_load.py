"""Load test of the retrieval API on loopback: queries/s and latency with concurrent clients.

Fills (or reuses) a library of `--entries` keys, starts `python -m retrieval_api` on a free
127.0.0.1 port, then `--clients` concurrent clients send POST /v1/query for `--duration`
seconds (at most `--max-requests` in total) and the run stops by itself.

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


async def load(
    url: str, bodies: list[bytes], clients: int, duration: float, max_requests: int
) -> dict[str, object]:
    latencies: list[float] = []
    errors: dict[str, int] = {}
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
    await asyncio.gather(*(client(w) for w in range(clients)))
    elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1e3
    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 1),
        "qps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None,
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
        result = asyncio.run(load(url, bodies, args.clients, args.duration, args.max_requests))
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
