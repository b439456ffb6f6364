"""The publish gate: a candidate policy goes live only if it beats the live one safely.

Pure: metrics and thresholds in, (passed, reasons) out. Every failed check says which number
missed which bound, so a refused version's log line explains itself.

The reward gain is measured by the reward model PPO optimised, which the candidate may have
learned to exploit. So the gate also asks the judge (`judge`), fitted on held-out human
rankings that reward model never saw: it must score the candidate's answers no lower than the
live policy's. Neither model may tell what sampled rankings rarely show it, so the gate last asks
the labelers themselves (`anchor`): on ranked prompts where the candidate's greedy answer differs
from the live policy's and a ranking holds both, the candidate must not lose more than it wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from flywheel_learner.anchor import NO_VERDICTS, Verdicts


@dataclass(frozen=True)
class GateThresholds:
    """min_reward_gain: candidate minus live mean reward-model score on held-out prompts.
    max_kl: mean per-sequence KL(candidate || reference) in nats on those prompts. 20 nats over
        16-token answers: what `longer` needed on the demo to lengthen greedy answers (its
        candidates at 20-22 nats did so for 97-100% of prompts, at 6.5 for 35%), with the
        pretraining loss no higher than the base's. The pretraining-loss check and the judge
        guard what a looser bound lets through.
    max_ptx_rise: allowed rise of the pretraining NLL (nats/token) over the base's.
    min_judge_gain: candidate minus live mean score of the judge (`judge`: a reward model
        fitted on the held-out rankings only) over their sampled and greedy answers.
    min_human_verdicts: on ranked prompts where the two policies' greedy answers differ and a
        ranking holds both, once the labelers ranked one above the other on this many, the
        candidate's must be above on more of them than below. Level is not enough: under
        `correct`, a candidate level at 5-5 there lost 8-34 on fresh prompts.
    """

    min_reward_gain: float = 0.0
    min_greedy_reward_gain: float = 0.0
    max_kl: float = 20.0
    max_ptx_rise: float = 0.1
    min_judge_gain: float = 0.0
    min_human_verdicts: int = 3

    def as_metrics(self) -> dict[str, float]:
        """The thresholds, published with a policy version (`gate_<name>`), so the dashboard
        can say which checks a refused version failed."""
        return {f"gate_{f.name}": float(getattr(self, f.name)) for f in fields(self)}

    def __post_init__(self) -> None:
        for name in ("min_reward_gain", "min_greedy_reward_gain", "min_judge_gain"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")
        if not self.max_kl >= 0:
            raise ValueError(f"max_kl must be >= 0 nats, got {self.max_kl}")
        if not self.max_ptx_rise >= 0:
            raise ValueError(f"max_ptx_rise must be >= 0 nats/token, got {self.max_ptx_rise}")
        if self.min_human_verdicts < 1:
            raise ValueError(f"min_human_verdicts must be >= 1, got {self.min_human_verdicts}")


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
    # The judge's mean score of the candidate's answers minus the live policy's; NaN when no
    # validated judge scored them.
    judge_gain: float = float("nan")
    # The labelers' verdicts on the greedy answers the candidate changed (`anchor`).
    human: Verdicts = NO_VERDICTS

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
        return {
            "candidate_reward": self.candidate_reward,
            "live_reward": self.live_reward,
            "reward_gain": self.reward_gain,
            "candidate_greedy_reward": self.candidate_greedy_reward,
            "live_greedy_reward": self.live_greedy_reward,
            "greedy_reward_gain": self.greedy_reward_gain,
            "kl_to_reference": self.kl_to_reference,
            **ptx,
            "judge_gain": self.judge_gain,
            "human_greedy_wins": float(self.human.wins),
            "human_greedy_losses": float(self.human.losses),
            "human_greedy_ties": float(self.human.ties),
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
    human = metrics.human
    if human.decisive >= thresholds.min_human_verdicts and not human.wins > human.losses:
        reasons.append(
            f"the labelers' rankings do not prefer its greedy answers: on the held-out ranked "
            f"prompts where the two policies answer differently and a ranking holds both, the "
            f"candidate's ranked above the live policy's {human.wins} times, below "
            f"{human.losses} (level {human.ties})"
        )
    return not reasons, reasons


def _judge_reasons(metrics: EvalMetrics, thresholds: GateThresholds) -> list[str]:
    """A candidate no validated judge scored is refused: unknown is not safe."""
    gain = metrics.judge_gain
    if gain != gain:
        return ["no validated judge (a reward model fitted on the held-out rankings) scored it"]
    if not gain >= thresholds.min_judge_gain:
        return [
            f"the judge, fitted on held-out rankings the reward model never saw, scores its "
            f"answers {gain:.4g} against the live policy's, below the minimum "
            f"{thresholds.min_judge_gain:.4g}"
        ]
    return []
