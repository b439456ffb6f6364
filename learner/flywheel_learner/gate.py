"""The publish gate: a candidate policy goes live only if it beats the live one safely.

Pure: metrics and thresholds in, (passed, reasons) out. Every failed check says which number
missed which bound, so a refused version's log line explains itself.

The reward gain is measured by the reward model PPO optimised, which the candidate may have
learned to exploit. So the gate also asks held-out human rankings (`agreement`): the candidate
must order them the labelers' way more often than chance, and no less often than the live
policy does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class GateThresholds:
    """min_reward_gain: candidate minus live mean reward-model score on held-out prompts.
    max_kl: mean per-sequence KL(candidate || reference) in nats on those prompts.
    max_ptx_rise: allowed rise of the pretraining NLL (nats/token) over the base's.
    min_human_agreement: the candidate's agreement with held-out human pairs must exceed this
        (0.5: chance, which is where the reference policy sits).
    max_agreement_drop: how far the candidate's agreement may fall below the live policy's
        on the same pairs (0: never below).
    """

    min_reward_gain: float = 0.0
    max_kl: float = 10.0
    max_ptx_rise: float = 0.1
    min_human_agreement: float = 0.5
    max_agreement_drop: float = 0.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.min_reward_gain):
            raise ValueError(f"min_reward_gain must be finite, got {self.min_reward_gain}")
        if not self.max_kl >= 0:
            raise ValueError(f"max_kl must be >= 0 nats, got {self.max_kl}")
        if not self.max_ptx_rise >= 0:
            raise ValueError(f"max_ptx_rise must be >= 0 nats/token, got {self.max_ptx_rise}")
        if not 0.0 <= self.min_human_agreement < 1.0:
            raise ValueError(
                f"min_human_agreement must be in [0, 1), got {self.min_human_agreement}"
            )
        if not 0.0 <= self.max_agreement_drop <= 1.0:
            raise ValueError(f"max_agreement_drop must be in [0, 1], got {self.max_agreement_drop}")


@dataclass(frozen=True)
class EvalMetrics:
    candidate_reward: float
    live_reward: float
    kl_to_reference: float
    candidate_ptx_loss: float
    base_ptx_loss: float
    # Agreement with held-out human pairs (agreement.human_agreement); NaN when none.
    human_agreement: float = float("nan")
    live_human_agreement: float = float("nan")
    human_pairs: int = 0

    @property
    def reward_gain(self) -> float:
        return self.candidate_reward - self.live_reward

    @property
    def ptx_rise(self) -> float:
        return self.candidate_ptx_loss - self.base_ptx_loss

    def as_dict(self) -> dict[str, float]:
        return {
            "candidate_reward": self.candidate_reward,
            "live_reward": self.live_reward,
            "reward_gain": self.reward_gain,
            "kl_to_reference": self.kl_to_reference,
            "ptx_loss": self.candidate_ptx_loss,
            "base_ptx_loss": self.base_ptx_loss,
            "ptx_rise": self.ptx_rise,
            "human_agreement": self.human_agreement,
            "live_human_agreement": self.live_human_agreement,
            "human_pairs": float(self.human_pairs),
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
    if not kl <= thresholds.max_kl:
        reasons.append(
            f"KL to the reference {kl:.4g} nats exceeds the maximum {thresholds.max_kl:.4g}"
        )
    if not rise <= thresholds.max_ptx_rise:
        reasons.append(
            f"pretraining loss rose by {rise:.4g} nats/token, more than the allowed "
            f"{thresholds.max_ptx_rise:.4g}"
        )
    reasons += _human_reasons(metrics, thresholds)
    return not reasons, reasons


def _human_reasons(metrics: EvalMetrics, thresholds: GateThresholds) -> list[str]:
    """A candidate with no held-out human pairs to check is refused: unknown is not safe."""
    ours, live = metrics.human_agreement, metrics.live_human_agreement
    if not metrics.human_pairs:
        return ["no held-out human rankings to check the candidate against"]
    reasons = []
    if not ours > thresholds.min_human_agreement:
        reasons.append(
            f"agreement with {metrics.human_pairs} held-out human pairs {ours:.3f} is not above "
            f"{thresholds.min_human_agreement:.3f}"
        )
    if live == live and not ours >= live - thresholds.max_agreement_drop:
        reasons.append(
            f"agreement with held-out human pairs {ours:.3f} is below the live policy's {live:.3f}"
        )
    return reasons
