"""The publish gate: a candidate policy goes live only if it beats the live one safely.

Pure: metrics and thresholds in, (passed, reasons) out. Every failed check says which number
missed which bound, so a refused version's log line explains itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class GateThresholds:
    """min_reward_gain: candidate minus live mean reward-model score on held-out prompts.
    max_kl: mean per-sequence KL(candidate || reference) in nats on those prompts.
    max_ptx_rise: allowed rise of the pretraining NLL (nats/token) over the base's.
    """

    min_reward_gain: float = 0.0
    max_kl: float = 10.0
    max_ptx_rise: float = 0.1

    def __post_init__(self) -> None:
        if not math.isfinite(self.min_reward_gain):
            raise ValueError(f"min_reward_gain must be finite, got {self.min_reward_gain}")
        if not self.max_kl >= 0:
            raise ValueError(f"max_kl must be >= 0 nats, got {self.max_kl}")
        if not self.max_ptx_rise >= 0:
            raise ValueError(f"max_ptx_rise must be >= 0 nats/token, got {self.max_ptx_rise}")


@dataclass(frozen=True)
class EvalMetrics:
    candidate_reward: float
    live_reward: float
    kl_to_reference: float
    candidate_ptx_loss: float
    base_ptx_loss: float

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
    return not reasons, reasons
