"""Keys of every study task under each candidate key protocol, on SmolLM2-135M-Instruct.

    python studies/task_embeddings/run.py          # resumes: finished keys are kept
    python studies/task_embeddings/analyze.py      # similarity matrices, clustering, figure

Writes keys/<protocol name>/<task>.safetensors (the key, with its wall time in the metadata).
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from library import save_prompt
from spot import backbones
from spot.task_embedding import default_protocol, embed_task
from spot.tasks import get_task

HERE = Path(__file__).resolve().parent
# Study family of each task (BIG-bench tasks all register as "bigbench"). Singletons (subj, cola)
# have no family partner and are left out of the nearest-neighbour share.
FAMILIES = {
    "sst2": "sentiment", "sst5": "sentiment", "mr": "sentiment", "mpqa": "sentiment",
    "bigbench_social_support": "sentiment",
    "rte": "nli", "cb": "nli", "bigbench_epistemic_reasoning": "nli",
    "bigbench_presuppositions_as_nli": "nli",
    "boolq": "qa", "multirc": "qa", "bigbench_strategyqa": "qa",
    "copa": "commonsense", "wsc": "commonsense", "bigbench_winowhy": "commonsense",
    "bigbench_sports_understanding": "commonsense",
    "agnews": "topic", "trec": "topic", "bigbench_intent_recognition": "topic",
    "subj": "subjectivity", "cola": "acceptability",
}
# name -> (recipe, objective) of each candidate protocol
PROTOCOLS = {
    "gradient-choices": ("gradient", "choices"),
    "gradient-lm": ("gradient", "lm"),
    "trained-lm": ("trained", "lm"),
}


def main() -> None:
    console = Console()
    model = backbones.load()
    for name, (recipe, objective) in PROTOCOLS.items():
        protocol, start = default_protocol(model, recipe, objective=objective)
        folder = HERE / "keys" / name
        folder.mkdir(parents=True, exist_ok=True)
        save_prompt(folder / "_start.safetensors", start, {"protocol": protocol.to_json()})
        for task_name in FAMILIES:
            path = folder / f"{task_name}.safetensors"
            if path.is_file():
                continue
            task = get_task(task_name)
            task.load("train")  # data loading is not the recipe's cost
            started = time.perf_counter()
            key = embed_task(model, task, protocol, start)
            seconds = time.perf_counter() - started
            save_prompt(path, key, {"task": task_name, "seconds": f"{seconds:.2f}",
                                    "protocol": protocol.to_json()})
            console.print(f"{name} {task_name}: {seconds:.1f}s")
    console.print(f"keys under {HERE / 'keys'}; {len(list((HERE / 'keys').rglob('*.sa*')))} files")


if __name__ == "__main__":
    main()
