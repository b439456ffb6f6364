"""The publish gate: a candidate policy goes live only if it beats the live one safely.

Pure: metrics and thresholds in, (passed, reasons) out. Every failed check says which number
missed which bound, so a refused version's log line explains itself.

The reward gain is measured by the reward model PPO optimised, which the candidate may have
learned to exploit. So the gate also asks the judge (`judge`), fitted on held-out human
rankings that reward model never saw, to compare the two policies' answers prompt by prompt, as
a labeler compares a blind pair (`Pairs`). Sampled, the candidate must win at least half of
them (ties half). Greedy, where the two answers differ only where the candidate moved the
policy's most likely answer, the judge must prefer the moved answers more often than a coin
would, by a one-sided sign test (`GateThresholds.max_greedy_p`); a candidate that moved none
passes.

Why pairs, and why a test: under `correct` (issue 15), candidates changed 43-47% of the greedy
answers on 200 fresh prompts, mostly to wrong near misses (6-31, 14-36 and 6-40 against the
initial policy). Their judges preferred the initial answers in 53 of 87 and 58 of 86 changed
pairs, yet the mean judge score over sampled and greedy answers rose (+0.02) for the second. The
third one's judge, fitted on 21 rankings, preferred its answers 53-42 over 200 prompts and split
41 held-out prompts evenly: a point estimate of one half let it through; the test does not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from math import comb


@dataclass(frozen=True)
class GateThresholds:
    """min_reward_gain: candidate minus live mean reward-model score on held-out prompts.
    max_kl: mean per-sequence KL(candidate || reference) in nats on those prompts. 20 nats over
        16-token answers: what `longer` needed on the demo to lengthen greedy answers (its
        candidates at 20-22 nats did so for 97-100% of prompts, at 6.5 for 35%), with the
        pretraining loss no higher than the base's. The pretraining-loss check and the judge
        guard what a looser bound lets through.
    max_ptx_rise: allowed rise of the pretraining NLL (nats/token) over the base's.
    min_judge_win_rate: the share of held-out prompts whose sampled candidate answer the judge
        (`judge`: a reward model fitted on the held-out rankings only) prefers to the live
        policy's, ties half (`Pairs.win_rate`).
    max_greedy_p: the greedy answers the candidate changed must be preferred by the judge with
        a one-sided sign-test p-value (`Pairs.sign_p`) at most this. 0.25, not 0.05: the judge,
        fitted on a tenth of the rankings, is weaker than the reward model on answers unlike
        those it was fitted on. Under `longer` a candidate at 15 nats that lengthened most
        greedy answers drew 69-51 from it (p 0.06), another that lengthened 104 of 200 fresh
        prompts' answers agreed with the truth on 58 of 104; `correct`'s regressing candidates
        drew p 0.56-0.97.
    """

    min_reward_gain: float = 0.0
    min_greedy_reward_gain: float = 0.0
    max_kl: float = 20.0
    max_ptx_rise: float = 0.1
    min_judge_win_rate: float = 0.5
    max_greedy_p: float = 0.25

    def __post_init__(self) -> None:
        for name in ("min_reward_gain", "min_greedy_reward_gain"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")
        if not self.max_kl >= 0:
            raise ValueError(f"max_kl must be >= 0 nats, got {self.max_kl}")
        if not self.max_ptx_rise >= 0:
            raise ValueError(f"max_ptx_rise must be >= 0 nats/token, got {self.max_ptx_rise}")
        for name in ("min_judge_win_rate", "max_greedy_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class Pairs:
    """A scorer's verdicts on blind pairs, the candidate's answer against the live policy's."""

    wins: int
    losses: int
    ties: int

    @classmethod
    def judged(
        cls, candidate: Sequence[float], live: Sequence[float], same: Sequence[bool]
    ) -> Pairs:
        """`candidate[i]`, `live[i]`: the scores of the two answers to prompt i; `same[i]`: the
        answers are the same text, a tie whatever the scores (batching moves the last bits)."""
        if not len(candidate) == len(live) == len(same):
            raise ValueError(
                f"{len(candidate)} candidate, {len(live)} live, {len(same)} same flags"
            )
        moved = [(c, lv) for c, lv, tie in zip(candidate, live, same, strict=True) if not tie]
        wins, losses = sum(c > lv for c, lv in moved), sum(c < lv for c, lv in moved)
        return cls(wins, losses, len(candidate) - wins - losses)

    @property
    def win_rate(self) -> float:
        """Wins plus half the ties, over all pairs; NaN for none."""
        n = self.wins + self.losses + self.ties
        return (self.wins + self.ties / 2) / n if n else float("nan")

    @property
    def sign_p(self) -> float:
        """P(at least this many wins | each decided pair a fair coin): the one-sided sign test."""
        n = self.wins + self.losses
        return sum(comb(n, k) for k in range(self.wins, n + 1)) / 2**n


