"""SPoT vs Hugging Face PEFT prompt tuning: training and scoring speed on one CPU, in one run.

Both sides use the same SmolLM2-135M-Instruct weights (our cached HF-layout directory, loaded by
transformers' LlamaForCausalLM for PEFT), the same real SST-2 rows, batch 8, max length 128,
prompt length 20, the same initial prompt and the Adafactor family (optax adafactor with the
trainer's defaults vs transformers.optimization.Adafactor with lr 0.3, decay_rate -0.8,
scale_parameter=False, relative_step=False, weight decay 1e-5). The loss is the LM loss of the
gold answer's tokens (rank classification); scoring is the log-likelihood of each choice's token.

Every measurement is a round-robin over the variants (order rotated per round) and the report gives
medians over rounds and the median of the per-round ratios, never a single absolute time.

    .venv/bin/python benchmarks/run.py                 # writes benchmarks/RESULTS.md
    .venv/bin/python benchmarks/run.py --quick         # fewer rounds and batches, prints only
    .venv/bin/python benchmarks/run.py --ablations     # + each fast-path option switched off
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from _common import (  # noqa: E402
    GEMM_CALLS,
    GEMM_N,
    PEAKS,
    gemm_variants,
    gflops,
    interleaved,
    llama_forward_flops,
    machine,
    median_ratio,
    timed,
    train_flops,
)
from _ours import OursScore, OursTrain, with_paths  # noqa: E402

from spot import backbones  # noqa: E402
from spot.backbones.base import PACK_CHUNK  # noqa: E402
from spot.backbones.llama_fast import FAST  # noqa: E402
from spot.batching import encode, eval_batches, make_batch, train_rows  # noqa: E402
from spot.prompts import initial_prompt  # noqa: E402
from spot.tasks import get_task  # noqa: E402
from spot.tasks.splits import subset  # noqa: E402

BATCH, MAX_LENGTH, PROMPT_LENGTH = 8, 128, 20


def load_peft(model_dir: Path, prompt: np.ndarray):
    import torch
    from peft import PromptTuningConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = get_peft_model(
        base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=PROMPT_LENGTH)
    )
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(torch.from_numpy(prompt))
    return model


def torch_batch(batch, tight: bool):
    """Our batch as torch tensors: context + gold answer, labels -100 outside the answer."""
    import torch

    tokens, mask = batch["tokens"], batch["mask"]
    if tight:  # pad only to the longest row (what a HF collator does), not to our bucket
        width = int(mask.sum(1).max())
        tokens, mask = tokens[:, -width:], mask[:, -width:]
    rows = np.arange(len(tokens))
    gold = batch["choices"][rows, batch["labels"]]
    gold_mask = batch["choice_mask"][rows, batch["labels"]]
    ids = np.concatenate([tokens, gold], 1)
    attention = np.concatenate([mask, gold_mask], 1)
    labels = np.full_like(ids, -100)
    labels[:, -gold.shape[1] :] = np.where(gold_mask > 0, gold, -100)
    return {
        "input_ids": torch.from_numpy(ids.astype(np.int64)),
        "attention_mask": torch.from_numpy(attention.astype(np.int64)),
        "labels": torch.from_numpy(labels.astype(np.int64)),
        "gold": torch.from_numpy(gold.astype(np.int64)),
        "gold_mask": torch.from_numpy(gold_mask.astype(np.float32)),
        "context_ids": torch.from_numpy(tokens.astype(np.int64)),
        "context_mask": torch.from_numpy(mask.astype(np.int64)),
        "choices": torch.from_numpy(batch["choices"][..., 0].astype(np.int64)),
    }


class PeftTrain:
    """PEFT prompt tuning steps. `keep=False`: the standard forward with labels (full logits);
    `keep=True`: hand-optimised, logits only at the answer positions (`logits_to_keep`)."""

    def __init__(self, model, batches, keep: bool, tight: bool = False):
        from transformers.optimization import Adafactor

        self.model, self.keep = model, keep
        self.batches = [torch_batch(b, tight) for b in batches]
        params = [p for p in model.parameters() if p.requires_grad]
        assert sum(p.numel() for p in params) == PROMPT_LENGTH * model.config.hidden_size
        self.optimizer = Adafactor(params, lr=0.3, decay_rate=-0.8, weight_decay=1e-5,
                                   scale_parameter=False, relative_step=False, warmup_init=False)
        self.losses: list[float] = []

    def loss(self, b):
        import torch

        if not self.keep:
            return self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                              labels=b["labels"]).loss
        k = b["gold"].shape[1]
        logits = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                            logits_to_keep=k + 1).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), b["gold"], reduction="none")
        return (nll * b["gold_mask"]).sum() / b["gold_mask"].sum().clamp(min=1.0)

    def step(self, b) -> float:
        loss = self.loss(b)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss)

    def __call__(self) -> None:
        self.model.train(False)  # no dropout (Llama has none; keeps both sides deterministic)
        self.losses = [self.step(b) for b in self.batches]


class PeftScore:
    """Log-likelihood of each single-token choice at the last context position, no grad."""

    def __init__(self, model, batches, keep: bool, tight: bool = False):
        self.model, self.keep = model, keep
        self.batches = [torch_batch(b, tight) for b in batches]

    def __call__(self) -> list[np.ndarray]:
        import torch

        out = []
        with torch.inference_mode():
            for b in self.batches:
                kwargs = {"logits_to_keep": 1} if self.keep else {}
                logits = self.model(input_ids=b["context_ids"], attention_mask=b["context_mask"],
                                    **kwargs).logits[:, -1]
                log_probs = torch.log_softmax(logits.float(), -1)
                out.append(torch.gather(log_probs, 1, b["choices"]).numpy())
        return out


# ----------------------------------------------------------------------------- measurements
def peak_per_round(times) -> np.ndarray:
    """GFLOP/s of the faster GEMM in each round."""
    flop = 2 * GEMM_N**3 * GEMM_CALLS
    return np.max([flop / np.asarray(times[name]) / 1e9 for name in PEAKS], axis=0)


def share_of_peak(times, name, flops) -> tuple[float, float, float]:
    """(median achieved GFLOP/s, median peak GFLOP/s, median per-round achieved/peak)."""
    achieved = flops / np.asarray(times[name]) / 1e9
    peak = peak_per_round(times)
    return float(np.median(achieved)), float(np.median(peak)), float(np.median(achieved / peak))


def step_flops(cfg, batches, opts, train: bool, states: bool = False) -> float:
    """Analytic matmul FLOPs of our step over all batches (see _common.llama_forward_flops).
    `states` (scoring): from prefix states, so the prompt runs once for all the batches."""
    total = sum(llama_forward_flops(cfg, 0, 0, PROMPT_LENGTH, True, 0).values()) if states else 0.0
    for b in batches:
        n, t = b["tokens"].shape
        k = b["choices"].shape[-1]
        if train:
            t, answer_rows = t + k - 1, n * k  # the last answer token is not run
        else:
            answer_rows = n * b["choices"].shape[1]  # single-token answers: last position
        if opts is not None and opts.pack and "pack" in b:  # one stream, banded attention
            keys = b["pack_window"].shape[0] + PACK_CHUNK if opts.band else None
            fwd = llama_forward_flops(cfg, 1, b["pack"].shape[0], PROMPT_LENGTH, True,
                                      answer_rows, keys, states)
        elif opts is None:  # plain path: prompt in every row, every layer at every column
            fwd = llama_forward_flops(cfg, n, t + PROMPT_LENGTH, 0, False, answer_rows)
        else:
            fwd = llama_forward_flops(
                cfg, n, t if opts.share_prefix else t + PROMPT_LENGTH,
                PROMPT_LENGTH if opts.share_prefix else 0, opts.share_prefix, answer_rows,
                cached=states,
            )
        total += train_flops(fwd) if train else sum(fwd.values())
    return total


def shape_name(batch) -> str:
    """What a compiled step is specialised to: the context length or the packed-stream size."""
    if "pack" in batch:
        return f"stream {batch['pack'].shape[0]}, window {batch['pack_window'].shape[0]}"
    return f"length {batch['tokens'].shape[1]}"


def first_call_seconds(fn_per_batch, batches) -> dict[str, float]:
    """Seconds of the first call per distinct batch shape (compile + one run)."""
    seen: dict[str, float] = {}
    for b in batches:
        length = shape_name(b)
        if length not in seen:
            seen[length] = timed(lambda b=b: fn_per_batch(b))
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--train-batches", type=int, default=4)
    parser.add_argument("--score-batches", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="3 rounds, 3+4 batches, no file")
    parser.add_argument("--ablations", action="store_true", help="time each fast-path option off")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.train_batches, args.score_batches = 3, 2, 3
    command = "  ".join([".venv/bin/python benchmarks/run.py", *sys.argv[1:]]).strip()
    import torch

    info = machine()
    info["torch threads"] = str(torch.get_num_threads())
    info["jax devices"] = str(jax.devices())
    print(info, flush=True)

    backbone = backbones.load()
    model_dir = backbones.smollm2_dir()
    task = get_task("sst2")
    encoded = encode(backbone, task.load("train"), max_length=MAX_LENGTH)
    def train_set(pack: bool) -> list[dict]:
        return [make_batch(encoded, train_rows(len(encoded), BATCH, step, 0), backbone.pad_id,
                           max_length=MAX_LENGTH, batch_size=BATCH, pack=pack)
                for step in range(args.train_batches)]

    valid = encode(backbone, subset(task.load("validation"), BATCH * args.score_batches),
                   max_length=MAX_LENGTH)

    def score_set(pack: bool) -> list[dict]:
        return [b for _, b in eval_batches(valid, BATCH, backbone.pad_id, max_length=MAX_LENGTH,
                                           pack=pack)]

    # padded batches for PEFT and the unpacked variants, packed ones (where packing pays) for ours
    train_batches, score_batches = train_set(False), score_set(False)
    packed = {"train": train_set(True), "score": score_set(True)}
    prompt = np.asarray(initial_prompt(backbone, "sampled_vocab", PROMPT_LENGTH, 0,
                                       list(task.load("train")[0].choices)), np.float32)
    lengths = {"train": [b["tokens"].shape[1] for b in train_batches],
               "score": [b["tokens"].shape[1] for b in score_batches],
               "packed train": [shape_name(b) for b in packed["train"]],
               "packed score": [shape_name(b) for b in packed["score"]]}
    print("context lengths (bucketed)", lengths, flush=True)

    # --- our variants: fast-path options (None = the plain Flax path)
    opts_of = {"ours (fast path)": FAST, "ours (plain Flax path, before)": None,
               "ours (fast path, no packing)": dataclasses.replace(FAST, pack=False)}
    if args.ablations:
        for field, off in (("share_prefix", False), ("band", False), ("unroll", True)):
            opts_of[f"fast, {field}={off}"] = dataclasses.replace(FAST, **{field: off})
    # the fast path's step as one jitted program (layers in a lax.scan): before layer-by-layer
    one_program = "ours (fast path, one program)"
    opts_of[one_program] = FAST
    ours_variants = {name: with_paths(backbone, opts, layerwise=name != one_program)
                     for name, opts in opts_of.items()}

    def batches_of(name: str, phase: str) -> list[dict]:
        opts = opts_of[name]
        padded = train_batches if phase == "train" else score_batches
        return packed[phase] if opts is not None and opts.pack else padded

    # --- training
    trains = {name: OursTrain(bb, prompt, batches_of(name, "train"))
              for name, bb in ours_variants.items()}
    compile_train = {}
    for name, runner in trains.items():
        compile_train[name] = first_call_seconds(runner.step, runner.batches)
    peft_model = load_peft(model_dir, prompt)
    trains["PEFT (labels, full logits)"] = PeftTrain(peft_model, train_batches, keep=False)
    trains["PEFT (logits_to_keep)"] = PeftTrain(peft_model, train_batches, keep=True)
    trains["PEFT (logits_to_keep, tight padding)"] = PeftTrain(peft_model, train_batches, keep=True,
                                                                tight=True)
    for runner in trains.values():
        runner()  # warm-up round (compiles the remaining buckets, torch allocator)
    gemms = gemm_variants()
    train_times = interleaved(trains | gemms, args.rounds)
    n_train = BATCH * len(train_batches)

    # --- scoring
    scores = {name: OursScore(bb, prompt, batches_of(name, "score"))
              for name, bb in ours_variants.items() if name != one_program}  # same scoring
    compile_score = {}
    for name, runner in scores.items():
        compile_score[name] = first_call_seconds(
            lambda b, r=runner: np.asarray(r.backbone.score(r.scoring_prompt(), b)), runner.batches)
    scores["PEFT (full logits)"] = PeftScore(peft_model, score_batches, keep=False)
    scores["PEFT (logits_to_keep=1)"] = PeftScore(peft_model, score_batches, keep=True)
    scores["PEFT (logits_to_keep=1, tight padding)"] = PeftScore(peft_model, score_batches,
                                                                 keep=True, tight=True)
    results = {name: runner() for name, runner in scores.items()}
    agree = {name: float(np.max(np.abs(np.concatenate(r) - np.concatenate(results["ours (plain Flax path, before)"]))))
             for name, r in results.items() if name.startswith(("ours", "fast"))}
    score_times = interleaved(scores | gemms, args.rounds)
    n_score = BATCH * len(score_batches)

    # --- loss parity with PEFT on unpadded rows (PEFT ignores position ids, so compare without
    # left padding): one row at a time, fresh prompt
    parity = loss_parity(backbone, model_dir, prompt, encoded)

    # --- FLOPs
    flops = {name: step_flops(backbone.config, batches_of(name, "train"), opts_of[name], True)
             for name in ours_variants}
    plain_flops = flops["ours (plain Flax path, before)"]
    sflops = {name: step_flops(backbone.config, batches_of(name, "score"), opts_of[name], False,
                               ours_variants[name].prefix_fn is not None)
              for name in ours_variants}
    fast_name, plain_name = "ours (fast path)", "ours (plain Flax path, before)"
    t_fast = share_of_peak(train_times, fast_name, flops[fast_name])
    t_model = share_of_peak(train_times, fast_name, plain_flops)
    t_plain = share_of_peak(train_times, plain_name, plain_flops)
    s_fast = share_of_peak(score_times, fast_name, sflops[fast_name])
    gemm_medians = {
        phase: {g: 2 * GEMM_N**3 * GEMM_CALLS / float(np.median(times[g])) / 1e9 for g in PEAKS}
        for phase, times in (("training rounds", train_times), ("scoring rounds", score_times))
    }

    # --- report
    def rate(times, name, n):
        return n / float(np.median(times[name]))

    lines = [
        "# Benchmark results: SPoT vs Hugging Face PEFT prompt tuning (CPU)",
        "",
        f"Command: `{command}` (from the repository root; `make bench` runs it without options).",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        "## Setup",
        "",
        f"- SmolLM2-135M-Instruct, fp32, from `{model_dir}` for both sides "
        "(transformers `LlamaForCausalLM.from_pretrained`, PEFT `PromptTuningConfig(task_type=CAUSAL_LM, "
        f"num_virtual_tokens={PROMPT_LENGTH})`, sdpa attention, torch {torch.get_num_threads()} threads).",
        f"- SST-2 rows from the task registry: {len(train_batches)} training batches "
        f"(`train_rows` steps 0..{len(train_batches) - 1}, seed 0) and {len(score_batches)} validation "
        f"batches, batch {BATCH}, max length {MAX_LENGTH}, our bucketing (multiples of 16); "
        f"context lengths: train {lengths['train']}, score {lengths['score']}. Our fast path runs "
        f"the same rows packed where the cost model says that saves a tenth "
        f"(`make_batch(pack=True)`; stream size and attention window): "
        f"train {lengths['packed train']}, score {lengths['packed score']}.",
        f"- Prompt length {PROMPT_LENGTH}, same initial prompt (sampled vocab, seed 0) on both sides; "
        "each training variant keeps training its own prompt across rounds.",
        "- Optimizers: optax adafactor (lr 0.3, decay 0.8, no parameter scaling, weight decay 1e-5) vs "
        "transformers.optimization.Adafactor(lr=0.3, decay_rate=-0.8, scale_parameter=False, "
        "relative_step=False, weight_decay=1e-5).",
        "- PEFT gets exactly our padded batches (left padding, same tensors) unless marked *tight "
        "padding* (padded only to the longest row of the batch, as a HF collator would).",
        f"- {args.rounds} rounds; every round runs every variant once over all its batches, "
        "in rotated order. Throughputs are medians over rounds; ratios are medians of per-round ratios.",
        "",
        f"## Matmul peak (fp32 {GEMM_N}^3 GEMM, measured inside the same rounds as the steps)",
        "",
        *[f"- {phase}: " + ", ".join(f"{g} {v:.1f} GFLOP/s" for g, v in per.items())
          for phase, per in gemm_medians.items()],
        "- shares of peak below are medians of per-round ratios to the faster GEMM of that round.",
        "",
        "## Training (forward + backward w.r.t. the prompt + Adafactor update)",
        "",
        "| variant | examples/s (median) | ours (fast) speed-up vs this |",
        "|---|---|---|",
    ]
    for name in trains:
        if name in PEAKS:
            continue
        lines.append(f"| {name} | {rate(train_times, name, n_train):.2f} | "
                     f"{median_ratio(train_times, name, 'ours (fast path)'):.2f}x |")
    lines += [
        "",
        "FLOPs are counted analytically (matmuls only: projections, attention, answer logits; "
        "backward = input gradients only; see `benchmarks/_common.py`). "
        "`cost_analysis()` is not used because it counts a `lax.scan` body once, not once per layer.",
        "",
        f"- our fast step executes {gflops(flops[fast_name] / len(train_batches))} GFLOP per batch "
        f"(the plain path {gflops(plain_flops / len(train_batches))}): {t_fast[0]:.1f} GFLOP/s "
        f"achieved vs a peak of {t_fast[1]:.1f} = **{100 * t_fast[2]:.0f}% of the measured peak**.",
        f"- the plain path's work (prompt in every row, every padded column) done in the fast "
        f"step's time: {t_model[0]:.1f} GFLOP/s = {100 * t_model[2]:.0f}% of peak (an effective "
        "rate, not hardware utilisation).",
        f"- the plain path: {t_plain[0]:.1f} GFLOP/s = {100 * t_plain[2]:.0f}% of peak.",
        "",
        "First call per bucket length (compile + one step), seconds:",
        "",
    ]
    for name, per in compile_train.items():
        lines.append(f"- {name}: " + ", ".join(f"{k}: {v:.1f}" for k, v in sorted(per.items())))
    lines += [
        "",
        "## Scoring (rank classification, single-token answers, no grad)",
        "",
        "| variant | examples/s (median) | ours (fast) speed-up vs this |",
        "|---|---|---|",
    ]
    for name in scores:
        if name in PEAKS:
            continue
        lines.append(f"| {name} | {rate(score_times, name, n_score):.2f} | "
                     f"{median_ratio(score_times, name, 'ours (fast path)'):.2f}x |")
    lines += [
        "",
        f"- fast scoring executes {gflops(sflops[fast_name] / len(score_batches))} GFLOP per batch: "
        f"{s_fast[0]:.1f} GFLOP/s vs a peak of {s_fast[1]:.1f} = {100 * s_fast[2]:.0f}% of peak.",
        "- max |score difference| vs the plain path: "
        + ", ".join(f"{k}: {v:.1e}" for k, v in agree.items()),
        "",
        "First call per bucket length (compile + one batch), seconds:",
        "",
    ]
    for name, per in compile_score.items():
        lines.append(f"- {name}: " + ", ".join(f"{k}: {v:.1f}" for k, v in sorted(per.items())))
    lines += [
        "",
        "## Same loss on both sides",
        "",
        "Unpadded single rows (PEFT ignores position ids, so left padding shifts its rotary "
        "positions; ours skips padding), same prompt, loss of the gold answer:",
        "",
        *[f"- {line}" for line in parity],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")


def loss_parity(backbone, model_dir, prompt, encoded, rows=(0, 1, 2)) -> list[str]:
    import torch

    model = load_peft(model_dir, prompt)
    model.train(False)
    out = []
    loss_fn = jax.jit(backbone.loss_fn)
    for r in rows:
        batch = make_batch(encoded, [r], backbone.pad_id, bucket=1, max_length=MAX_LENGTH)
        ours = float(loss_fn(backbone.params, jnp.asarray(prompt), batch, None))
        b = torch_batch(batch, tight=False)
        with torch.no_grad():
            theirs = float(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                 labels=b["labels"]).loss)
        out.append(f"row {r}: ours {ours:.5f}, PEFT {theirs:.5f}, |diff| {abs(ours - theirs):.1e}")
    return out


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - started:.0f} s")
