"""Side by side with TRL: reward-model refit and one PPO step, ours vs TRL's, on identical inputs.

A program, not a test. Run it from our venv; it prepares the shared inputs, then runs our half
in our venv and TRL's halves in their own (made by bench/trl_setup.sh), each in a process of its
own:

    bash bench/trl_setup.sh                       # .venv-trl116 (RewardTrainer), .venv-trl112 (PPO)
    .venv/bin/python bench/trl_compare.py         # table on stdout, JSON in bench/out/trl_compare.json
    .venv/bin/python bench/trl_compare.py --k 4   # K-way rankings: bench/out/trl_compare_k4.json

Shared inputs (bench/out/trl_work/): one tiny random Llama (build_random_model), rankings of K
completions (K = 2: demo_task.preference_pairs; see demo_rankings), tokenised once with our
reward_tokens (prompt + completion + eos) and handed to TRL pre-tokenised as each ranking's
C(K, 2) pairs, a fixed reward tensor, and a fixed PPO tensor set (logp, old logp, advantages,
values, old values, returns, mask).

What is compared:
- reward loss: our ranking_loss over K-way rankings against RewardTrainer.compute_loss over
  their pairs, fed the same rewards through a stub model (TRL's own code path, minus the
  network).
- reward throughput: fit_reward_model vs RewardTrainer.train(), same rankings per step (TRL: all
  their pairs per step), steps, LoRA (r, alpha, targets), lr and cosine schedule. Ours forwards
  each completion of a ranking once, as the paper does, and each ranking's prompt once
  (prompt_sharing, through the lean forward); TRL forwards both sides of every pair, prompt
  included, so for K > 2 it does C(K, 2) * 2 / K times the forwards for the same comparisons.
  Our whole call also adds the LoRA adapter and tokenises the text; the row "TRL: +
  constructor" times RewardTrainer's constructor, which does that part on its side, with
  train(). Model heads differ by design: ours
  is base + LoRA + ScoreHead on the last hidden state, TRL's is LlamaForSequenceClassification
  + LoRA (its score layer trained in full via peft's modules_to_save).
- PPO loss: TRL 1.12 computes its losses inline in PPOTrainer.train() (no function to call),
  so the TRL side re-states those lines verbatim (see `trl_ppo_losses`) using TRL's own
  masked_mean; ours is ppo_math.policy_loss / value_loss. Both get the same mask for the policy
  and the value term (TRL's trainer itself masks values one token later, padding_mask_p1).
- PPO throughput: our ppo_step (gamma_ptx = 0, plain PPO) vs PPOTrainer.train(), same rollout
  batch, epochs, minibatches, max new tokens, temperature, LoRA policy. TRL keeps separate full
  reward and value models (the value model trained in full); ours hot-swaps adapters on one base.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
WORK = OUT / "trl_work"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def settings(args: argparse.Namespace) -> dict:
    return {
        "hidden": args.hidden, "layers": args.layers, "k": args.k,
        "rankings_per_step": args.batch, "pairs_per_step": args.batch * math.comb(args.k, 2),
        "reward_steps": args.reward_steps, "lora_r": 8, "lora_alpha": 16, "reward_lr": 1e-3,
        "reward_warmup": 1, "max_length": 128, "rollout_batch": args.rollout_batch,
        "ppo_steps": args.ppo_steps, "epochs": 2, "minibatches": 4, "max_new_tokens": 16,
        "ppo_lr": 3e-4, "beta": 0.02, "clip": 0.2, "value_clip": 0.2, "vf_coef": 0.5,
        "gamma": 1.0, "lam": 0.95, "seed": 0,
    }  # fmt: skip


# --- shared inputs (our venv) ------------------------------------------------------------------


def prepare(s: dict) -> None:
    from flywheel_demo import task as demo_task
    from flywheel_demo.model import build_random_model, chat_prompt
    from flywheel_model import loading, scoring

    WORK.mkdir(parents=True, exist_ok=True)
    model_dir = WORK / "model"
    build_random_model(
        model_dir, hidden=s["hidden"], layers=s["layers"], heads=4,
        intermediate=2 * s["hidden"], seed=s["seed"],
    )  # fmt: skip
    _, tok = loading.load_base(model_dir)
    rng = random.Random(s["seed"])
    rankings = demo_rankings(rng, s["rankings_per_step"] * s["reward_steps"], s["k"])
    # TRL's RewardTrainer takes pairs: every ranking becomes its C(K, 2) (better, worse) pairs.
    pairs = [
        (p, better, worse)
        for p, ranked in rankings
        for better, worse in itertools.combinations(ranked, 2)
    ]
    better = scoring.reward_tokens(tok, [(p, b) for p, b, _ in pairs], s["max_length"])
    worse = scoring.reward_tokens(tok, [(p, w) for p, _, w in pairs], s["max_length"])
    ids = [(b, w) for (b, _), (w, _) in zip(better, worse, strict=True)]
    prompts = [
        chat_prompt(tok, demo_task.sample_example(rng).instruction)
        for _ in range(s["rollout_batch"] * s["ppo_steps"])
    ]
    g = torch.Generator().manual_seed(s["seed"])
    b, t = 64, 16
    mask = torch.arange(t)[None, :] < torch.randint(4, t + 1, (b, 1), generator=g)
    old_logp = -torch.rand(b, t, generator=g) * 4
    old_values = torch.randn(b, t, generator=g)
    tensors = {
        # tier-major: rewards[t * 256 + i] is the tier-t completion of ranking i
        "rewards": torch.randn(s["k"] * 256, generator=g) * 2,
        "logp": old_logp + torch.randn(b, t, generator=g) * 0.3,
        "old_logp": old_logp,
        "advantages": torch.randn(b, t, generator=g),
        "values": old_values + torch.randn(b, t, generator=g) * 0.5,
        "old_values": old_values,
        "returns": old_values + torch.randn(b, t, generator=g),
        "mask": mask,
    }
    torch.save(tensors, WORK / "tensors.pt")
    (WORK / "inputs.json").write_text(
        json.dumps({"settings": s, "rankings": rankings, "ids": ids, "prompts": prompts})
    )


def demo_rankings(rng: random.Random, n: int, k: int) -> list[tuple[str, list[str]]]:
    """n rankings of k distinct completions, best first: K = 2 is demo_task's preference pairs;
    for K > 2 the correct answer leads, then k - 1 distinct wrong answers in the order drawn (a
    stand-in for a labeler's strict order: the speed comparison does not depend on it)."""
    from flywheel_demo import task as demo_task

    if k == 2:
        return [(p, [c, r]) for p, c, r in demo_task.preference_pairs(rng, n)]
    rankings: list[tuple[str, list[str]]] = []
    while len(rankings) < n:
        example = demo_task.sample_example(rng)
        ranked = [example.answer]
        for _ in range(20 * k):
            wrong = demo_task.wrong_answer(example, rng)
            if wrong not in ranked:
                ranked.append(wrong)
            if len(ranked) == k:
                rankings.append((example.instruction, ranked))
                break
    return rankings


def pair_rewards(r: torch.Tensor, k: int) -> torch.Tensor:
    """Tier-major rewards of K-way rankings as TRL's [chosen; rejected] logits over all pairs."""
    tiers = r.view(k, -1)
    pairs = list(itertools.combinations(range(k), 2))
    chosen = torch.cat([tiers[i] for i, _ in pairs])
    rejected = torch.cat([tiers[j] for _, j in pairs])
    return torch.cat([chosen, rejected])


# --- ours --------------------------------------------------------------------------------------


def run_ours(s: dict) -> dict:
    from flywheel_learner.losses import ranking_loss
    from flywheel_learner.ppo import ppo_step
    from flywheel_learner.ppo_config import PPOConfig
    from flywheel_learner.ppo_math import policy_loss, value_loss
    from flywheel_learner.ppo_models import SharedBaseModels, make_optimizer
    from flywheel_learner.reward import RewardConfig, fit_reward_model
    from flywheel_model import adapters, loading

    inputs = json.loads((WORK / "inputs.json").read_text())
    t = torch.load(WORK / "tensors.pt")
    out: dict = {}

    # reward loss: K tiers per ranking, every completion forwarded once (tier-major rewards)
    r = t["rewards"]
    n = r.shape[0] // s["k"]
    tiers = torch.arange(s["k"]).repeat_interleave(n)
    group = torch.arange(n).repeat(s["k"])
    out["reward_loss"] = float(ranking_loss(r, tiers, group))

    # reward throughput. peft is imported before the clock starts, as TRL's side imports its
    # libraries before its own: a process imports it once, not once per refit.
    import peft  # noqa: F401

    base, tok = loading.load_base(WORK / "model")
    rankings = [(p, [[c] for c in ranked]) for p, ranked in inputs["rankings"]]
    cfg = RewardConfig(
        steps=s["reward_steps"], lr=s["reward_lr"], r=s["lora_r"], alpha=s["lora_alpha"],
        target_modules=tuple(TARGETS), batch_rankings=s["rankings_per_step"],
        max_length=s["max_length"], held_out=0.0, seed=s["seed"], warmup=s["reward_warmup"],
    )  # fmt: skip
    t0 = time.perf_counter()
    fit = fit_reward_model(base, tok, rankings, cfg, progress=False)
    wall = time.perf_counter() - t0
    out["reward_train_seconds"] = wall
    out["reward_pairs_per_s"] = s["reward_steps"] * s["pairs_per_step"] / wall
    out["reward_setup_pairs_per_s"] = out["reward_pairs_per_s"]  # our call includes its setup
    out["reward_loop_pairs_per_s"] = s["reward_steps"] * s["pairs_per_step"] / fit.seconds
    out["reward_final_loss"] = fit.train_loss  # mean of the last 10 steps
    reward_dir = WORK / "reward-adapter"
    adapters.save_adapter(fit.model, fit.adapter_name, reward_dir, head=fit.head)

    # PPO loss on fixed tensors
    m = t["mask"]
    pol = policy_loss(t["logp"], t["old_logp"], t["advantages"], m, s["clip"])
    val = value_loss(t["values"], t["old_values"], t["returns"], m, s["value_clip"])
    out["ppo_policy_loss"] = float(pol.loss)
    out["ppo_value_loss"] = float(val.loss)
    out["ppo_policy_clipfrac"] = float(pol.clip_fraction)
    out["ppo_value_clipfrac"] = float(val.clip_fraction)

    # PPO throughput
    # final_norm_lr 0: TRL's policy trains the same LoRA matrices and nothing more
    pcfg = PPOConfig(
        beta=s["beta"], gamma_ptx=0.0, clip=s["clip"], value_clip=s["value_clip"],
        vf_coef=s["vf_coef"], gae_gamma=s["gamma"], gae_lambda=s["lam"], epochs=s["epochs"],
        minibatches=s["minibatches"], lr=s["ppo_lr"], max_new_tokens=s["max_new_tokens"],
        rollout_batch=s["rollout_batch"], lora_r=s["lora_r"], lora_alpha=s["lora_alpha"],
        target_modules=tuple(TARGETS), final_norm_lr=0.0, seed=s["seed"],
    )  # fmt: skip
    models = SharedBaseModels.build(WORK / "model", reward_dir, pcfg)
    opt, kl_ctl = make_optimizer(models, pcfg), pcfg.kl_controller()
    torch.manual_seed(s["seed"])
    prompts = inputs["prompts"]
    b = s["rollout_batch"]
    t0 = time.perf_counter()
    lengths = []
    for step in range(s["ppo_steps"]):
        st = ppo_step(models, opt, prompts[step * b : (step + 1) * b], None, pcfg, kl_ctl)
        lengths.append(st.response_length)
    wall = time.perf_counter() - t0
    out["ppo_train_seconds"] = wall
    out["ppo_samples_per_s"] = s["ppo_steps"] * b / wall
    out["ppo_mean_response_tokens"] = sum(lengths) / len(lengths)
    return out


# --- TRL 1.16: RewardTrainer -------------------------------------------------------------------


def trl_lora(s: dict, task_type: str) -> Any:  # a peft.LoraConfig, from the TRL venv
    """The LoRA both TRL trainers get: the same rank, alpha and targets as ours."""
    from peft import LoraConfig

    return LoraConfig(
        r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=0.0, target_modules=TARGETS,
        task_type=task_type,
    )  # fmt: skip


def run_trl116(s: dict) -> dict:
    from types import SimpleNamespace

    import trl
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    inputs = json.loads((WORK / "inputs.json").read_text())
    t = torch.load(WORK / "tensors.pt")
    tok = AutoTokenizer.from_pretrained(WORK / "model")
    model = AutoModelForSequenceClassification.from_pretrained(WORK / "model", num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    ds = Dataset.from_dict(
        {"chosen_ids": [c for c, _ in inputs["ids"]], "rejected_ids": [r for _, r in inputs["ids"]]}
    )
    tmp = tempfile.mkdtemp(prefix="trl116-")
    args = RewardConfig(
        output_dir=tmp, per_device_train_batch_size=s["pairs_per_step"], max_steps=s["reward_steps"],
        learning_rate=s["reward_lr"], lr_scheduler_type="cosine", warmup_steps=s["reward_warmup"],
        weight_decay=0.0, max_grad_norm=1.0, logging_steps=10_000, save_strategy="no",
        report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False,
        max_length=s["max_length"], dataloader_num_workers=0, seed=s["seed"],
        disable_tqdm=True,
    )  # fmt: skip
    lora = trl_lora(s, "SEQ_CLS")
    t0 = time.perf_counter()
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora
    )
    setup = time.perf_counter() - t0  # adds LoRA and prepares the dataset, as our call does
    out: dict = {"trl_version": trl.__version__}

    # loss on the same rewards through RewardTrainer.compute_loss (stub model returns them),
    # the K-way rankings' rewards laid out as TRL's pairs
    r = pair_rewards(t["rewards"], s["k"])

    def stub(**_: object) -> SimpleNamespace:
        return SimpleNamespace(logits=r[:, None])

    with torch.no_grad():
        out["reward_loss"] = float(
            trainer.compute_loss(
                stub, {"attention_mask": torch.ones(r.shape[0], 2, dtype=torch.long)}
            )
        )

    t0 = time.perf_counter()
    res = trainer.train()
    wall = time.perf_counter() - t0
    out["reward_train_seconds"] = wall
    out["reward_pairs_per_s"] = s["reward_steps"] * s["pairs_per_step"] / wall
    out["reward_setup_pairs_per_s"] = s["reward_steps"] * s["pairs_per_step"] / (setup + wall)
    out["reward_loop_pairs_per_s"] = (
        s["reward_steps"] * s["pairs_per_step"] / res.metrics["train_runtime"]
    )
    out["reward_final_loss"] = float(res.training_loss)  # mean over all steps
    out["reward_trainer_metrics"] = res.metrics
    return out


# --- TRL 1.12: experimental PPOTrainer ---------------------------------------------------------


def trl_ppo_losses(t: dict, s: dict) -> dict:
    """TRL 1.12 PPOTrainer.train()'s loss lines, verbatim but for names, with TRL's masked_mean.

    padding_mask is ~mask for both terms (TRL's trainer uses padding_mask_p1 for the value term).
    """
    from trl.experimental.ppo.ppo_trainer import masked_mean

    padding_mask = ~t["mask"]
    mb_values, mb_return, vpred = t["old_values"], t["returns"], t["values"]
    new_logprobs, mb_logprobs, mb_advantage = t["logp"], t["old_logp"], t["advantages"]
    vpredclipped = torch.clamp(vpred, mb_values - s["value_clip"], mb_values + s["value_clip"])
    vf_losses1 = torch.square(vpred - mb_return)
    vf_losses2 = torch.square(vpredclipped - mb_return)
    vf_loss_max = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * masked_mean(vf_loss_max, ~padding_mask)
    vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), ~padding_mask)
    logprobs_diff = new_logprobs - mb_logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -mb_advantage * ratio
    pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - s["clip"], 1.0 + s["clip"])
    pg_loss_max = torch.max(pg_losses, pg_losses2)
    pg_loss = masked_mean(pg_loss_max, ~padding_mask)
    pg_clipfrac = masked_mean((pg_losses2 > pg_losses).float(), ~padding_mask)
    return {
        "ppo_policy_loss": float(pg_loss), "ppo_value_loss": float(vf_loss),
        "ppo_policy_clipfrac": float(pg_clipfrac), "ppo_value_clipfrac": float(vf_clipfrac),
    }  # fmt: skip