@dataclass(frozen=True)
class EvalMetrics:
    candidate_reward: float
    live_reward: float
    candidate_greedy_reward: float
    live_greedy_reward: float
    kl_to_reference: float
    # None when the learner has no pretraining corpus: then nothing to check.
    candidate_ptx_loss: float | None
    base_ptx_loss: float | None
    # The judge's verdicts on the candidate's answers against the live policy's, sampled and
    # greedy; None when no validated judge scored them.
    judge_sampled: Pairs | None = None
    judge_greedy: Pairs | None = None

    @property
    def reward_gain(self) -> float:
        return self.candidate_reward - self.live_reward

    @property
    def greedy_reward_gain(self) -> float:
        return self.candidate_greedy_reward - self.live_greedy_reward

    @property
    def ptx_rise(self) -> float | None:
        if self.candidate_ptx_loss is None or self.base_ptx_loss is None:
            return None
        return self.candidate_ptx_loss - self.base_ptx_loss

    def as_dict(self) -> dict[str, float]:
        """Every measured value (the pretraining ones only when measured)."""
        ptx: dict[str, float] = {}
        candidate, base = self.candidate_ptx_loss, self.base_ptx_loss
        if candidate is not None and base is not None:
            ptx = {"ptx_loss": candidate, "base_ptx_loss": base, "ptx_rise": candidate - base}
        judged: dict[str, float] = {}
        if self.judge_sampled is not None and self.judge_greedy is not None:
            greedy = self.judge_greedy
            judged = {"judge_win_rate": self.judge_sampled.win_rate,
                      "judge_greedy_win_rate": greedy.win_rate, "judge_greedy_wins": greedy.wins,
                      "judge_greedy_losses": greedy.losses, "judge_greedy_p": greedy.sign_p}  # fmt: skip
        return {
            "candidate_reward": self.candidate_reward,
            "live_reward": self.live_reward,
            "reward_gain": self.reward_gain,
            "candidate_greedy_reward": self.candidate_greedy_reward,
            "live_greedy_reward": self.live_greedy_reward,
            "greedy_reward_gain": self.greedy_reward_gain,
            "kl_to_reference": self.kl_to_reference,
            **ptx,
            **judged,
        }


def gate(metrics: EvalMetrics, thresholds: GateThresholds) -> tuple[bool, list[str]]:
    """(passed, reasons it failed). A NaN metric fails its check: unknown is not safe."""
    reasons = []
    gain, kl, rise = metrics.reward_gain, metrics.kl_to_reference, metrics.ptx_rise
    if not gain >= thresholds.min_reward_gain:
        reasons.append(
            f"reward gain {gain:.4g} over the live policy is below the minimum "
            f"{thresholds.min_reward_gain:.4g}"
        )
    greedy = metrics.greedy_reward_gain
    if not greedy >= thresholds.min_greedy_reward_gain:
        reasons.append(
            f"reward gain of the greedy answers {greedy:.4g} over the live policy's is below "
            f"the minimum {thresholds.min_greedy_reward_gain:.4g}"
        )
    if not kl <= thresholds.max_kl:
        reasons.append(
            f"KL to the reference {kl:.4g} nats exceeds the maximum {thresholds.max_kl:.4g}"
        )
    if rise is not None and not rise <= thresholds.max_ptx_rise:
        reasons.append(
            f"pretraining loss rose by {rise:.4g} nats/token, more than the allowed "
            f"{thresholds.max_ptx_rise:.4g}"
        )
    reasons += _judge_reasons(metrics, thresholds)
    return not reasons, reasons


def _judge_reasons(metrics: EvalMetrics, thresholds: GateThresholds) -> list[str]:
    """A candidate no validated judge scored is refused: unknown is not safe."""
    sampled, greedy = metrics.judge_sampled, metrics.judge_greedy
    if sampled is None or greedy is None:
        return ["no validated judge (a reward model fitted on the held-out rankings) scored it"]
    reasons = []
    if not sampled.win_rate >= thresholds.min_judge_win_rate:
        reasons.append(
            f"the judge, fitted on held-out rankings the reward model never saw, prefers its "
            f"sampled answers to the live policy's on {sampled.win_rate:.1%} of the prompts "
            f"(ties half), below the minimum {thresholds.min_judge_win_rate:.1%}"
        )
    if greedy.wins + greedy.losses and not greedy.sign_p <= thresholds.max_greedy_p:
        reasons.append(
            f"the judge prefers {greedy.wins} of the {greedy.wins + greedy.losses} greedy answers "
            f"it changed to the live policy's: sign-test p {greedy.sign_p:.3g} is above "
            f"{thresholds.max_greedy_p:.3g}, not clearly better"
        )
    return reasons
