"""Where the packed SmolLM2 train step's wall time goes, per compiled XLA op (jax.profiler): the
one-program step (jit of the whole loss gradient), or with `--layerwise` the trainer's default
step (the prompt gradient layer by layer, `llama.make_prompt_grad`). Only ops on XLA's worker
threads are counted, so the traced total falls short of the untraced step time.

Runs our train step on the benchmark's SST-2 batches (batch 8, max length 128, prompt 20, packed
where that pays), traces a few steps with `jax.profiler`, and splits the wall time among the ops
that ran (time shared by concurrent ops is split evenly among them). Ops are grouped by kind,
output shape and the JAX operation they come from (read from the compiled HLO), so a line is e.g.
"the backward [276, 576] projection matmuls, 30 layers".

    .venv/bin/python benchmarks/_trace.py [--layerwise] [--steps 2] [--top 30] [--dir DIR]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import jax  # noqa: E402
from _ours import OursTrain, with_paths  # noqa: E402

from spot import backbones  # noqa: E402
from spot.backbones import llama  # noqa: E402
from spot.batching import encode, make_batch  # noqa: E402
from spot.prompts import initial_prompt  # noqa: E402
from spot.tasks import get_task  # noqa: E402
from spot.train import train_rows  # noqa: E402

SKIP = ("Thunk", "Slinky", "Threadpool", "end:")  # executor bookkeeping, not ops


def op_wall_times(trace_file: str) -> dict[tuple[str, str], float]:
    """Microseconds of wall time per (HLO module, op); overlapping ops share the overlap evenly."""
    events = json.load(gzip.open(trace_file))["traceEvents"]
    threads = {e["tid"] for e in events if e.get("ph") == "M" and e["name"] == "thread_name"
               and "Eigen" in e["args"]["name"]}
    edges = []
    for e in events:
        if e.get("ph") == "X" and e["tid"] in threads and e["dur"] > 0 and not e["name"].startswith(SKIP):
            op = (e.get("args", {}).get("hlo_module", ""), e["name"])
            edges += [(e["ts"], 1, op), (e["ts"] + e["dur"], -1, op)]
    edges.sort()
    active: collections.Counter = collections.Counter()
    wall: dict[str, float] = collections.defaultdict(float)
    last = edges[0][0]
    for t, change, name in edges:
        running = sum(active.values())
        for op, count in active.items():
            if count:
                wall[op] += (t - last) * count / running
        active[name] += change
        last = t
    return wall


def describe(op: str, hlo: str) -> str:
    """'<op kind> <output shape> <jax op>' from the compiled HLO text of the op's module."""
    line = re.search(r"\n\s*%" + re.escape(op) + r" = (\S+) .*", hlo)
    if not line:
        return op.split(".")[0]
    where = re.search(r'op_name="([^"]*)"', line.group(0))
    source = re.sub(r"jit\(\w+\)/|closed_call/|while/body/", "", where.group(1)) if where else ""
    return f"{op.split('.')[0]:36s} {line.group(1).split('{')[0]:26s} {source[-60:]}"


def category(description: str) -> str:
    """The coarse group of an op line (the table in benchmarks/README.md, optimisation 8)."""
    kind, shape = (description.split() + [""])[:2]
    if kind == "ynn_fusion" and re.fullmatch(r"f32\[\d+,(576|1536|192)\]", shape):
        return "projection matmuls"
    if ("dynamic-slice" in kind or "dynamic-update-slice" in kind
            or (kind.startswith(("wrapped_broadcast", "copy")) and shape.startswith("f32[30,"))):
        return "scan bookkeeping (weight slices, residual stacks)"
    if "49152" in shape or re.fullmatch(r"f32\[\d+,576\]", shape) and "logits" in description:
        return "answer logits"
    if re.search(r"\b(3|9),|,(3|9),|768|,20,20\]|,60,20\]", shape):
        return "attention"
    return "other (norms, rotary, SiLU, residual adds, gradient sums)"


def record_calls(backbone) -> dict[str, tuple]:
    """Wraps the layer-by-layer gradient's jitted calls so that each one's first arguments are
    kept (to compile it again for its HLO text): name -> (jitted function, arguments)."""
    calls, recorded = llama._layer_calls(backbone.config, backbone.bos_id, llama.FAST), {}
    for name in ("start", "forward", "backward", "finish"):
        fn = getattr(calls, name)

        def call(*args, fn=fn, name=name):
            recorded.setdefault(name, (fn, args))
            return fn(*args)

        setattr(calls, name, call)
    return recorded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--dir", default="/tmp/spot-trace")
    parser.add_argument("--layerwise", action="store_true", help="the layer-by-layer step")
    args = parser.parse_args()
    backbone = with_paths(backbones.load(), llama.FAST, layerwise=args.layerwise)
    task = get_task("sst2")
    encoded = encode(backbone, task.load("train"), max_length=128)
    batches = [make_batch(encoded, train_rows(len(encoded), 8, step, 0), backbone.pad_id,
                          max_length=128, batch_size=8, pack=True) for step in range(args.steps)]
    prompt = np.asarray(initial_prompt(backbone, "sampled_vocab", 20, 0), np.float32)
    runner = OursTrain(backbone, prompt, batches)
    recorded = record_calls(backbone) if args.layerwise else {}
    runner()  # compile
    started = time.perf_counter()
    runner()
    print(f"{args.steps} steps untraced: {time.perf_counter() - started:.2f} s")
    jax.profiler.start_trace(args.dir)
    runner()
    jax.profiler.stop_trace()
    if args.layerwise:
        texts = [fn.lower(*call).compile().as_text() for fn, call in recorded.values()]
    else:
        texts = [runner.step_fn.lower(backbone.params, runner.prompt, runner.state,
                                      runner.batches[0], runner.rng).compile().as_text()]
    hlos = {re.match(r"HloModule ([^,\s]+)", text).group(1): text for text in texts}
    wall = op_wall_times(sorted(glob.glob(f"{args.dir}/plugins/profile/*/*.trace.json.gz"))[-1])
    grouped: dict[str, float] = collections.defaultdict(float)
    for (module, op), us in wall.items():
        grouped[describe(op, hlos.get(module, ""))] += us
    total = sum(grouped.values())
    print(f"traced ops: {total / 1e3:.0f} ms of wall time over {args.steps} steps")
    coarse: dict[str, float] = collections.defaultdict(float)
    for name, us in grouped.items():
        coarse[category(name)] += us
    for name, us in sorted(coarse.items(), key=lambda kv: -kv[1]):
        print(f"{us / 1e3 / args.steps:8.0f} ms/step {100 * us / total:5.1f}%  {name}")
    for name, us in sorted(grouped.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{us / 1e3:8.1f} ms {100 * us / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
