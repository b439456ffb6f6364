"""The continuous learner: export feedback, refit the reward model, PPO-ptx, gate, publish.

    flywheel learn --server 127.0.0.1:50051 --model DIR

One round reads top to bottom in `Learner.run_round`:
sync -> refit_reward -> train_policy -> evaluate -> gate -> publish. The learner talks to the
server only through the gRPC contract (ARCHITECTURE.md): it exports rankings and prompts past
its checkpointed cursors, and uploads adapters. Everything it needs to resume lives in
`work_dir` (see `checkpoint`, `feedback_log`, `publishing`).
"""

from __future__ import annotations

import hashlib
import logging
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from flywheel_client import FlywheelClient
from flywheel_learner import feedback_log, modeling
from flywheel_learner import metrics as learner_metrics
from flywheel_learner.checkpoint import PendingPublish, load_state, save_state
from flywheel_learner.gate import EvalMetrics, GateThresholds, gate
from flywheel_learner.ppo import (
    POLICY,
    PPOConfig,
    PtxText,
    SharedBaseModels,
    demo_pretraining_texts,
    make_optimizer,
    ppo_step,
    ptx_batches,
    read_pretraining_texts,
    sample_responses,
    save_policy,
)
from flywheel_learner.ppo_math import kl_k1, ptx_loss
from flywheel_learner.preference_data import read_preferences
from flywheel_learner.publishing import archive_sha256, publish, recover
from flywheel_learner.reward import RankingText, RewardConfig, fit_reward_model, normalise_head_bias

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from flywheel_client import types as t
    from flywheel_learner.ppo import PtxBatch

log = logging.getLogger("flywheel.learner")

EVAL_SHARE = 0.2  # share of logged prompts (by a hash of their id) never trained on


class LearnerError(Exception):
    """A problem the operator must fix (wrong model, unreadable data); the message says how."""


@dataclass(frozen=True)
class LearnerConfig:
    """Everything `flywheel learn` runs with; `flywheel learn --help` maps onto it.

    server, api_key: gRPC target and an admin-scope key (None when auth is off).
    model_dir: the base the server serves, loaded again locally; its fingerprint must equal
        the server's `base_model`, or every adapter would be refused.
    work_dir: checkpoints, the exported feedback and every adapter this learner wrote.
    min_new_rankings, interval_s: wake when this many rankings arrived since the last round,
        or when interval_s passed and at least one did. poll_s: how often to look.
    max_rounds: stop after this many rounds (None = run until stopped).
    ppo_steps_per_round: `ppo_step` calls per round (each one rollout of ppo.rollout_batch).
    eval_prompts: held-out prompts the candidate and the live policy are compared on.
    gate: what a candidate must achieve to go live. rm_min_accuracy: held-out pairwise
        accuracy a refit reward model needs to be promoted (and used for PPO).
    pretraining: a .txt/.jsonl corpus for the ptx term; None = the demo task's answers.
    reward_init: a saved reward model the first refit warm-starts from (the demo's initial
        one under `flywheel up`); later refits start from the last promoted refit.
    import_preferences: JSONL preference files (`preference_data`) added to every refit.
    threads: torch CPU threads (0 = one per core). `flywheel up` gives the learner the cores
        its server does not use.
    """

    server: str
    model_dir: Path
    work_dir: Path
    api_key: str | None = None
    min_new_rankings: int = 16
    interval_s: float = 120.0
    poll_s: float = 5.0
    max_rounds: int | None = None
    # At most 4 passes over the rankings per refit: in a live run, 300 steps over the first
    # 32 rankings took the train loss to 3e-7 and the rewards to about -10. At most 100 steps
    # too: refits warm-start, so the reward model keeps learning from round to round, while a
    # refit over every ranking so far (186 steps at 1,485 rankings) took PPO's time.
    reward: RewardConfig = field(default_factory=lambda: RewardConfig(steps=100, max_epochs=4.0))
    ppo: PPOConfig = field(default_factory=PPOConfig)
    ppo_steps_per_round: int = 20
    # 16 prompts, one sample each, refused two good rounds in a row on noise (reward gain -0.12
    # and -0.04); 128 cost about a second more.
    eval_prompts: int = 128
    gate: GateThresholds = field(default_factory=GateThresholds)
    rm_min_accuracy: float = 0.55
    pretraining: Path | None = None
    reward_init: Path | None = None
    import_preferences: tuple[Path, ...] = ()
    seed: int = 0
    timeout_s: float = 120.0
    threads: int = 0

    def __post_init__(self) -> None:
        if not self.server:
            raise ValueError("server must be a gRPC address such as 127.0.0.1:50051")
        if not (Path(self.model_dir) / "config.json").is_file():
            raise ValueError(
                f"model_dir {self.model_dir} is not a Hugging Face model directory (no "
                "config.json); pass the directory the server serves"
            )
        if self.min_new_rankings < 1:
            raise ValueError(f"min_new_rankings must be >= 1, got {self.min_new_rankings}")
        for name in ("interval_s", "poll_s", "timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.max_rounds is not None and self.max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1 or None (forever), got {self.max_rounds}")
        if self.ppo_steps_per_round < 1:
            raise ValueError(f"ppo_steps_per_round must be >= 1, got {self.ppo_steps_per_round}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = one per core), got {self.threads}")
        if self.eval_prompts < 1:
            raise ValueError(f"eval_prompts must be >= 1, got {self.eval_prompts}")
        if not 0.0 <= self.rm_min_accuracy <= 1.0:
            raise ValueError(f"rm_min_accuracy must be in [0, 1], got {self.rm_min_accuracy}")
        for path in (*self.import_preferences, *([self.pretraining] if self.pretraining else [])):
            if not Path(path).is_file():
                raise ValueError(f"{path} does not exist or is not a file")
        if self.reward_init is not None:
            modeling.read_adapter_config(self.reward_init)  # a clear error if it is no adapter


