"""A reward refit the users' rankings can overrule (issue 15).

The learner's reward model starts from a prior: the demo's initial reward model, one passed as
`--reward-init`, or the last refit. A labeler may prefer something else entirely, so every
refit fits twice on the same data, once warm-started from the prior and once from scratch,
and keeps whichever orders the held-out rankings better. Held-out rankings are chosen by a
hash of their id (a ranking is held out forever or never, whoever labelled it), and the most
recent of them are the ones measured, so a preference that drifts shows.

A reward model is *validated* when it orders enough held-out pairs (`min_pairs`) at least
`min_accuracy` of the time. Only a validated model trains a policy or judges one.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from flywheel_learner.reward import (
    HeldOutScore,
    RewardConfig,
    fit_reward_model,
    held_out_score,
    normalise_head_bias,
    normalise_head_scale,
)
from flywheel_model import adapters, loading, scoring
from flywheel_model.precision import FLOAT32_CPU, Precision
from flywheel_model.scoring import RankingText

SCALE_SAMPLE = 1024  # the newest ranked responses the reward scale is measured on


class IdentifiedRanking(NamedTuple):
    ranking_id: str
    prompt: str
    tiers: Sequence[Sequence[str]]

    @property
    def text(self) -> RankingText:
        return (self.prompt, self.tiers)


def is_held_out(ranking_id: str, share: float) -> bool:
    """A stable `share` of rankings, chosen by a hash of the id, never trained on."""
    bucket = int(hashlib.sha256(f"ranking:{ranking_id}".encode()).hexdigest()[:8], 16)
    return bucket / 0x1_0000_0000 < share


def split_rankings(
    rankings: Sequence[IdentifiedRanking], share: float, window: int
) -> tuple[list[RankingText], list[RankingText]]:
    """(train, held_out) of rankings ordered oldest first.

    held_out is the newest `window` of the held-out share; older held-out rankings are neither
    trained on nor measured, so no ranking ever moves from one side to the other.
    """
    train = [r.text for r in rankings if not is_held_out(r.ranking_id, share)]
    held = [r.text for r in rankings if is_held_out(r.ranking_id, share)]
    return train, held[-window:] if window else held


@dataclass(frozen=True)
class Validation:
    """What a reward model must show on the held-out rankings before anything uses it."""

    min_accuracy: float = 0.6
    min_pairs: int = 50

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_accuracy <= 1.0:
            raise ValueError(f"min_accuracy must be in [0, 1], got {self.min_accuracy}")
        if self.min_pairs < 1:
            raise ValueError(f"min_pairs must be >= 1, got {self.min_pairs}")

    def problem(self, score: HeldOutScore) -> str | None:
        """Why `score` does not validate a reward model, or None when it does."""
        if score.pairs < self.min_pairs:
            return (
                f"only {score.pairs} held-out ranked pairs, fewer than the {self.min_pairs} "
                "needed to trust an accuracy; collect more rankings"
            )
        if not score.accuracy >= self.min_accuracy:
            return (
                f"held-out accuracy {score.accuracy:.3f} on {score.pairs} pairs is below "
                f"the minimum {self.min_accuracy:.3f}"
            )
        return None


class Refit(NamedTuple):
    directory: Path  # the kept fit, saved with its head
    score: HeldOutScore  # of the kept fit
    start: str  # "warm" or "fresh"
    candidates: dict[str, HeldOutScore]  # every fit tried, by start
    train_loss: float
    steps: int
    seconds: float


def score_saved(
    base_dir: Path,
    reward_dir: Path,
    held: Sequence[RankingText],
    config: RewardConfig,
    precision: Precision = FLOAT32_CPU,
) -> HeldOutScore:
    """A saved reward model's score on `held` (its own LoRA shape, whatever `config` says)."""
    from peft import PeftModel

    base, tokenizer = loading.load_base(base_dir, device=precision.device, dtype=precision.dtype)
    model = PeftModel.from_pretrained(base, str(reward_dir), adapter_name="reward")
    model.eval()
    head = scoring.ScoreHead.load(Path(reward_dir), model.config.hidden_size)
    with precision.autocast():
        return held_out_score(model, head.to(precision.device), tokenizer, held, config)


def refit(
    base_dir: Path,
    train: Sequence[RankingText],
    held: Sequence[RankingText],
    config: RewardConfig,
    out_dir: Path,
    *,
    prior: Path | None,
    base_model: str,
    progress: bool = False,
    precision: Precision = FLOAT32_CPU,
) -> Refit:
    """Fit from `prior` (when given) and from scratch; save the better into `out_dir`.

    Better = higher held-out accuracy, then lower held-out loss (NaN ranks last). Without
    held-out pairs there is nothing to compare on and the warm start is kept. The base is
    loaded as `precision` says; the adapter and head train in float32 under its autocast.
    """
    fits: dict[str, tuple[Path, HeldOutScore, float, int, float]] = {}
    starts = [("warm", prior)] if prior is not None else []
    for start, init in [*starts, ("fresh", None)]:
        base, tokenizer = loading.load_base(
            base_dir, device=precision.device, dtype=precision.dtype
        )
        with precision.autocast():
            fit = fit_reward_model(
                base, tokenizer, train, config, init=init, held_out=held, progress=progress
            )
            # Unit scale over the ranked responses, then centred on the best-ranked ones: what
            # a good response earns scores 0 (InstructGPT's normalisation).
            every = [(prompt, text) for prompt, tiers in train for tier in tiers for text in tier]
            normalise_head_scale(fit.model, fit.head, tokenizer, every[-SCALE_SAMPLE:],
                                 max_length=config.max_length)  # fmt: skip
            best = [(prompt, tiers[0][0]) for prompt, tiers in train if tiers and tiers[0]]
            normalise_head_bias(fit.model, fit.head, tokenizer, best, max_length=config.max_length)
        directory = adapters.save_adapter(
            fit.model, fit.adapter_name, out_dir.with_name(f"{out_dir.name}-{start}"),
            head=fit.head, base_model=base_model,
        )  # fmt: skip
        assert fit.held_out is not None
        fits[start] = (directory, fit.held_out, fit.train_loss, fit.steps, fit.seconds)
        if not fit.warm_start and start == "warm":  # the prior's shape differs: same as fresh
            break
    kept = max(fits, key=lambda name: _rank(fits[name][1]))
    directory, score, train_loss, steps, _ = fits[kept]
    if out_dir.exists():
        shutil.rmtree(out_dir)
    directory.rename(out_dir)
    for name, (other, *_rest) in fits.items():
        if name != kept:
            shutil.rmtree(other, ignore_errors=True)
    seconds = sum(f[4] for f in fits.values())
    return Refit(out_dir, score, kept, {k: v[1] for k, v in fits.items()}, train_loss, steps,
                 seconds)  # fmt: skip


def _rank(score: HeldOutScore) -> tuple[float, float]:
    accuracy = score.accuracy if score.accuracy == score.accuracy else -1.0  # NaN last
    loss = score.loss if score.loss == score.loss else float("inf")
    return accuracy, -loss
