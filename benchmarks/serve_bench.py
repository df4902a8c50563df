"""Serving throughput: mixed-task batches vs per-task serial batches vs one request at a time,
plus a prompt ensemble (single / best / ensemble) on one task. Not a test: it prints numbers.

Workload: `--tasks` (8 registered tasks) x `--per-task` requests (test rows) shuffled into one
arrival stream. Every task's prompt is a library "value" entry resolved by task name; these are
SAMPLED-VOCABULARY INITIALISATIONS (`spot.prompts.sampled_vocab`), stand-ins for trained prompts:
the cost of a forward pass does not depend on the prompt's values, so throughput is unaffected,
but the predictions are not meaningful.

Equal latency budget. Requests arrive in one interleaved stream and every strategy sees the same
windows of `--window` consecutive arrivals: a request may wait for at most window-1 later
arrivals before the batches holding it are formed, and a window is served completely before the
next one. Within a window:
    mixed         one `Predictor.predict` call over the whole window (rows of all tasks share
                  batches of up to `--batch-size` rows, one prompt per row)
    per-task      one call per task present in the window, one after another (a batch holds
                  one task's rows only); rows rounded up to a power of two like `mixed`
    per-task-fixed  the same, but every batch padded to `--batch-size` rows, as
                  `spot.evaluation` pads its batches (one compiled shape per length; a batch
                  that runs packed pays nothing for its padding rows)
    single        one call per request (batch of 1)
Every strategy uses `Predictor`'s defaults: each task's prompt runs once into cached prefix
states (keys/values per layer) that its rows attend to. Throughput = requests / wall time of the
timed pass (after a warm-up that compiles every shape the pass will use and fills the state
cache); useful GFLOP/s = the matmul FLOPs each served request needs with cached prompt states
(its context tokens through every layer, attending to BOS + prompt, one row of answer logits; no
padding counted) / wall time, as a share of an fp32 2048^3 GEMM (numpy or XLA, the faster) timed
in the same run: no strategy can beat one at share s by more than 1/s. Latency = time from the
window's start to the end of the call answering the request. The slow `per-task-fixed` and
`single` are timed on the first `--sample-windows` windows only, and every ratio compares wall
times on the same windows. All strategies must agree on
every prediction (checked).

    .venv/bin/python benchmarks/serve_bench.py                    # throughput + ensemble
    .venv/bin/python benchmarks/serve_bench.py --no-ensemble --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import gemm_peak, llama_forward_flops  # noqa: E402

from library import Library  # noqa: E402
from spot import backbones  # noqa: E402
from spot.predict import Predictor, Request, ensemble_report  # noqa: E402
from spot.prompts import sampled_vocab  # noqa: E402
from spot.tasks import get_task  # noqa: E402
from spot.tasks.splits import subset  # noqa: E402

TASKS = ("sst2", "sst5", "mr", "subj", "mpqa", "trec", "agnews", "cola")


class FullRows(Predictor):
    """Every batch padded to batch_size rows (the `spot.evaluation` way)."""

    def _rows_for(self, n: int) -> int:
        return self.batch_size


class DryRun(Predictor):
    """Records the batch shapes a workload compiles, without running the model."""

    shapes: dict[tuple, tuple[np.ndarray, dict]] = {}  # shared by every dry run

    def _run(self, prompt, batch):
        shape = (tuple(np.shape(a) for a in jax.tree_util.tree_leaves(prompt)),
                 *((key, array.shape) for key, array in sorted(batch.items())))
        self.shapes.setdefault(shape, (prompt, batch))
        return np.zeros(batch["choices"].shape[:2], np.float32)


class DryFullRows(DryRun, FullRows):
    pass


def serve(strategy: str, predictor: Predictor, window: list[tuple[int, Request]]):
    """Serve one window; returns [(stream index, prediction, seconds since window start)]."""
    start = time.perf_counter()
    out = []
    if strategy == "mixed":
        predictions = predictor.predict([r for _, r in window])
        done = time.perf_counter() - start
        out = [(i, p, done) for (i, _), p in zip(window, predictions, strict=True)]
    elif strategy in ("per-task", "per-task-fixed"):
        tasks = list(dict.fromkeys(r.task for _, r in window))
        for task in tasks:
            rows = [(i, r) for i, r in window if r.task == task]
            predictions = predictor.predict([r for _, r in rows])
            done = time.perf_counter() - start
            out += [(i, p, done) for (i, _), p in zip(rows, predictions, strict=True)]
    elif strategy == "single":
        for i, r in window:
            (prediction,) = predictor.predict([r])
            out.append((i, prediction, time.perf_counter() - start))
    else:
        raise ValueError(strategy)
    return out


def request_flops(backbone, text: str, prompt_length: int, max_length: int) -> tuple[float, float]:
    """Matmul FLOPs one request needs: (with its prompt's states cached: its truncated context
    through the model attending to BOS + prompt, logits at the last position; the same plus the
    prompt's own rows, i.e. running the prompt for this request)."""
    context = len(backbone.tokenizer.encode(text, add_special_tokens=False).ids[-max_length:])
    prefix = (backbone.bos_id is not None) + prompt_length
    cfg = backbone.config
    full = sum(llama_forward_flops(cfg, 1, context, prefix, True, 1).values())
    prefix_only = sum(llama_forward_flops(cfg, 0, context, prefix, True, 0).values())
    return full - prefix_only, full


def request_stream(tasks, per_task: int, seed: int) -> list[Request]:
    """`per_task` test rows of each task as requests, shuffled into one arrival order."""
    stream = []
    for name in tasks:
        examples = subset(get_task(name).load("test"), per_task, seed=seed)
        stream += [Request(e.text, task=name) for e in examples]
    return [stream[i] for i in np.random.default_rng(seed).permutation(len(stream))]


def publish_stand_ins(library, backbone, tasks, prompt_length: int) -> None:
    """One key/value entry per task: sampled-vocabulary inits standing in for trained prompts."""
    for i, name in enumerate(tasks):
        meta = {"task": name, "backbone": backbone.identity, "init": "sampled_vocab", "seed": i}
        library.publish(sampled_vocab(backbone, prompt_length, 1000 + i),
                        sampled_vocab(backbone, prompt_length, i), meta)


def throughput(args, backbone, library) -> dict:
    stream = request_stream(args.tasks, args.per_task, args.seed)
    windows = [
        list(enumerate(stream))[s : s + args.window] for s in range(0, len(stream), args.window)
    ]
    options = dict(batch_size=args.batch_size, bucket=args.bucket, max_length=args.max_length)
    predictors = {
        "mixed": Predictor(backbone, library, **options),
        "per-task": Predictor(backbone, library, **options),
        "per-task-fixed": FullRows(backbone, library, **options),
        "single": Predictor(backbone, library, **options),
    }
    timed_windows = {name: windows for name in predictors}
    for name in ("per-task-fixed", "single"):  # slow: a sample of the windows
        timed_windows[name] = windows[: args.sample_windows]
    # warm-up: compile every shape each strategy will use (one forward pass per shape)
    started = time.perf_counter()
    for name in predictors:
        dry = (DryFullRows if name == "per-task-fixed" else DryRun)(backbone, library, **options)
        for window in timed_windows[name]:
            serve(name, dry, window)
    shapes = DryRun.shapes
    for prompt, batch in shapes.values():
        jax.block_until_ready(backbone.score(prompt, batch))
    warmup = time.perf_counter() - started
    print(f"warm-up: {len(shapes)} batch shapes compiled and run in {warmup:.0f}s", flush=True)

    needs = [request_flops(backbone, r.text, args.prompt_length, args.max_length) for r in stream]
    useful = [cached for cached, _ in needs]
    cached = sum(useful) / sum(full for _, full in needs)
    peaks = [gemm_peak()]
    results, answers, window_seconds = {}, {}, {}
    for name, predictor in predictors.items():
        predictor.stats = dict.fromkeys(predictor.stats, 0)  # count the timed pass only
        latencies, served, window_seconds[name] = [], 0, []
        for window in timed_windows[name]:
            started = time.perf_counter()
            for i, prediction, latency in serve(name, predictor, window):
                answers.setdefault(i, {})[name] = prediction
                latencies.append(latency)
                served += 1
            window_seconds[name].append(time.perf_counter() - started)
        wall = sum(window_seconds[name])
        gflops = sum(useful[i] for window in timed_windows[name] for i, _ in window) / wall / 1e9
        results[name] = {
            "windows": len(timed_windows[name]),
            "requests": served,
            "seconds": round(wall, 2),
            "requests_per_s": served / wall,
            **predictor.stats,  # batches, padding rows, prompt sharing, packing
            "mean_latency_s": float(np.mean(latencies)),
            "p95_latency_s": float(np.percentile(latencies, 95)),
            "useful_gflops_per_s": gflops,
        }
        print(
            f"{name:>15}: {served} requests ({len(timed_windows[name])} windows) in {wall:7.1f}s = "
            f"{served / wall:6.2f} req/s, {predictor.stats['batches']} batches "
            f"({predictor.stats['padded_rows']} padding rows, "
            f"{predictor.stats['shared_prompt_batches']} with one shared prompt, "
            f"{predictor.stats['grouped_prompt_batches']} with prompt groups, "
            f"{predictor.stats['prefix_state_batches']} from cached prompt states, "
            f"{predictor.stats['packed_batches']} packed), "
            f"latency mean {np.mean(latencies):.2f}s "
            f"p95 {np.percentile(latencies, 95):.2f}s, useful {gflops:.1f} GFLOP/s",
            flush=True,
        )
    peaks.append(gemm_peak())
    peak = float(np.median(peaks))
    print(f"fp32 GEMM peak (numpy or XLA, 2048^3, before and after): {peaks[0]:.1f}, {peaks[1]:.1f} GFLOP/s")
    for name, result in results.items():
        result["share_of_gemm_peak"] = result["useful_gflops_per_s"] / peak
        print(f"{name:>15}: {100 * result['share_of_gemm_peak']:.0f}% of the GEMM peak in useful "
              f"FLOPs: no strategy can beat it by more than {1 / result['share_of_gemm_peak']:.2f}x")
    print(f"useful work {sum(useful) / len(useful) / 1e9:.2f} GFLOP per request with cached "
          f"prompt states ({100 * cached:.1f}% of running the prompt per request)")
    disagreements, max_diff = 0, 0.0
    for by_strategy in answers.values():
        reference = by_strategy["mixed"]
        for other in by_strategy.values():
            disagreements += other.index != reference.index
            max_diff = max(
                max_diff, float(np.max(np.abs(np.subtract(other.scores, reference.scores))))
            )
    # throughput ratio on the same windows: (mixed's requests/s) / (other's requests/s)
    ratios = {}
    for name, seconds in window_seconds.items():
        if name != "mixed":
            ratios[f"mixed/{name}"] = sum(seconds) / sum(window_seconds["mixed"][: len(seconds)])
    for name, ratio in ratios.items():
        print(f"throughput ratio {name}: {ratio:.2f}x")
    print(f"strategies disagree on {disagreements} predictions; max |score diff| {max_diff:.2e}")
    return {
        "strategies": results,
        "ratios": ratios,
        "warmup_s": warmup,
        "gemm_peak_gflops_per_s": peaks,
        "useful_share_of_running_the_prompt": cached,
        "shapes": len(shapes),
        "disagreements": disagreements,
        "max_score_diff": max_diff,
    }


def ensemble(args, backbone, library, workdir: Path) -> dict:
    from spot.train import TrainConfig, train

    task = get_task(args.ensemble_task)
    ids, started = [], time.perf_counter()
    for seed in range(args.ensemble_size):
        config = TrainConfig(
            task=task.name,
            backbone=backbone.name,
            prompt_length=args.ensemble_length,
            steps=args.steps,
            key_step=max(1, args.steps // 3),
            eval_every=max(1, args.steps // 2),
            eval_examples=args.eval_examples,
            max_length=args.ensemble_max_length,
            seed=seed,
        )
        result = train(backbone, task, config, workdir / f"{task.name}-{seed}", show_progress=False)
        published = library.publish(
            workdir / f"{task.name}-{seed}" / "key.safetensors",
            workdir / f"{task.name}-{seed}" / "value.safetensors",
        )
        ids.append(published.value)
        print(
            f"trained {task.name} seed {seed}: best validation {result.metric} "
            f"{result.value_score:.1f} at step {result.value_step} "
            f"({time.perf_counter() - started:.0f}s so far)",
            flush=True,
        )
    predictor = Predictor(
        backbone,
        library,
        batch_size=args.batch_size,
        bucket=args.bucket,
        max_length=args.ensemble_max_length,
    )
    started = time.perf_counter()
    report = ensemble_report(
        predictor, task, ids, split="test", limit=args.ensemble_examples, seed=args.seed
    )
    print(report.render())
    print(f"ensemble evaluation: {time.perf_counter() - started:.0f}s", flush=True)
    return {**report.to_dict(), "prompt_ids": ids, "steps": args.steps}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--per-task", type=int, default=64)
    parser.add_argument("--window", type=int, default=16, help="latency budget, in arrivals")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--bucket", type=int, default=32, help="context length bucket (tokens)")
    parser.add_argument("--max-length", type=int, default=64, help="context tokens kept")
    parser.add_argument("--prompt-length", type=int, default=20)
    parser.add_argument(
        "--sample-windows",
        type=int,
        default=4,
        help="windows timed for the slow per-task-fixed and single strategies",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-throughput", action="store_true")
    parser.add_argument("--no-ensemble", action="store_true")
    parser.add_argument("--ensemble-task", default="mpqa")
    parser.add_argument("--ensemble-size", type=int, default=3)
    parser.add_argument("--ensemble-length", type=int, default=20)
    parser.add_argument("--ensemble-max-length", type=int, default=32)
    parser.add_argument("--ensemble-examples", type=int, default=200)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-examples", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    backbone = backbones.load()
    out = {"backbone": backbone.identity, "args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        library = Library(Path(tmp) / "library")
        publish_stand_ins(library, backbone, args.tasks, args.prompt_length)
        if not args.no_throughput:
            out["throughput"] = throughput(args, backbone, library)
        if not args.no_ensemble:
            out["ensemble"] = ensemble(args, backbone, library, Path(tmp))
        library.close()
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