# -- pure helpers --------------------------------------------------------------------------------


def should_wake(new_rankings: int, min_new: int, idle_s: float, interval_s: float) -> bool:
    """Wake on enough new rankings, or on the interval if anything at all arrived."""
    return new_rankings >= min_new or (new_rankings > 0 and idle_s >= interval_s)


def held_out(prompt_id: str) -> bool:
    """A stable EVAL_SHARE of prompts, chosen by id, never used for training."""
    bucket = int(hashlib.sha256(prompt_id.encode()).hexdigest()[:8], 16) / 0x1_0000_0000
    return bucket < EVAL_SHARE


def split_prompts(prompts: Sequence[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """(train, eval) prompt texts from logged (prompt_id, text) pairs."""
    train = [text for pid, text in prompts if not held_out(pid)]
    evaluation = [text for pid, text in prompts if held_out(pid)]
    return train, evaluation


def kv(event: str, **fields: Any) -> str:
    """One structured log line: `event=NAME key=value ...` (floats to 4 significant digits)."""
    parts = [f"event={event}"]
    for key, value in fields.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(f"{key}={text if ' ' not in text else repr(text)}")
    return " ".join(parts)


class Progress:
    """A tqdm bar per training loop on a terminal; key=value log lines per step otherwise."""

    def __init__(self, tty: bool | None = None) -> None:
        self.tty = sys.stderr.isatty() if tty is None else tty
        self._bar: Any = None

    def steps(self, total: int, desc: str) -> Iterator[int]:
        if not self.tty:
            yield from range(total)
            return
        from tqdm.auto import tqdm

        with tqdm(total=total, desc=desc, leave=False) as self._bar:
            for step in range(total):
                yield step
                self._bar.update(1)
        self._bar = None

    def step(self, event: str, **fields: Any) -> None:
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.3g}" if isinstance(v, float) else v
                                   for k, v in fields.items()}, refresh=False)  # fmt: skip
        else:
            log.info(kv(event, **fields))


class RewardRefit(NamedTuple):
    directory: Path
    accuracy: float
    promoted: bool


# -- the learner ---------------------------------------------------------------------------------


