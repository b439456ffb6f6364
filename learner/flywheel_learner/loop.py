"""The continuous learner: export feedback, refit the reward model, PPO-ptx, gate, publish.

    flywheel learn --server 127.0.0.1:50051 --model DIR

One round reads top to bottom in `Learner.run_round`:
sync -> refit_reward -> train_policy -> evaluate -> gate -> publish. The learner talks to the
server only through the gRPC contract (docs/architecture.md): it exports rankings and prompts past
its checkpointed cursors, and uploads adapters. Everything it needs to resume lives in
`work_dir` (see `checkpoint`, `feedback_log`, `publishing`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from flywheel_client import FlywheelClient, tls_credentials
from flywheel_learner import feedback_log
from flywheel_learner import metrics as learner_metrics
from flywheel_learner.anchor import NO_VERDICTS, RankedPrompts, Verdicts, newest_prompts
from flywheel_learner.checkpoint import PendingPublish, load_state, save_state
from flywheel_learner.config import LearnerConfig
from flywheel_learner.gate import EvalMetrics, gate
from flywheel_learner.judge import fit_judge
from flywheel_learner.ppo import ppo_step, sample_responses
from flywheel_learner.ppo_math import kl_k1
from flywheel_learner.ppo_models import POLICY, SharedBaseModels, make_optimizer, save_policy
from flywheel_learner.preference_data import read_preferences
from flywheel_learner.progress import Progress, kv
from flywheel_learner.ptx_data import ptx_batches, read_pretraining_texts
from flywheel_learner.publishing import archive_sha256, publish, recover
from flywheel_learner.reward import HeldOutScore
from flywheel_learner.reward_refit import (
    IdentifiedRanking,
    refit,
    score_saved,
    split_rankings,
)
from flywheel_model import adapters, loading, memory
from flywheel_model.scoring import RankingText

if TYPE_CHECKING:
    from flywheel_client import types as t
    from flywheel_learner.ptx_data import PtxBatch

log = logging.getLogger("flywheel.learner")

EVAL_SHARE = 0.2  # share of logged prompts (by a hash of their id) never trained on


class LearnerError(Exception):
    """A problem the operator must fix (wrong model, unreadable data); the message says how."""


JUDGE = "judge"  # the judge's adapter name beside the PPO models

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
        self.precision = config.precision  # resolved once: device and dtype for every round
        self.work_dir = Path(config.work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._owns_client = client is None
        self.client = client or FlywheelClient(
            config.server,
            api_key=config.api_key,
            timeout=config.timeout_s,
            credentials=(
                tls_credentials(config.tls_ca, config.tls_cert, config.tls_key)
                if config.tls
                else None
            ),
        )
        self.progress = progress or Progress()
        self.state = load_state(self.work_dir)
        self.base_model = self._check_base()
        self.imported = self._read_imports()
        self.pretraining = read_pretraining_texts(config.pretraining) if config.pretraining else []
        if not self.pretraining:
            log.warning(kv("no_pretraining_corpus", effect="PPO runs without the ptx term and "
                           "the gate does not check the pretraining loss; pass --pretraining"))  # fmt: skip
        self._started = time.time()
        self._sha256: dict[Path, str] = {}  # adapter dirs are never rewritten once saved

    def close(self) -> None:
        if self._owns_client:
            self.client.close()

    def _check_base(self) -> str:
        fingerprint = loading.base_fingerprint(self.config.model_dir)
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
        judge_dir = None
        if reward_dir is not None:
            why = self.anchor_shortfall(held)
            if not why:
                judge_dir, why = self.fit_judge(number, train, held)
        if reward_dir is None or judge_dir is None:
            log.warning(kv("round_skipped", round=number, reason=why))
            learner_metrics.rounds_skipped.inc()
            self.finish_round(number)
            return False
        models = self.train_policy(reward_dir, number)
        metrics = self.evaluate(models, judge_dir, held)
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
            precision=self.precision,
        )  # fmt: skip
        problem = self.config.validation.problem(fit.score)
        metrics = {"held_out_accuracy": fit.score.accuracy, "held_out_pairs": float(fit.score.pairs),
                   "train_loss": fit.train_loss, "rankings": float(len(train) + len(held)),
                   "validated": float(problem is None)}  # fmt: skip
        for start, score in fit.candidates.items():
            metrics[f"{start}_accuracy"] = score.accuracy
        if self.config.reward_init is not None and held:
            init = score_saved(self.config.model_dir, self.config.reward_init, held, config,
                               self.precision)  # fmt: skip
            metrics["init_accuracy"] = init.accuracy  # a drift from the prior shows here
        log.info(kv("reward_fit", round=number, kept=fit.start, steps=fit.steps,
                    seconds=fit.seconds, **metrics))  # fmt: skip
        if problem is not None:
            log.warning(kv("reward_not_validated", round=number, reason=problem))
        learner_metrics.reward_train_loss.set(fit.train_loss)
        learner_metrics.reward_accuracy.set(fit.score.accuracy)
        learner_metrics.peak_memory.set(memory.peak_bytes(self.precision.device))
        outcome = "promoted" if problem is None else "refused"
        learner_metrics.versions.labels("reward", outcome).inc()
        # No held-out pair gives no accuracy (NaN): the version is shown without the figure.
        shown = {k: v for k, v in metrics.items() if math.isfinite(v)}
        self._publish("reward", fit.directory, shown, problem is None)
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
        score = score_saved(self.config.model_dir, Path(previous), held, self.config.reward,
                            self.precision)  # fmt: skip
        problem = self.config.validation.problem(score)
        if problem is not None:
            return None, f"{why}; nor is the last validated one ({previous}): {problem}"
        return Path(previous), ""

    def anchor_shortfall(self, held: Sequence[RankingText]) -> str:
        """Why the held-out rankings are too few for the gate's human anchor; "" when enough."""
        need = self.config.anchor_prompts
        have = len(newest_prompts(held, need))
        if have >= need:
            return ""
        return (f"the held-out rankings hold {have} distinct prompts; the gate's human anchor "
                f"needs {need} before a policy is trained (--anchor-prompts)")  # fmt: skip

    def fit_judge(
        self, number: int, train: Sequence[RankingText], held: Sequence[RankingText]
    ) -> tuple[Path | None, str]:
        """A fresh reward model on the held-out rankings, validated on the newest training
        ones (`judge`): (its directory, "") or (None, why it cannot judge)."""
        fit = fit_judge(
            self.config.model_dir, held, train, self.config.reward,
            self.work_dir / "adapters" / f"judge-r{number:04d}",
            window=self.config.rm_held_out_window, base_model=self.base_model,
            progress=self.progress.tty, precision=self.precision,
        )  # fmt: skip
        problem = self.config.validation.problem(fit.score)
        log.info(kv("judge_fit", round=number, rankings=len(held), accuracy=fit.score.accuracy,
                    pairs=fit.score.pairs, validated=problem is None, seconds=fit.seconds))  # fmt: skip
        if problem is not None:
            return None, f"no judge to check a policy with: {problem}"
        return fit.directory, ""

    def train_policy(self, reward_dir: Path, number: int) -> SharedBaseModels:
        """`ppo_steps_per_round` PPO-ptx steps on prompts drawn from the logged prompts."""
        ppo = self.config.ppo
        torch.manual_seed(self.config.seed + number)
        models = SharedBaseModels.build(self.config.model_dir, reward_dir, ppo,
                                        self.precision)  # fmt: skip
        self._continue_from_live(models)
        optimizer = make_optimizer(models, ppo)
        kl_ctl = ppo.kl_controller(self.state.kl_beta or None)
        rng = random.Random(self.config.seed + number)
        train, held = self.prompts()
        prompts = train or held
        ptx = (
            ptx_batches(models.tokenizer, self.pretraining, ppo.ptx_batch, ppo.ptx_max_length, rng)
            if ppo.gamma_ptx > 0 and self.pretraining else None
        )  # fmt: skip
        for step in self.progress.steps(self.config.ppo_steps_per_round, f"ppo r{number}"):
            batch = rng.choices(prompts, k=ppo.prompts_per_step)
            stats = ppo_step(models, optimizer, batch, next(ptx) if ptx else None, ppo, kl_ctl)
            learner_metrics.ppo_steps.inc()
            learner_metrics.ppo_reward.set(stats.reward_mean)
            learner_metrics.ppo_kl.set(stats.kl_mean)
            learner_metrics.ppo_ptx.set(stats.ptx_loss)
            learner_metrics.ppo_clip.set(stats.policy_clip_fraction)
            learner_metrics.peak_memory.set(memory.peak_bytes(self.precision.device))
            self.progress.step(
                "ppo_step", round=number, step=step + 1, reward=stats.reward_mean,
                kl=stats.kl_mean, ptx=stats.ptx_loss, policy_loss=stats.policy_loss,
                seconds=stats.seconds, beta=stats.beta,
            )  # fmt: skip
            if stats.kl_mean > self.config.stop_kl:
                log.info(kv("ppo_stopped", round=number, step=step + 1, kl=stats.kl_mean,
                            kl_stop=self.config.stop_kl))  # fmt: skip
                break
        self.state = self.state.replace(kl_beta=kl_ctl.beta)
        save_state(self.work_dir, self.state)
        return models

    def evaluate(
        self, models: SharedBaseModels, judge_dir: Path, held: Sequence[RankingText]
    ) -> EvalMetrics:
        """Candidate vs live on held-out prompts, sampled and greedy: scored by the reward
        model PPO optimised, and by the judge fitted on the held-out rankings (`judge`)."""
        ppo = self.config.ppo
        train, held_prompts = self.prompts()
        prompts = (held_prompts or train)[: self.config.eval_prompts]
        torch.manual_seed(self.config.seed)
        samples = sample_responses(models, prompts)
        with torch.no_grad():
            logp = models.policy_logprobs(samples.ids, samples.attention, samples.start)
            ref = models.reference_logprobs(samples.ids, samples.attention, samples.start)
        kl = float((kl_k1(logp, ref) * samples.mask).sum(dim=1).mean())
        live_texts = [self._live_response(p) for p in prompts]
        greedy = sample_responses(models, prompts, greedy=True).responses
        live_greedy = [self._live_response(p, temperature=0.0) for p in prompts]
        answers = {"candidate": samples.responses, "live": live_texts,
                   "candidate_greedy": greedy, "live_greedy": live_greedy}  # fmt: skip
        reward = {k: float(models.rewards(prompts, v).mean()) for k, v in answers.items()}
        models.add_scorer(JUDGE, judge_dir)
        judged = {k: float(models.rewards(prompts, v, JUDGE).mean()) for k, v in answers.items()}
        judge_gain = (judged["candidate"] - judged["live"]
                      + judged["candidate_greedy"] - judged["live_greedy"]) / 2  # fmt: skip
        human = self.human_verdicts(models, held)
        candidate_ptx = base_ptx = None
        if self.pretraining:
            batch = next(ptx_batches(models.tokenizer, self.pretraining, ppo.ptx_batch,
                                     ppo.ptx_max_length, random.Random(self.config.seed + 2)))  # fmt: skip
            candidate_ptx, base_ptx = pretraining_losses(models, batch)
        metrics = EvalMetrics(reward["candidate"], reward["live"], reward["candidate_greedy"],
                              reward["live_greedy"], kl, candidate_ptx, base_ptx, judge_gain,
                              human)  # fmt: skip
        log.info(kv("evaluated", prompts=len(prompts), **metrics.as_dict()))
        return metrics

    def human_verdicts(self, models: SharedBaseModels, held: Sequence[RankingText]) -> Verdicts:
        """The labelers' verdicts (`anchor`) on the greedy answers of the candidate and the live
        policy to the newest of the round's held-out rankings, where they differ and a ranking holds both.
        Held out: on the rankings the reward model trained on, PPO can copy what it memorised."""
        prompts = newest_prompts(held, self.config.eval_prompts)
        if not prompts:
            return NO_VERDICTS
        candidate = sample_responses(models, prompts, greedy=True).responses
        live = [self._live_response(p, temperature=0.0) for p in prompts]
        return RankedPrompts(held).compare(prompts, candidate, live)

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
        values = {**metrics.as_dict(), **self.config.gate.as_metrics(),
                  "gate_passed": float(passed),
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

    def _live_response(self, prompt: str, temperature: float | None = None) -> str:
        ppo = self.config.ppo
        generation = self.client.generate(
            prompt,
            max_tokens=ppo.max_new_tokens,
            temperature=ppo.temperature if temperature is None else temperature,
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
        if not adapters.load_adapter_weights(models.peft, live, POLICY):
            log.info(kv("policy_fresh", reason="live policy adapter has another LoRA shape"))
            return
        log.info(kv("policy_continued", directory=str(live)))

    def prompts(self) -> tuple[list[str], list[str]]:
        """(train, eval) prompts: those the server logged, or, where it logged none (only
        imported rankings so far), the rankings' own."""
        logged = feedback_log.read_prompts(self.work_dir)
        return split_prompts(logged or [(r.ranking_id, r.prompt) for r in self.rankings()])


@torch.no_grad()
def pretraining_losses(models: SharedBaseModels, batch: PtxBatch) -> tuple[float, float]:
    """(candidate, base) per-token NLL of one pretraining batch."""
    candidate = float(models.pretraining_nll(batch))
    with models.peft.disable_adapter():  # the base: every adapter and the policy's norm off
        base = float(models.pretraining_nll(batch))
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
