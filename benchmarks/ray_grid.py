"""One `spot study` grid run sequentially and on a local Ray (`--workers` workers x 1 CPU).

Both runs train the same grid from scratch into fresh folders after a warm-up run (one sequential
grid into a throwaway folder), so both find XLA's persistent compilation cache warm; the results
must agree cell for cell. Prints wall times, their ratio, Ray's start-up time, the mean time per
run on the workers and the load average (the machine may be shared: say so with the numbers).

    .venv/bin/python benchmarks/ray_grid.py                      # SmolLM2, 2 x 2 grid, 8 runs
    .venv/bin/python benchmarks/ray_grid.py --no-warmup --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ray  # noqa: E402
from _common import machine  # noqa: E402

from spot import backbones  # noqa: E402
from spot.ray_runner import RayOptions, run_study_on_ray  # noqa: E402
from spot.study import StudyConfig, run_study  # noqa: E402
from spot.train import TrainConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default=backbones.DEFAULT_BACKBONE)
    parser.add_argument("--sources", default="mr,subj")
    parser.add_argument("--targets", default="trec,cola")
    parser.add_argument("--steps", type=int, default=8, help="steps of every run")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers, 1 CPU each")
    parser.add_argument("--no-warmup", action="store_true")
    args = parser.parse_args()
    base = TrainConfig.build(task="base", backbone=args.backbone, steps=args.steps,
                             key_step=max(1, args.steps // 2), eval_every=args.steps,
                             eval_examples=16, prompt_length=8, batch_size=8)
    config = StudyConfig(tuple(args.sources.split(",")), tuple(args.targets.split(",")), base,
                         base, (0,), test_examples=32)
    runs = len(config.sources) + len(config.targets) * (1 + len(config.sources))
    print(json.dumps(machine(), indent=1))
    work = Path(tempfile.mkdtemp(prefix="spot_ray_bench_"))
    try:
        start = time.perf_counter()
        model = backbones.load(args.backbone)
        load = time.perf_counter() - start
        if not args.no_warmup:
            run_study(model, config, work / "warmup")
        start = time.perf_counter()
        run_study(model, config, work / "sequential")
        sequential = time.perf_counter() - start + load  # as a fresh `spot study` process
        start = time.perf_counter()
        ray.init(address="local", num_cpus=args.workers, include_dashboard=False,
                 log_to_driver=False)
        startup = time.perf_counter() - start
        run_study_on_ray(args.backbone, config, work / "ray", options=RayOptions())
        on_ray = time.perf_counter() - start
        ray.shutdown()
        same = all((work / "sequential" / f).read_text() == (work / "ray" / f).read_text()
                   for f in ("results.jsonl", "similarity.jsonl"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{runs} runs ({args.steps} steps each), backbone {args.backbone}; load average now "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"sequential (incl. one backbone load, {load:.1f} s): {sequential:.1f} s")
    print(f"Ray, {args.workers} workers x 1 CPU (incl. Ray start-up {startup:.1f} s): "
          f"{on_ray:.1f} s")
    print(f"ratio sequential / Ray: {sequential / on_ray:.2f}x; results identical: {same}")


if __name__ == "__main__":
    main()