class Learner:
    """Runs rounds against one server. `client` is injectable for tests; it is closed by
    `close()` only when the learner made it."""

    def __init__(
        self,
        config: LearnerConfig,
        client: FlywheelClient | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.config = config
        self.work_dir = Path(config.work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._owns_client = client is None
        self.client = client or FlywheelClient(
            config.server, api_key=config.api_key, timeout=config.timeout_s
        )
        self.progress = progress or Progress()
        self.state = load_state(self.work_dir)
        self.base_model = self._check_base()
        self.imported = self._read_imports()
        self._started = time.time()

    def close(self) -> None:
        if self._owns_client:
            self.client.close()

    def _check_base(self) -> str:
        fingerprint = modeling.base_fingerprint(self.config.model_dir)
        info = self.client.server_info()
        if info.base_model != fingerprint:
            raise LearnerError(
                f"the server at {self.config.server} serves {info.model_path} (base "
                f"{info.base_model}), but {self.config.model_dir} has fingerprint {fingerprint}; "
                "pass --model the same directory the server was started with"
            )
        return fingerprint

    def _read_imports(self) -> list[RankingText]:
        rankings: list[RankingText] = []
        for path in self.config.import_preferences:
            rankings.extend(read_preferences(path))
        return rankings

    # -- the outer loop ----------------------------------------------------------------------

    def run(self) -> int:
        """Recover an interrupted publish, then wake and run rounds; returns rounds run."""
        log.info(
            kv("learner_start", server=self.config.server, work_dir=str(self.work_dir),
               rounds_done=self.state.round, min_new_rankings=self.config.min_new_rankings)
        )  # fmt: skip
        self.recover()
        rounds = 0
        while self.config.max_rounds is None or rounds < self.config.max_rounds:
            self.sync()
            if self.due():
                self.run_round()
                rounds += 1
            else:
                time.sleep(self.config.poll_s)
        return rounds

    def recover(self) -> None:
        self.state, _ = recover(self.client, self.work_dir, self.state, self.base_model)

    def due(self) -> bool:
        new = len(feedback_log.read_rankings(self.work_dir)) - self.state.rankings_at_last_round
        idle = time.time() - max(self.state.last_round_at, self._started)
        first_with_imports = self.state.round == 0 and bool(self.imported)
        wake = first_with_imports or should_wake(
            new, self.config.min_new_rankings, idle, self.config.interval_s
        )
        # A reward model needs pairs: rankings whose candidates all tied do not count.
        return wake and len(self.training_rankings()) >= 2

    def run_round(self) -> bool:
        """One round; True when the candidate policy passed the gate and went live."""
        number = self.state.round + 1
        log.info(kv("round_start", round=number))
        self.sync()
        refit = self.refit_reward(number)
        models = self.train_policy(self.reward_for_ppo(refit), number)
        metrics = self.evaluate(models)
        passed, reasons = gate(metrics, self.config.gate)
        live = self.publish_policy(models, metrics, passed, reasons, number)
        self.finish_round(number)
        return live

    # -- the steps of a round ----------------------------------------------------------------

    def sync(self) -> feedback_log.SyncResult:
        result = feedback_log.sync(self.client, self.work_dir, self.state)
        self.state = result.state
        if result.new_rankings or result.new_prompts:
            log.info(
                kv("synced", rankings=result.new_rankings, prompts=result.new_prompts,
                   rankings_cursor=self.state.rankings_cursor)
            )  # fmt: skip
        return result

    def training_rankings(self) -> list[RankingText]:
        logged = [(r.prompt, r.tiers) for r in feedback_log.read_rankings(self.work_dir)
                  if r.informative]  # fmt: skip
        return [*logged, *self.imported]

    def refit_reward(self, number: int) -> RewardRefit:
        """Fit a reward model on every ranking so far, save it, publish it (promoted if good)."""
        rankings = self.training_rankings()
        if len(rankings) < 2:
            raise LearnerError(
                f"a reward model needs at least 2 rankings with an order, have {len(rankings)}; "
                "collect more (e.g. `flywheel simulate`) or pass --import-preferences FILE"
            )
        base, tokenizer = modeling.load_base(self.config.model_dir)
        init = self.state.reward_dir or self.config.reward_init
        fit = fit_reward_model(
            base, tokenizer, rankings, self.config.reward, init=init, progress=self.progress.tty
        )
        # Centre on the best-ranked responses: what a good response earns scores 0.
        best = [(prompt, tiers[0][0]) for prompt, tiers in rankings if tiers and tiers[0]]
        normalise_head_bias(fit.model, fit.head, tokenizer, best,
                            max_length=self.config.reward.max_length)  # fmt: skip
        directory = modeling.save_adapter(
            fit.model, fit.adapter_name, self.work_dir / "adapters" / f"reward-r{number:04d}",
            head=fit.head, base_model=self.base_model,
        )  # fmt: skip
        accuracy = fit.held_out_accuracy
        promote = accuracy >= self.config.rm_min_accuracy  # NaN (nothing held out): no
        metrics = {"held_out_accuracy": accuracy, "train_loss": fit.train_loss,
                   "rankings": float(len(rankings))}  # fmt: skip
        log.info(kv("reward_fit", round=number, promote=promote, seconds=fit.seconds,
                    warm_start=fit.warm_start, **metrics))  # fmt: skip
        learner_metrics.reward_train_loss.set(fit.train_loss)
        learner_metrics.reward_accuracy.set(accuracy)
        learner_metrics.versions.labels("reward", "promoted" if promote else "refused").inc()
        self._publish("reward", directory, metrics, promote)
        if promote:
            self.state = self.state.replace(reward_dir=str(directory))
            save_state(self.work_dir, self.state)
        return RewardRefit(directory, accuracy, promote)

    def reward_for_ppo(self, refit: RewardRefit) -> Path:
        """The newest reward model that passed rm_min_accuracy, else this round's fit."""
        if refit.promoted or not self.state.reward_dir:
            return refit.directory
        return Path(self.state.reward_dir)

    def train_policy(self, reward_dir: Path, number: int) -> SharedBaseModels:
        """`ppo_steps_per_round` PPO-ptx steps on prompts drawn from the logged prompts."""
        ppo = self.config.ppo
        torch.manual_seed(self.config.seed + number)
        models = SharedBaseModels.build(self.config.model_dir, reward_dir, ppo)
        self._continue_from_live(models)
        optimizer = make_optimizer(models, ppo)
        kl_ctl = ppo.kl_controller()
        rng = random.Random(self.config.seed + number)
        train, _ = split_prompts(feedback_log.read_prompts(self.work_dir))
        prompts = train or demo_prompts(models.tokenizer, rng, 64)
        ptx = (
            ptx_batches(models.tokenizer, self.pretraining_texts(models.tokenizer, rng),
                        ppo.ptx_batch, ppo.ptx_max_length, rng)
            if ppo.gamma_ptx > 0 else None
        )  # fmt: skip
        for step in self.progress.steps(self.config.ppo_steps_per_round, f"ppo r{number}"):
            batch = rng.choices(prompts, k=ppo.prompts_per_step)
            stats = ppo_step(models, optimizer, batch, next(ptx) if ptx else None, ppo, kl_ctl)
            learner_metrics.ppo_steps.inc()
            learner_metrics.ppo_reward.set(stats.reward_mean)
            learner_metrics.ppo_kl.set(stats.kl_mean)
            learner_metrics.ppo_ptx.set(stats.ptx_loss)
            learner_metrics.ppo_clip.set(stats.policy_clip_fraction)
            self.progress.step(
                "ppo_step", round=number, step=step + 1, reward=stats.reward_mean,
                kl=stats.kl_mean, ptx=stats.ptx_loss, policy_loss=stats.policy_loss,
                seconds=stats.seconds,
            )  # fmt: skip
        return models

    def evaluate(self, models: SharedBaseModels) -> EvalMetrics:
        """Candidate vs live on held-out prompts, scored by the same reward model."""
        ppo = self.config.ppo
        rng = random.Random(self.config.seed)
        _, held = split_prompts(feedback_log.read_prompts(self.work_dir))
        prompts = (held or demo_prompts(models.tokenizer, rng, self.config.eval_prompts))[
            : self.config.eval_prompts
        ]
        torch.manual_seed(self.config.seed)
        samples = sample_responses(models, prompts)
        with torch.no_grad():
            logp = models.policy_logprobs(samples.ids, samples.attention, samples.start)
            ref = models.reference_logprobs(samples.ids, samples.attention, samples.start)
        kl = float((kl_k1(logp, ref) * samples.mask).sum(dim=1).mean())
        candidate = float(models.rewards(samples.prompts, samples.responses).mean())
        live_texts = [self._live_response(p) for p in prompts]
        live = float(models.rewards(prompts, live_texts).mean())
        texts = self.pretraining_texts(models.tokenizer, random.Random(self.config.seed + 1))
        batch = next(ptx_batches(models.tokenizer, texts, ppo.ptx_batch, ppo.ptx_max_length,
                                 random.Random(self.config.seed + 2)))  # fmt: skip
        candidate_ptx, base_ptx = pretraining_losses(models, batch)
        metrics = EvalMetrics(candidate, live, kl, candidate_ptx, base_ptx)
        log.info(kv("evaluated", prompts=len(prompts), **metrics.as_dict()))
        return metrics

    def publish_policy(
        self,
        models: SharedBaseModels,
        metrics: EvalMetrics,
        passed: bool,
        reasons: Sequence[str],
        number: int,
    ) -> bool:
        """Save and upload the candidate; promote it only if it passed the gate."""
        directory = save_policy(
            models, self.work_dir / "adapters" / f"policy-r{number:04d}", self.config.model_dir
        )
        if not passed:
            log.warning(kv("gate_refused", round=number, reasons="; ".join(reasons)))
        values = {**metrics.as_dict(), "gate_passed": float(passed),
                  "ppo_steps": float(self.config.ppo_steps_per_round)}  # fmt: skip
        version = self._publish("policy", directory, values, passed)
        learner_metrics.versions.labels("policy", "promoted" if passed else "refused").inc()
        live = version is not None and version.state == "live"
        if live:
            self.state = self.state.replace(policy_dir=str(directory))
            save_state(self.work_dir, self.state)
        return live

    def finish_round(self, number: int) -> None:
        total = len(feedback_log.read_rankings(self.work_dir))
        self.state = self.state.replace(
            round=number, rankings_at_last_round=total, last_round_at=time.time()
        )
        save_state(self.work_dir, self.state)
        log.info(kv("round_done", round=number, rankings=total))
        learner_metrics.rounds.inc()

    # -- helpers -----------------------------------------------------------------------------

    def _publish(
        self, kind: str, directory: Path, metrics: dict[str, float], promote: bool
    ) -> t.AdapterVersion | None:
        pending = PendingPublish(kind, str(directory), archive_sha256(directory), metrics, promote)
        self.state, version = publish(
            self.client, self.work_dir, self.state, pending, self.base_model
        )
        return version

    def _live_response(self, prompt: str) -> str:
        ppo = self.config.ppo
        generation = self.client.generate(
            prompt, max_tokens=ppo.max_new_tokens, temperature=ppo.temperature
        )
        return generation.completions[0].text

    def _continue_from_live(self, models: SharedBaseModels) -> None:
        """Start PPO from the policy this learner last put live, if it is still the live one
        (an operator may have rolled back) and has the configured shape; else from the base."""
        if not self.state.policy_dir or not Path(self.state.policy_dir).is_dir():
            return
        versions = self.client.versions("policy")
        live_id = versions.live.get("policy", "")
        live = [v for v in versions.versions if v.id == live_id]
        if not live or live[0].sha256 != archive_sha256(self.state.policy_dir):
            return
        if not modeling.load_adapter_weights(models.peft, self.state.policy_dir, POLICY):
            log.info(kv("policy_fresh", reason="live policy adapter has another LoRA shape"))
            return
        log.info(kv("policy_continued", version=live_id))

    def pretraining_texts(
        self, tokenizer: PreTrainedTokenizerBase, rng: random.Random
    ) -> list[PtxText]:
        if self.config.pretraining is not None:
            return read_pretraining_texts(self.config.pretraining)
        return demo_pretraining_texts(rng, 256, tokenizer)


def demo_prompts(tokenizer: PreTrainedTokenizerBase, rng: random.Random, n: int) -> list[str]:
    """Demo-task instructions rendered as the server renders a chat: the fallback prompts."""
    from flywheel_learner.demo_model import chat_prompt
    from flywheel_learner.demo_task import sample_example

    return [chat_prompt(tokenizer, sample_example(rng).instruction) for _ in range(n)]


@torch.no_grad()
def pretraining_losses(models: SharedBaseModels, batch: PtxBatch) -> tuple[float, float]:
    """(candidate, base) per-token NLL of one pretraining batch."""
    candidate = float(models.pretraining_nll(batch))
    with models.peft.disable_adapter():
        logits = models.peft(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        base = float(ptx_loss(logits[:, :-1], batch.input_ids[:, 1:], batch.loss_mask[:, 1:]))
    return candidate, base


def run(config: LearnerConfig, progress: Progress | None = None) -> int:
    """Run the learner until `config.max_rounds` rounds are done (or forever)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    learner = Learner(config, progress=progress)
    try:
        return learner.run()
    finally:
        learner.close()
