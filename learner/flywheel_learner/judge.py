"""The judge: a second reward model, fitted on the held-out rankings alone (issue 15).

The gate must not trust only the reward model PPO optimised: a policy can learn what that
model gets wrong. The judge is fitted from scratch on the held-out rankings, which the PPO
reward model never trains on, and is validated on the newest training rankings, which the judge
never sees. The gate scores the candidate's and the live policy's answers to held-out prompts
with it, sampled and greedy, and refuses a candidate the judge does not prefer
(`gate.GateThresholds.min_judge_gain`).

An earlier gate asked each policy's implicit reward (log pi / pi_ref, as in DPO) to order the
held-out pairs. Under `longer`, the candidate that lengthened 100 of 100 greedy answers agreed
with the labelers less (0.62) than the live policy it started from (0.91), and was refused:
a policy's log-probabilities of old samples say little about its own answers. The judge reads
the answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flywheel_learner.reward import RewardConfig
from flywheel_learner.reward_refit import Refit, refit
from flywheel_model.precision import FLOAT32_CPU, Precision
from flywheel_model.scoring import RankingText


def fit_judge(
    base_dir: Path,
    held: Sequence[RankingText],
    train: Sequence[RankingText],
    config: RewardConfig,
    out_dir: Path,
    *,
    window: int,
    base_model: str,
    progress: bool = False,
    precision: Precision = FLOAT32_CPU,
) -> Refit:
    """A fresh reward model on `held`, measured on the newest `window` of `train`, saved in
    `out_dir` with its scores unit-scaled like the PPO reward model's."""
    return refit(
        base_dir, held, train[-window:], config, out_dir, prior=None, base_model=base_model,
        progress=progress, precision=precision,
    )  # fmt: skip