def run_trl112(s: dict) -> dict:
    import trl
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    inputs = json.loads((WORK / "inputs.json").read_text())
    t = torch.load(WORK / "tensors.pt")
    out: dict = {"trl_version": trl.__version__}
    out.update(trl_ppo_losses(t, s))

    tok = AutoTokenizer.from_pretrained(WORK / "model", padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(WORK / "model")
    reward = AutoModelForSequenceClassification.from_pretrained(WORK / "model", num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(WORK / "model", num_labels=1)
    for m in (reward, value):
        m.config.pad_token_id = tok.pad_token_id
    b = s["rollout_batch"]
    prompts = inputs["prompts"][: b * s["ppo_steps"]]
    ds = Dataset.from_dict(
        {"input_ids": [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]}
    )
    tmp = tempfile.mkdtemp(prefix="trl112-")
    args = PPOConfig(
        output_dir=tmp, per_device_train_batch_size=b, gradient_accumulation_steps=1,
        num_mini_batches=s["minibatches"], num_ppo_epochs=s["epochs"],
        response_length=s["max_new_tokens"], total_episodes=b * s["ppo_steps"],
        local_rollout_forward_batch_size=b, learning_rate=s["ppo_lr"], kl_coef=s["beta"],
        cliprange=s["clip"], cliprange_value=s["value_clip"], vf_coef=s["vf_coef"],
        gamma=s["gamma"], lam=s["lam"], temperature=1.0, stop_token="eos",
        missing_eos_penalty=None, num_sample_generations=0, report_to=[], use_cpu=True,
        save_strategy="no", logging_steps=10_000, bf16=False, gradient_checkpointing=False,
        seed=s["seed"], disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    lora = trl_lora(s, "CAUSAL_LM")
    trainer = PPOTrainer(
        args=args, processing_class=tok, model=policy, ref_model=None, reward_model=reward,
        train_dataset=ds, value_model=value, peft_config=lora,
    )  # fmt: skip
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    out["ppo_train_seconds"] = wall
    out["ppo_samples_per_s"] = s["ppo_steps"] * b / wall
    return out


# --- orchestration ------------------------------------------------------------------------------


def run_part(venv: str, part: str, args: argparse.Namespace) -> dict:
    py = ROOT / venv / "bin" / "python"
    if not py.exists():
        return {"error": f"{py} missing: run bash bench/trl_setup.sh"}
    env = dict(os.environ, PYTHONPATH=str(ROOT / "learner"), OMP_NUM_THREADS=str(args.threads))
    cmd = [str(py), __file__, "--part", part, *sys.argv[1:]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": f"{part} exited {proc.returncode}", "stderr_tail": proc.stderr[-3000:]}
    return json.loads((WORK / f"{part}.json").read_text())


PARTS = {"ours": ".venv", "trl116": ".venv-trl116", "trl112": ".venv-trl112"}


def median(parts: list[dict]) -> dict:
    """Each number's median over the runs; other values from the first run (or its error)."""
    failed = [p for p in parts if "error" in p]
    if failed:
        return failed[0]
    return {
        k: statistics.median(p[k] for p in parts)
        if all(isinstance(p.get(k), (int, float)) for p in parts)
        else v
        for k, v in parts[0].items()
    }


def ratio(a: object, b: object) -> str:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return f"{a / b:.3f}"
    return "-"


def fmt(x: object) -> str:
    return f"{x:.6g}" if isinstance(x, float) else str(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["ours", "trl116", "trl112"])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument(
        "--k", type=int, default=2, help="completions per ranking (2: preference pairs)"
    )
    ap.add_argument(
        "--batch", type=int, default=16, help="rankings per step (TRL: their C(K,2) pairs)"
    )
    ap.add_argument("--reward-steps", type=int, default=60)
    ap.add_argument("--rollout-batch", type=int, default=16)
    ap.add_argument("--ppo-steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--repeats", type=int, default=3,
        help="runs of each side, interleaved (ours, TRL, ours, ...); the table gives medians",
    )  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    s = settings(args)
    if args.part:
        fn = {"ours": run_ours, "trl116": run_trl116, "trl112": run_trl112}[args.part]
        (WORK / f"{args.part}.json").write_text(json.dumps(fn(s), default=str))
        return

    prepare(s)
    # This machine's speed drifts from one minute to the next: interleave the sides, take medians.
    runs = [
        {part: run_part(venv, part, args) for part, venv in PARTS.items()}
        for _ in range(args.repeats)
    ]
    ours, t116, t112 = (median([run[part] for run in runs]) for part in PARTS)
    for i, run in enumerate(runs, 1):
        ours_run, trl_run = run["ours"], run["trl116"]
        loop, whole = (
            ratio(ours_run.get(key), trl_run.get(key))
            for key in ("reward_loop_pairs_per_s", "reward_pairs_per_s")
        )
        ppo = ratio(ours_run.get("ppo_samples_per_s"), run["trl112"].get("ppo_samples_per_s"))
        print(f"run {i}: reward ours/TRL loop {loop}, whole call {whole}; PPO ours/TRL {ppo}")
    rows = [
        (f"reward loss K={s['k']} (same rewards)", "reward_loss", t116),
        ("reward fit pairs/s (whole call)", "reward_pairs_per_s", t116),
        ("reward pairs/s (TRL: + constructor)", "reward_setup_pairs_per_s", t116),
        ("reward fit pairs/s (loop only)", "reward_loop_pairs_per_s", t116),
        ("reward fit seconds (whole call)", "reward_train_seconds", t116),
        ("PPO policy loss (same tensors)", "ppo_policy_loss", t112),
        ("PPO value loss (same tensors)", "ppo_value_loss", t112),
        ("PPO policy clip fraction", "ppo_policy_clipfrac", t112),
        ("PPO value clip fraction", "ppo_value_clipfrac", t112),
        ("PPO samples/s (whole call)", "ppo_samples_per_s", t112),
        ("PPO seconds", "ppo_train_seconds", t112),
    ]
    table = []
    print(f"{'quantity':34} {'ours':>14} {'TRL':>14} {'ours/TRL':>9}")
    for label, key, trl_side in rows:
        a, b = ours.get(key, "n/a"), trl_side.get(key, "n/a")
        table.append({"quantity": label, "ours": a, "trl": b, "ratio": ratio(a, b)})
        print(f"{label:34} {fmt(a):>14} {fmt(b):>14} {ratio(a, b):>9}")
    diffs = {
        k: abs(ours[k] - t[k])
        for k, t in [("reward_loss", t116), ("ppo_policy_loss", t112), ("ppo_value_loss", t112)]
        if isinstance(ours.get(k), float) and isinstance(t.get(k), float)
    }
    for k, d in diffs.items():
        print(f"|ours - TRL| {k}: {d:.3e}")
    for name, part in [("ours", ours), ("trl116", t116), ("trl112", t112)]:
        if "error" in part:
            print(f"{name}: {part['error']}\n{part.get('stderr_tail', '')}", file=sys.stderr)
    OUT.mkdir(parents=True, exist_ok=True)
    result = {
        "settings": s, "repeats": args.repeats, "table": table, "abs_diff": diffs,
        "ours": ours, "trl116": t116, "trl112": t112, "runs": runs,
    }  # fmt: skip
    path = OUT / ("trl_compare.json" if s["k"] == 2 else f"trl_compare_k{s['k']}.json")
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
