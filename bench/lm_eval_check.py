"""lm-evaluation-harness through Flywheel: does `lm-eval --model local-completions` against
`flywheel serve` measure what `lm-eval --model hf` measures on the same weights?

1. The demo model (built under --data-dir on first use, as `make up` does) or --model.
2. A multiple-choice task (bench/lm_eval/flywheel_mc.yaml): --questions demo instructions,
   each rendered with the model's chat template, its answer among three mistakes a
   half-trained model makes; the JSONL is written to bench/out/lm_eval/ from code.
3. `flywheel serve` on the model (a fresh data dir: the live policy is the base weights), and
   lm-eval's local-completions model against its /v1/completions: prompts as token ids, echo,
   logprobs, one token (what lm-eval sends).
4. lm-eval's hf model on the same directory, in float32 on the CPU.
5. Accuracies side by side, and per choice the log-likelihood and is-greedy both measured.

    bash bench/lm_eval_setup.sh
    .venv/bin/python bench/lm_eval_check.py --out bench/out/lm_eval.json

A program, not a test (two lm-eval runs take minutes); docs/benchmarks.md has its table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import ServerProcess  # noqa: E402

LM_EVAL = ROOT / ".venv-lmeval" / "bin" / "lm_eval"
TASK_DIR = ROOT / "bench" / "lm_eval"
DATA = ROOT / "bench" / "out" / "lm_eval" / "flywheel_mc.jsonl"  # where the YAML looks
TASK = "flywheel_mc"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="a model directory (default: demo)")
    p.add_argument("--data-dir", type=Path, default=ROOT / ".flywheel",
                   help="where the demo model is built or found (make up's)")  # fmt: skip
    p.add_argument("--questions", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "lm_eval.json")
    return p.parse_args()


def write_task(model_dir: Path, questions: int, seed: int) -> None:
    from transformers import AutoTokenizer

    from flywheel_demo import task as demo_task
    from flywheel_demo.model import chat_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(seed)
    rows = []
    while len(rows) < questions:
        example = demo_task.sample_example(rng)
        wrong = list(dict.fromkeys(
            w for w in demo_task._wrong_candidates(example, rng) if w and w != example.answer
        ))  # fmt: skip
        if len(wrong) < 3:
            continue
        choices = [example.answer, *rng.sample(wrong, 3)]
        rng.shuffle(choices)
        rows.append({
            "prompt": chat_prompt(tokenizer, example.instruction) if tokenizer.chat_template
            else f"user: {example.instruction}\nassistant: ",  # a base model: plain lines
            "choices": choices,
            "label": choices.index(example.answer),
            "task": example.task,
        })  # fmt: skip
    DATA.parent.mkdir(parents=True, exist_ok=True)
    DATA.write_text("".join(json.dumps(r) + "\n" for r in rows))


def lm_eval(
    model: str, model_args: str, out: Path, *extra: str
) -> tuple[dict[str, float], list[dict]]:
    """Run lm-eval once; its (metrics, logged samples)."""
    command = [
        str(LM_EVAL), "--model", model, "--model_args", model_args, "--tasks", TASK,
        "--include_path", str(TASK_DIR), "--batch_size", "1", "--log_samples",
        "--output_path", str(out), *extra,
    ]  # fmt: skip
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, env={**os.environ, **OFFLINE}, check=True)
    [results] = sorted(out.rglob("results_*.json"))[-1:]
    [samples] = sorted(out.rglob(f"samples_{TASK}_*.jsonl"))[-1:]
    metrics = json.loads(results.read_text())["results"][TASK]
    logged = [json.loads(line) for line in samples.read_text().splitlines()]
    return metrics, sorted(logged, key=lambda s: s["doc_id"])


def choice_scores(sample: dict) -> list[tuple[float, bool]]:
    """(log-likelihood, is greedy) of each choice, as lm-eval logged them (it may log both
    as strings)."""
    return [(float(ll), str(greedy) == "True") for ll, greedy in sample["filtered_resps"]]


def main() -> None:
    args = parse_args()
    if not LM_EVAL.exists():
        sys.exit(f"no lm-eval at {LM_EVAL}: run `bash bench/lm_eval_setup.sh` first")
    if args.model is None:
        from flywheel_demo.model import ensure_demo_model

        model_dir = ensure_demo_model(args.data_dir).model_dir
    else:
        model_dir = args.model.resolve()
    write_task(model_dir, args.questions, args.seed)
    runs = ROOT / "bench" / "out" / "lm_eval" / time.strftime("%Y%m%d-%H%M%S")

    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(model_dir, Path(tmp) / "server").start()
        try:
            t0 = time.monotonic()
            served_args = (f"model=policy,base_url={server.http}/v1/completions,"
                           f"tokenizer={model_dir},tokenizer_backend=huggingface,"
                           "tokenized_requests=True,num_concurrent=1,max_retries=1")  # fmt: skip
            served, served_samples = lm_eval("local-completions", served_args, runs / "flywheel")
            served_s = time.monotonic() - t0
        finally:
            server.stop()
    t0 = time.monotonic()
    direct, direct_samples = lm_eval(
        "hf",
        f"pretrained={model_dir},dtype=float32,add_bos_token=False",
        runs / "hf",
        "--device",
        "cpu",
    )
    direct_s = time.monotonic() - t0

    pairs = [
        (a, b)
        for s, d in zip(served_samples, direct_samples, strict=True)
        for a, b in zip(choice_scores(s), choice_scores(d), strict=True)
    ]
    report = {
        "model": str(model_dir),
        "questions": args.questions,
        "choices_scored": len(pairs),
        "flywheel": {k: served[k] for k in ("acc,none", "acc_norm,none")},
        "hf": {k: direct[k] for k in ("acc,none", "acc_norm,none")},
        "max_abs_loglik_diff": max(abs(a[0] - b[0]) for a, b in pairs),
        "is_greedy_disagreements": sum(a[1] != b[1] for a, b in pairs),
        "flywheel_s": round(served_s, 1),
        "hf_s": round(direct_s, 1),
        "runs": str(runs.relative_to(ROOT)),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(
        "\n| lm-eval model | acc | acc_norm | seconds |\n|---|---:|---:|---:|\n"
        f"| local-completions via flywheel serve | {served['acc,none']:.4f} | "
        f"{served['acc_norm,none']:.4f} | {served_s:.0f} |\n"
        f"| hf (same weights, float32, CPU) | {direct['acc,none']:.4f} | "
        f"{direct['acc_norm,none']:.4f} | {direct_s:.0f} |"
    )


if __name__ == "__main__":
    main()
