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
import json
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
from flywheel_learner.agreement import human_agreement
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
from flywheel_learner.reward import HeldOutScore, RankingText, RewardConfig
from flywheel_learner.reward_refit import (
    IdentifiedRanking,
    Validation,
    refit,
    score_saved,
    split_rankings,
)

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
    gate: what a candidate must achieve to go live.
    rm_min_accuracy, rm_min_held_out_pairs: what a reward model must show on the held-out
        rankings (`reward_refit.Validation`) to be promoted, to train a policy and to judge
        one. With no such model a round ends after the refit and publishes no policy.
    rm_held_out_window: the newest this many held-out rankings are the ones measured.
    pretraining: a .txt/.jsonl corpus for the ptx term; None = the demo task's answers.
    reward_init: a saved reward model the first refit warm-starts from (the demo's initial
        one under `flywheel up`); later refits start from the last promoted refit. Either is
        only a prior: every refit also fits from scratch and keeps the better
        (`reward_refit`), and the log reports reward_init's accuracy on the same rankings.
    import_preferences: JSONL preference files (`preference_data`) added to every refit.
    challenger: publish a candidate that passes the gate as the server's challenger, to be
        promoted or retired by live labelers' blind comparisons, instead of promoting it.
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
    # The budget grows with the data (8 passes, up to 400 steps) and stops early on the
    # held-out loss, after a fresh head is probed on the frozen features. The old cap of 100
    # steps warm-started from the demo's reward model never overruled it: after 2,000 rankings
    # of another preference its accuracy was 0.33 (issue 15). On 500 live `incorrect` rankings
    # the probe takes held-out accuracy from 0.62 to 0.92, warm or fresh.
    reward: RewardConfig = field(
        default_factory=lambda: RewardConfig(
            steps=400, max_epochs=8.0, eval_every=25, patience=3, held_out=0.2, probe_steps=200
        )
    )
    ppo: PPOConfig = field(default_factory=PPOConfig)
    ppo_steps_per_round: int = 20
    # 16 prompts, one sample each, refused two good rounds in a row on noise (reward gain -0.12
    # and -0.04); 128 cost about a second more.
    eval_prompts: int = 128
    gate: GateThresholds = field(default_factory=GateThresholds)
    rm_min_accuracy: float = 0.6
    rm_min_held_out_pairs: int = 50
    rm_held_out_window: int = 400
    pretraining: Path | None = None
    reward_init: Path | None = None
    import_preferences: tuple[Path, ...] = ()
    challenger: bool = False
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
        Validation(self.rm_min_accuracy, self.rm_min_held_out_pairs)  # raises when out of range
        if self.rm_held_out_window < 1:
            raise ValueError(f"rm_held_out_window must be >= 1, got {self.rm_held_out_window}")
        for path in (*self.import_preferences, *([self.pretraining] if self.pretraining else [])):
            if not Path(path).is_file():
                raise ValueError(f"{path} does not exist or is not a file")
        if self.reward_init is not None:
            modeling.read_adapter_config(self.reward_init)  # a clear error if it is no adapter

    @property
    def validation(self) -> Validation:
        return Validation(self.rm_min_accuracy, self.rm_min_held_out_pairs)


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
    score: HeldOutScore
    problem: str | None  # why it is not validated; None when it is

    @property
    def validated(self) -> bool:
        return self.problem is None


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
        self._sha256: dict[Path, str] = {}  # adapter dirs are never rewritten once saved

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

    def _read_imports(self) -> list[IdentifiedRanking]:
        """Imported rankings, each with an id from its content, so they too are held out by
        the same hash as logged ones: imported human judgments can validate a reward model."""
        rankings: list[IdentifiedRanking] = []
        for path in self.config.import_preferences:
            for prompt, tiers in read_preferences(path):
                digest = hashlib.sha256(json.dumps([prompt, tiers]).encode()).hexdigest()[:16]
                rankings.append(IdentifiedRanking(f"import-{digest}", prompt, tiers))
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
        return wake and len(self.split()[0]) >= 2

    def run_round(self) -> bool:
        """One round; True when the candidate policy passed the gate and went live."""
        number = self.state.round + 1
        log.info(kv("round_start", round=number))
        self.sync()
        train, held = self.split()
        reward_dir, why = self.reward_for_ppo(self.refit_reward(number, train, held), held)
        if reward_dir is None:
            log.warning(kv("round_skipped", round=number, reason=why))
            learner_metrics.rounds_skipped.inc()
            self.finish_round(number)
            return False
        models = self.train_policy(reward_dir, number)
        metrics = self.evaluate(models, held)
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

    def rankings(self) -> list[IdentifiedRanking]:
        """Every informative logged ranking, oldest first, then the imported ones."""
        logged = [IdentifiedRanking(r.ranking_id, r.prompt, r.tiers)
                  for r in feedback_log.read_rankings(self.work_dir) if r.informative]  # fmt: skip
        return [*logged, *self.imported]

    def split(self) -> tuple[list[RankingText], list[RankingText]]:
        """(train, held-out) rankings: see `reward_refit.split_rankings`."""
        return split_rankings(
            self.rankings(), self.config.reward.held_out, self.config.rm_held_out_window
        )

    def refit_reward(
        self, number: int, train: Sequence[RankingText], held: Sequence[RankingText]
    ) -> RewardRefit:
        """Fit warm and fresh, keep the better, publish it (promoted only if validated)."""
        if len(train) < 2:
            raise LearnerError(
                f"a reward model needs at least 2 rankings with an order, have {len(train)}; "
                "collect more (e.g. `flywheel simulate`) or pass --import-preferences FILE"
            )
        config = self.config.reward
        prior = Path(self.state.reward_dir) if self.state.reward_dir else self.config.reward_init
        fit = refit(
            self.config.model_dir, train, held, config,
            self.work_dir / "adapters" / f"reward-r{number:04d}", prior=prior,
            base_model=self.base_model, progress=self.progress.tty,
        )  # fmt: skip
        problem = self.config.validation.problem(fit.score)
        metrics = {"held_out_accuracy": fit.score.accuracy, "held_out_pairs": float(fit.score.pairs),
                   "train_loss": fit.train_loss, "rankings": float(len(train) + len(held)),
                   "validated": float(problem is None)}  # fmt: skip
        for start, score in fit.candidates.items():
            metrics[f"{start}_accuracy"] = score.accuracy
        if self.config.reward_init is not None and held:
            init = score_saved(self.config.model_dir, self.config.reward_init, held, config)
            metrics["init_accuracy"] = init.accuracy  # a drift from the prior shows here
        log.info(kv("reward_fit", round=number, kept=fit.start, steps=fit.steps,
                    seconds=fit.seconds, **metrics))  # fmt: skip
        if problem is not None:
            log.warning(kv("reward_not_validated", round=number, reason=problem))
        learner_metrics.reward_train_loss.set(fit.train_loss)
        learner_metrics.reward_accuracy.set(fit.score.accuracy)
        outcome = "promoted" if problem is None else "refused"
        learner_metrics.versions.labels("reward", outcome).inc()
        self._publish("reward", fit.directory, metrics, problem is None)
        if problem is None:
            self.state = self.state.replace(reward_dir=str(fit.directory))
            save_state(self.work_dir, self.state)
        return RewardRefit(fit.directory, fit.score, problem)

    def reward_for_ppo(
        self, refit: RewardRefit, held: Sequence[RankingText]
    ) -> tuple[Path | None, str]:
        """This round's refit if validated; else the last validated one if it still passes on
        the current held-out rankings; else (None, why not)."""
        if refit.validated:
            return refit.directory, ""
        why = f"this round's reward model is not validated: {refit.problem}"
        previous = self.state.reward_dir
        if not previous or Path(previous) == refit.directory or not Path(previous).is_dir():
            return None, why
        score = score_saved(self.config.model_dir, Path(previous), held, self.config.reward)
        problem = self.config.validation.problem(score)
        if problem is not None:
            return None, f"{why}; nor is the last validated one ({previous}): {problem}"
        return Path(previous), ""

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

    def evaluate(self, models: SharedBaseModels, held: Sequence[RankingText]) -> EvalMetrics:
        """Candidate vs live on held-out prompts, scored by the same reward model, and both
        against held-out human rankings (`agreement`)."""
        ppo = self.config.ppo
        rng = random.Random(self.config.seed)
        _, held_prompts = split_prompts(feedback_log.read_prompts(self.work_dir))
        prompts = (held_prompts or demo_prompts(models.tokenizer, rng, self.config.eval_prompts))[
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
        humans = human_agreement(models, held, self._live_adapter())
        metrics = EvalMetrics(candidate, live, kl, candidate_ptx, base_ptx, humans.candidate,
                              humans.live, humans.pairs)  # fmt: skip
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
        challenge = passed and self.config.challenger
        version = self._publish("policy", directory, values, passed and not challenge, challenge)
        outcome = "challenger" if challenge else "promoted" if passed else "refused"
        learner_metrics.versions.labels("policy", outcome).inc()
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
        self,
        kind: str,
        directory: Path,
        metrics: dict[str, float],
        promote: bool,
        challenger: bool = False,
    ) -> t.AdapterVersion | None:
        sha = archive_sha256(directory)
        pending = PendingPublish(kind, str(directory), sha, metrics, promote, challenger)
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

    def _live_adapter(self) -> Path | bool | None:
        """The live policy's adapter among those this learner wrote; None when the live policy
        is the bare base (policy-v0); False when this learner does not hold it."""
        versions = self.client.versions("policy")
        live_id = versions.live.get("policy", "")
        live = [v for v in versions.versions if v.id == live_id]
        if not live or not live[0].sha256:
            return None
        for directory in sorted((self.work_dir / "adapters").glob("policy-r*")):
            if directory not in self._sha256:
                self._sha256[directory] = archive_sha256(directory)
            if self._sha256[directory] == live[0].sha256:
                return directory
        log.warning(kv("live_policy_unknown", version=live_id,
                       effect="the gate compares the candidate with chance only"))  # fmt: skip
        return False

    def _continue_from_live(self, models: SharedBaseModels) -> None:
        """Start PPO from the live policy if this learner wrote it (an operator may have rolled
        back, or a challenger won) and it has the configured shape; else from the base."""
        live = self._live_adapter()
        if not isinstance(live, Path):
            return
        if not modeling.load_adapter_weights(models.peft, live, POLICY):
            log.info(kv("policy_fresh", reason="live policy adapter has another LoRA shape"))
            return
        log.info(kv("policy_continued", directory=str(live)))

    def pretraining_texts(
        self, tokenizer: PreTrainedTokenizerBase, rng: random.Random
    ) -> list[PtxText]:
        if self.config.pretraining is not None:
            return read_pretraining_texts(self.config.pretraining)
        return demo_pretraining_texts(rng, 256)


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
