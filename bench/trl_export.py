"""Does `flywheel export` load in TRL as it is? Rankings from a live server, exported, trained
on by TRL's RewardTrainer, and read back by `flywheel learn --import-preferences` (issue 20).

    bash bench/trl_setup.sh 116                 # .venv-trl116: TRL 1.16 and its datasets
    .venv/bin/python bench/trl_export.py        # table on stdout, JSON in bench/out/

1. Ours (.venv): `flywheel serve` on a tiny random model; a scripted labeler ranks 4 chat
   completions per prompt (`longer`) through the HTTP API; `flywheel export --format pairs`
   and `--format rankings` write JSONL; the learner's reader takes both back
   (`preference_data`, what --import-preferences runs), and the pairs it reads from the
   rankings file must be the lines of the pairs file.
2. TRL (.venv-trl116, its own process): `datasets.load_dataset("json")` on the pairs file,
   unchanged (prompt, chosen, rejected and our metadata columns), into `RewardTrainer` with a
   sequence-classification head on the same tiny model; pairwise accuracy on those pairs before
   and after --steps steps, and the loss.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rankings", type=int, default=64)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--trl", type=Path, default=None, help=argparse.SUPPRESS)  # TRL's half
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "trl_export.json")
    return p.parse_args()


def ours(work: Path, rankings: int) -> dict[str, object]:
    from bench.harness import FLYWHEEL, ServerProcess
    from flywheel_cli.labelers import Labeler, demo_prompts, preference_from_spec
    from flywheel_client import FlywheelClient
    from flywheel_demo.model import build_tiny_model
    from flywheel_learner.preference_data import read_preferences

    model = build_tiny_model(work / "model", seed=0)
    server = ServerProcess(model, work / "data").start()
    try:
        with FlywheelClient(server.grpc) as client:
            labeler = Labeler(client, preference_from_spec("longer"), name="trl-export", k=4,
                              max_tokens=12)  # fmt: skip
            submitted = labeler.run(demo_prompts(seed=5), count=rankings).submitted
        for fmt in ("pairs", "rankings"):
            subprocess.run([FLYWHEEL, "export", "--server", server.grpc, "--format", fmt,
                            "--out", str(work / f"{fmt}.jsonl")], check=True)  # fmt: skip
    finally:
        server.stop()
    pair_lines = (work / "pairs.jsonl").read_text().splitlines()
    back_pairs = read_preferences(work / "pairs.jsonl")
    back_rankings = read_preferences(work / "rankings.jsonl")
    from_rankings = sum(
        len(a) * len(b) - sum(x == y for x in a for y in b)
        for _, tiers in back_rankings
        for i, a in enumerate(tiers)
        for b in tiers[i + 1 :]
    )  # the ordered pairs of each ranking, as the pairs format writes them
    return {"rankings_submitted": submitted, "pair_lines": len(pair_lines),
            "pairs_read_back": len(back_pairs), "rankings_read_back": len(back_rankings),
            "pairs_in_rankings": from_rankings}  # fmt: skip


def trl_half(work: Path, steps: int) -> dict[str, object]:
    """Runs under .venv-trl116: TRL takes the export as it is."""
    import tempfile

    import torch
    import trl
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    data = load_dataset("json", data_files=str(work / "pairs.jsonl"), split="train")
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForSequenceClassification.from_pretrained(work / "model", num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id

    @torch.no_grad()
    def accuracy(m: torch.nn.Module) -> float:
        m.eval()
        right = 0
        for row in data:
            scores = []
            for side in ("chosen", "rejected"):
                ids = tokenizer(row["prompt"] + row[side], return_tensors="pt",
                                add_special_tokens=False)  # fmt: skip
                scores.append(float(m(**ids).logits[0, 0]))
            right += scores[0] > scores[1]
        return right / len(data)

    before = accuracy(model)
    args = RewardConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-export-"), per_device_train_batch_size=16,
        max_steps=steps, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, bf16=False, max_length=256, seed=0, disable_tqdm=True,
    )  # fmt: skip
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="SEQ_CLS")
    trainer = RewardTrainer(model=model, args=args, train_dataset=data,
                            processing_class=tokenizer, peft_config=lora)  # fmt: skip
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"trl_version": trl.__version__, "columns": data.column_names, "pairs": len(data),
            "accuracy_before": before, "accuracy_after": accuracy(trainer.model),
            "loss_first": losses[0], "loss_last": losses[-1]}  # fmt: skip


def main() -> None:
    args = parse_args()
    if args.trl is not None:
        print(json.dumps(trl_half(args.trl, args.steps)))
        return
    python = ROOT / ".venv-trl116" / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{python} is missing: run `bash bench/trl_setup.sh 116` first")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        report = {"flywheel": ours(work, args.rankings)}
        done = subprocess.run([str(python), __file__, "--trl", str(work), "--steps",
                               str(args.steps)], capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=""))  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"TRL's half failed:\n{done.stderr[-3000:]}")
        report["trl"] = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
