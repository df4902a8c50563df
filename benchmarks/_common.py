"""Shared helpers of the speed benchmarks: timing, machine description, FLOP counts."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import time
from collections.abc import Callable

import numpy as np


def timed(fn: Callable[[], object]) -> float:
    """Seconds of one call (the callable blocks until its result is ready)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each variant over `repeats` rounds; each round runs every variant once,
    in an order rotated by one per round, so slow phases of a shared machine hit all of them."""
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            time.sleep(0.5)  # let the previous variant's spinning OpenMP/Eigen workers park
            times[name].append(timed(variants[name]))
        print(f"  round {r + 1}/{repeats}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()),
              flush=True)
    return times


def median_ratio(times: dict[str, list[float]], slow: str, fast: str) -> float:
    """Median over rounds of time(slow) / time(fast), i.e. the speed of `fast` relative to `slow`."""
    return float(np.median(np.asarray(times[slow]) / np.asarray(times[fast])))


def machine() -> dict[str, str]:
    """CPU model, core count, date, Python and package versions."""
    model = platform.processor() or "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(
            (k.strip(), v.strip()) for k, v in (line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        )
        model = fields.get("Model name", model)
        flags = fields.get("Flags", "")
        isa = "avx512f" if "avx512f" in flags else ("avx2" if "avx2" in flags else "?")
    except (OSError, subprocess.CalledProcessError):
        isa = "?"
    versions = {}
    for package in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers", "peft"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "absent"
    try:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "isa": isa,
        "load average at start (1, 5, 15 min)": load,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "(unset)"),
        **versions,
    }


def llama_forward_flops(cfg, b: int, t: int, p: int, shared: bool, answer_rows: int,
                        keys: int | None = None, cached: bool = False) -> dict[str, float]:
    """Matmul FLOPs (2 per multiply-add) of one forward pass of our Llama.

    `t` token columns per row (after any per-row prompt) in `b` rows, a prefix of `p`
    positions that is either computed once (`shared`) or per row (then p = 0 and t includes it),
    `answer_rows` rows of logits.
    `keys`: the keys each column attends to besides the prefix (None: the t of its row; a
    banded packed stream: window + chunk); `cached`: the shared prefix comes as precomputed
    states (attended to, not run).
    """
    d, hd = cfg.d_model, cfg.head_dim
    q_dim, kv_dim = cfg.num_heads * hd, cfg.num_kv_heads * hd
    dense_per_row = 2 * d * (q_dim + 2 * kv_dim + q_dim) + 2 * 3 * d * cfg.d_ff
    prefix_keys = p if shared else 0
    prefix_rows = 0 if cached else prefix_keys
    keys = t if keys is None else keys
    attn = 2 * 2 * cfg.num_heads * hd  # QK^T and AV per (query, key) pair
    dense = cfg.num_layers * (prefix_rows + b * t) * dense_per_row
    attention = cfg.num_layers * attn * (prefix_rows * prefix_rows + b * t * (prefix_keys + keys))
    logits = 2 * answer_rows * d * cfg.vocab_size
    return {"dense": float(dense), "attention": float(attention), "logits": float(logits)}


def train_flops(forward: dict[str, float]) -> float:
    """Forward + backward w.r.t. activations only (no weight gradients): dense and logits matmuls
    once more, attention twice more (dQ, dK and dP, dV)."""
    return 2 * forward["dense"] + 3 * forward["attention"] + 2 * forward["logits"]


def gflops(x: float) -> str:
    return f"{x / 1e9:.1f}"


# fp32 GEMM peak of this machine, timed in the same process as what it is compared with
GEMM_N, GEMM_CALLS = 2048, 4
PEAKS = ("numpy sgemm", "XLA sgemm")


def gemm_variants() -> dict:
    """fp32 2048^3 GEMMs (numpy's BLAS and XLA), each variant call = GEMM_CALLS products; they
    run inside the same rounds as the measured steps, so the peak sees the same machine load."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((GEMM_N, GEMM_N), dtype=np.float32) for _ in range(2))
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    xla_dot = jax.jit(jnp.dot)
    xla_dot(ja, jb).block_until_ready()

    def numpy_gemm():
        for _ in range(GEMM_CALLS):
            a @ b

    def xla_gemm():
        for _ in range(GEMM_CALLS):
            xla_dot(ja, jb).block_until_ready()

    return {"numpy sgemm": numpy_gemm, "XLA sgemm": xla_gemm}


def gemm_peak(repeats: int = 3) -> float:
    """GFLOP/s of the faster of the two GEMM variants, median of `repeats` calls each."""
    flop = 2 * GEMM_N**3 * GEMM_CALLS
    return max(flop / float(np.median([timed(fn) for _ in range(repeats)])) / 1e9
               for fn in gemm_variants().values())
