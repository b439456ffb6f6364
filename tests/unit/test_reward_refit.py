"""Issue 15: a reward refit the rankings can overrule, validation, and the judge the gate asks."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from flywheel_demo.model import build_tiny_model
from flywheel_learner.gate import EvalMetrics, GateThresholds, gate
from flywheel_learner.judge import fit_judge
from flywheel_learner.reward import (
    HeldOutScore,
    RewardConfig,
    held_out_score,
    normalise_head_scale,
    probe_head,
    score_texts,
)
from flywheel_learner.reward_refit import (
    IdentifiedRanking,
    Validation,
    is_held_out,
    refit,
    split_rankings,
)
from flywheel_model import loading, scoring

pytestmark = pytest.mark.unit


def test_held_out_rankings_are_stable_and_the_newest_are_measured() -> None:
    rankings = [IdentifiedRanking(f"r{i}", f"p{i}", [[f"a{i}"], [f"b{i}"]]) for i in range(2000)]
    held_ids = [r.ranking_id for r in rankings if is_held_out(r.ranking_id, 0.2)]
    assert 0.17 < len(held_ids) / 2000 < 0.23
    train, held = split_rankings(rankings, 0.2, window=50)
    assert len(train) + len(held_ids) == 2000
    newest = [r.text for r in rankings if r.ranking_id in set(held_ids[-50:])]
    assert held == newest
    # the same id falls on the same side whatever else arrived
    assert split_rankings(rankings[:1000], 0.2, window=10_000)[1] == [
        r.text for r in rankings[:1000] if r.ranking_id in set(held_ids)
    ]


def test_validation_needs_enough_pairs_and_accuracy() -> None:
    rule = Validation(min_accuracy=0.7, min_pairs=40)
    assert rule.problem(HeldOutScore(0.9, 0.3, 40)) is None
    assert "only 39 held-out" in (rule.problem(HeldOutScore(0.9, 0.3, 39)) or "")
    assert "below the minimum 0.700" in (rule.problem(HeldOutScore(0.69, 0.6, 400)) or "")
    assert rule.problem(HeldOutScore(math.nan, math.nan, 400)) is not None
    with pytest.raises(ValueError, match="min_accuracy must be in"):
        Validation(min_accuracy=1.5)


def metrics(gain: float, judge: float) -> EvalMetrics:
    return EvalMetrics(1.0 + gain, 1.0, 1.0 + gain, 1.0, 1.0, 2.0, 2.0, judge)


def test_gate_refuses_what_the_reward_model_favours_but_the_judge_does_not() -> None:
    thresholds = GateThresholds(min_reward_gain=0.1)
    assert gate(metrics(gain=2.0, judge=0.3), thresholds) == (True, [])
    assert gate(metrics(gain=2.0, judge=0.0), thresholds) == (True, [])  # bounds are inclusive
    passed, reasons = gate(metrics(gain=2.0, judge=-0.2), thresholds)
    assert not passed and reasons == [
        "the judge, fitted on held-out rankings the reward model never saw, scores its answers "
        "-0.2 against the live policy's, below the minimum 0"
    ]
    passed, reasons = gate(metrics(gain=2.0, judge=math.nan), thresholds)
    assert not passed and reasons == [
        "no validated judge (a reward model fitted on the held-out rankings) scored it"
    ]
    assert gate(metrics(gain=2.0, judge=-0.2), GateThresholds(min_judge_gain=-0.5))[0]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


def _rankings(n: int, prefer_long: bool, seed: int) -> list[IdentifiedRanking]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        word = "".join(rng.choices("abcdefgh", k=3))
        long, short = word * 3, word[:1]
        tiers = [[long], [short]] if prefer_long else [[short], [long]]
        out.append(
            IdentifiedRanking(f"{seed}-{i}", f"<|user|>\nsay: {word}\n<|assistant|>\n", tiers)
        )
    return out


def test_a_refit_overrules_a_prior_that_prefers_the_opposite(
    base_dir: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    config = RewardConfig(steps=120, r=4, alpha=8, batch_rankings=16, warmup=0, max_length=48,
                          lr=3e-3, eval_every=20, patience=3)  # fmt: skip
    fingerprint = loading.base_fingerprint(base_dir)
    old_train, old_held = split_rankings(_rankings(300, prefer_long=False, seed=1), 0.2, 400)
    prior = refit(base_dir, old_train, old_held, config, tmp_path / "prior", prior=None,
                  base_model=fingerprint)  # fmt: skip
    assert prior.score.accuracy > 0.9 and prior.start == "fresh"

    train, held = split_rankings(_rankings(300, prefer_long=True, seed=2), 0.2, 400)
    model, tok = loading.load_base(base_dir)
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(model, str(prior.directory), adapter_name="reward")
    head = scoring.ScoreHead.load(prior.directory, model.config.hidden_size)
    assert held_out_score(loaded, head, tok, held, config).accuracy < 0.1  # the prior disagrees

    fit = refit(base_dir, train, held, config, tmp_path / "new", prior=prior.directory,
                base_model=fingerprint)  # fmt: skip
    assert set(fit.candidates) == {"warm", "fresh"}
    assert fit.score.accuracy > 0.9, fit.candidates
    assert fit.score == max(fit.candidates.values(), key=lambda s: (s.accuracy, -s.loss))
    assert (fit.directory / "score_head.safetensors").is_file()
    assert not (tmp_path / "new-warm").exists() and not (tmp_path / "new-fresh").exists()


def test_a_probed_head_reads_frozen_features_the_labelers_way(base_dir: Path) -> None:
    config = RewardConfig(batch_rankings=16, max_length=48, probe_steps=200)
    model, tok = loading.load_base(base_dir)
    train, held = split_rankings(_rankings(200, prefer_long=True, seed=3), 0.2, 400)
    head = probe_head(model, tok, train, config)
    assert held_out_score(model, head, tok, held, config).accuracy > 0.9
    flipped = [(prompt, tiers[::-1]) for prompt, tiers in held]
    assert held_out_score(model, head, tok, flipped, config).accuracy < 0.1


def test_the_reward_scale_is_normalised_and_the_order_kept(base_dir: Path) -> None:
    model, tok = loading.load_base(base_dir)
    torch.manual_seed(0)
    head = scoring.ScoreHead(model.config.hidden_size)
    head.linear.weight.data.mul_(40.0)  # a ranking loss on separable data grows the scale
    texts = [(f"<|user|>\nsay: {w}\n<|assistant|>\n", w * n) for w in "abcdef" for n in (1, 2, 3)]
    before = score_texts(model, head, tok, texts, 48, 8)
    old = normalise_head_scale(model, head, tok, texts, max_length=48)
    after = score_texts(model, head, tok, texts, 48, 8)
    assert old == pytest.approx(float(before.std()), rel=1e-5)
    assert float(after.std()) == pytest.approx(1.0, rel=1e-4)
    assert torch.equal(after.argsort(), before.argsort())


def test_the_judge_learns_the_held_out_rankings_and_is_measured_on_the_others(
    base_dir: Path, tmp_path: Path
) -> None:
    config = RewardConfig(steps=60, r=4, alpha=8, batch_rankings=16, warmup=0, max_length=48,
                          lr=3e-3, eval_every=20, patience=3)  # fmt: skip
    held = [r.text for r in _rankings(60, prefer_long=True, seed=4)]
    same = [r.text for r in _rankings(60, prefer_long=True, seed=5)]
    opposite = [r.text for r in _rankings(60, prefer_long=False, seed=5)]
    fingerprint = loading.base_fingerprint(base_dir)
    agrees = fit_judge(base_dir, held, same, config, tmp_path / "a", window=40,
                       base_model=fingerprint)  # fmt: skip
    assert agrees.score.accuracy > 0.9 and agrees.score.pairs == 40  # the newest 40 measured
    disagrees = fit_judge(base_dir, held, opposite, config, tmp_path / "b", window=40,
                          base_model=fingerprint)  # fmt: skip
    assert disagrees.score.accuracy < 0.1  # it learned `held`, not the rankings it is measured on
    assert (agrees.directory / "score_head.safetensors").is_file()
