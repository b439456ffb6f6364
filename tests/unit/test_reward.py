import math
from pathlib import Path

import pytest
import torch

from flywheel_demo.model import build_tiny_model
from flywheel_learner.reward import (
    RewardConfig,
    fit_reward_model,
    normalise_head_bias,
    split_held_out,
)
from flywheel_model import adapters, loading, scoring
from flywheel_model.scoring import make_batch, score_batch

pytestmark = pytest.mark.unit

CONFIG = RewardConfig(steps=30, lr=1e-2, r=4, alpha=8, batch_rankings=8, held_out=0.25, warmup=2)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


def rankings(n: int) -> list[tuple[str, list[list[str]]]]:
    """A preference a tiny random model can learn: 'yes' > 'maybe' ~ 'perhaps' > 'no'."""
    return [
        (f"<|user|>\nq{i}\n<|assistant|>\n", [["yes"], ["maybe", "perhaps"], ["no"]])
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def fit(tiny_dir: Path):
    model, tokenizer = loading.load_base(tiny_dir)
    return fit_reward_model(model, tokenizer, rankings(32), CONFIG, progress=False), tokenizer


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lr", -1, "lr must be > 0, got -1"),
        ("r", 0, r"r \(LoRA rank\) must be >= 1, got 0"),
        ("held_out", 1.0, r"held_out must be in \[0, 1\), got 1.0"),
        ("target_modules", (), "target_modules must name at least one module"),
        ("max_epochs", 0, r"max_epochs must be > 0 \(or None\), got 0"),
    ],
)
def test_config_rejects_bad_values(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RewardConfig(**{field: value})


def test_batch_has_one_row_per_completion_with_tiers_and_groups(tiny_dir: Path) -> None:
    _, tokenizer = loading.load_base(tiny_dir)
    batch = make_batch(tokenizer, rankings(2), max_length=64)
    assert batch.tiers.tolist() == [0, 1, 1, 2, 0, 1, 1, 2]
    assert batch.group.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    last = batch.attention_mask.sum(dim=1) - 1
    assert (batch.input_ids[torch.arange(8), last] == tokenizer.eos_token_id).all()


def test_held_out_split_is_by_ranking() -> None:
    train, held = split_held_out(rankings(20), 0.25, seed=0)
    assert len(train) == 15 and len(held) == 5
    assert {p for p, _ in train}.isdisjoint({p for p, _ in held})


def test_fit_learns_the_preference(fit) -> None:
    result, _ = fit
    assert result.held_out_accuracy > 0.75  # 4 of 5 pairs per ranking; chance is 0.5
    assert result.train_loss < math.log(2)
    assert result.adapter_name == "reward"


def test_base_weights_stay_frozen(fit) -> None:
    result, _ = fit
    trainable = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_rankings_without_a_pair_are_rejected(tiny_dir: Path) -> None:
    model, tokenizer = loading.load_base(tiny_dir)
    with pytest.raises(ValueError, match="ranking 0 must hold at least two non-empty tiers"):
        fit_reward_model(model, tokenizer, [("p", [["a", "b"]])], CONFIG, progress=False)


def test_normalised_demonstrations_score_mean_zero(fit) -> None:
    result, tokenizer = fit
    demos = [(p, "yes") for p, _ in rankings(6)] + [(p, "no") for p, _ in rankings(2)]
    normalise_head_bias(result.model, result.head, tokenizer, demos)
    batch = make_batch(tokenizer, [(p, [[r]]) for p, r in demos], max_length=64)
    with torch.no_grad():
        scores = score_batch(result.model, result.head, batch)
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-4)


def test_saved_adapter_loads_with_plain_peft(fit, tiny_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    result, tokenizer = fit
    out = adapters.save_adapter(
        result.model, "reward", tmp_path / "reward", head=result.head,
        base_model=loading.base_fingerprint(tiny_dir),
    )  # fmt: skip
    assert adapters.read_adapter_meta(out)["base_model"] == loading.base_fingerprint(tiny_dir)
    base, _ = loading.load_base(tiny_dir)
    loaded = PeftModel.from_pretrained(base, str(out)).eval()
    head = scoring.ScoreHead.load(out, base.config.hidden_size)
    batch = make_batch(tokenizer, rankings(2), max_length=64)
    with torch.no_grad():
        fresh = score_batch(loaded, head, batch)
        trained = score_batch(result.model, result.head, batch)
    torch.testing.assert_close(fresh, trained)


def test_warm_start_begins_from_the_saved_model(fit, tiny_dir: Path, tmp_path: Path) -> None:
    result, tokenizer = fit
    saved = adapters.save_adapter(result.model, "reward", tmp_path / "rm", head=result.head)
    batch = make_batch(tokenizer, rankings(2), max_length=64)
    # lr ~ 0: the warm-started model scores as the saved one does, a fresh one does not.
    still = RewardConfig(steps=2, lr=1e-12, r=4, alpha=8, batch_rankings=8, warmup=1)
    warm = fit_reward_model(
        loading.load_base(tiny_dir)[0], tokenizer, rankings(8), still, init=saved, progress=False
    )
    cold = fit_reward_model(loading.load_base(tiny_dir)[0], tokenizer, rankings(8), still,
                            progress=False)  # fmt: skip
    with torch.no_grad():
        before = score_batch(result.model, result.head, batch)
        after = score_batch(warm.model, warm.head, batch)
        fresh = score_batch(cold.model, cold.head, batch)
    assert warm.warm_start and not cold.warm_start
    torch.testing.assert_close(after, before)
    assert not torch.allclose(fresh, before, atol=1e-3)


def test_warm_start_from_another_lora_shape_starts_fresh(fit, tiny_dir: Path, tmp_path: Path):
    result, tokenizer = fit
    saved = adapters.save_adapter(result.model, "reward", tmp_path / "rm", head=result.head)
    other = RewardConfig(steps=2, r=8, alpha=8, batch_rankings=8, warmup=1)
    refit = fit_reward_model(
        loading.load_base(tiny_dir)[0], tokenizer, rankings(8), other, init=saved, progress=False
    )
    assert not refit.warm_start


@pytest.mark.parametrize(
    ("max_epochs", "rankings", "steps"),
    [(None, 10, 300), (4.0, 32, 4), (4.0, 1515, 190), (4.0, 10_000, 300), (0.01, 3, 1)],
)
def test_max_epochs_caps_the_steps(max_epochs: float | None, rankings: int, steps: int) -> None:
    config = RewardConfig(steps=300, batch_rankings=32, max_epochs=max_epochs)
    assert config.steps_for(rankings) == steps


def test_a_capped_fit_runs_the_capped_steps(tiny_dir: Path) -> None:
    model, tokenizer = loading.load_base(tiny_dir)
    capped = RewardConfig(steps=300, r=4, alpha=8, batch_rankings=4, held_out=0.1, max_epochs=1)
    result = fit_reward_model(model, tokenizer, rankings(10), capped, progress=False)
    assert result.steps == 3  # 9 training rankings (1 held out), 4 per step, one pass


def test_the_learners_refit_budget_grows_with_the_data(tiny_dir: Path) -> None:
    from flywheel_learner.config import LearnerConfig

    config = LearnerConfig(server="127.0.0.1:1", model_dir=tiny_dir, work_dir=Path("w"))
    assert config.reward.max_epochs == 8.0 and config.reward.eval_every > 0
    assert config.reward.steps_for(32) == 8  # a few rankings: 8 passes
    assert config.reward.steps_for(1000) == 250  # more: more steps
    assert config.reward.steps_for(5000) == 400  # a cap, and early stopping before it
