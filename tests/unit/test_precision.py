"""--device / --dtype: what `auto` means, what is refused, and a bfloat16 base against float32
on the same data (reward scores, the K-way reward loss, one PPO-ptx step)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from flywheel_learner.config import LearnerConfig
from flywheel_learner.ppo_models import SharedBaseModels, make_optimizer
from flywheel_learner.reward import RewardConfig
from flywheel_learner.reward_refit import score_saved
from flywheel_model import precision
from flywheel_model.precision import Precision
from tests.unit import test_ppo
from tests.unit.test_ppo import CONFIG, prompts, ptx_batch, run_step

pytestmark = pytest.mark.unit

base_dir, reward_dir = test_ppo.base_dir, test_ppo.reward_dir  # the same tiny model and RM

BF16 = Precision("cpu", torch.bfloat16)
# bfloat16 keeps 8 bits of mantissa: about 0.4% per rounding, a few roundings deep here.
REL = 0.02


def test_auto_is_bfloat16_on_cuda_and_float32_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision.resolve() == Precision("cpu", torch.float32)
    assert precision.resolve("cpu", "bfloat16") == BF16
    with pytest.raises(ValueError, match="no CUDA device"):
        precision.resolve("cuda", "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert precision.resolve() == Precision("cuda", torch.bfloat16)
    assert precision.resolve("cuda:1", "float32") == Precision("cuda:1", torch.float32)


@pytest.mark.parametrize(("device", "dtype", "word"), [
    ("gpu", "auto", "device"), ("cuda:x", "auto", "device"), ("cpu", "fp8", "dtype"),
    ("cpu", "half", "dtype"),
])  # fmt: skip
def test_unknown_devices_and_dtypes_are_refused_by_name(
    device: str, dtype: str, word: str, tmp_path: Path
) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=f"^{word} must be"):
        LearnerConfig(server="127.0.0.1:1", model_dir=tmp_path, work_dir=tmp_path / "w",
                      device=device, dtype=dtype)  # fmt: skip


def test_a_bfloat16_base_trains_float32_adapters_and_heads(
    base_dir: Path, reward_dir: Path
) -> None:
    models = SharedBaseModels.build(base_dir, reward_dir, CONFIG, BF16)
    dtypes = {n: p.dtype for n, p in models.peft.named_parameters()}
    assert {d for n, d in dtypes.items() if ".lora_" in n or "modules_to_save" in n} == {
        torch.float32
    }
    assert torch.bfloat16 in {d for n, d in dtypes.items() if "base_layer" in n}
    assert {
        p.dtype for p in [*models.value_head.parameters(), *models.reward_head.parameters()]
    } == {torch.float32}
    assert {p.dtype for g in make_optimizer(models, CONFIG).param_groups for p in g["params"]} == {
        torch.float32
    }


def test_bfloat16_scores_and_reward_loss_match_float32(base_dir: Path, reward_dir: Path) -> None:
    full = SharedBaseModels.build(base_dir, reward_dir, CONFIG)
    half = SharedBaseModels.build(base_dir, reward_dir, CONFIG, BF16)
    texts = prompts(full)
    answers = ["cba", "3", "abc", "HI"]
    assert torch.allclose(half.rewards(texts, answers), full.rewards(texts, answers), rtol=REL)
    rankings = [(p, [[a], [b], [c]]) for p, (a, b, c) in zip(
        texts, [("cba", "abc", "x"), ("3", "4", "12"), ("abc", "bca", ""), ("HI", "hi", "H")],
        strict=True)]  # fmt: skip
    config = RewardConfig(r=4, alpha=8)
    loss32 = score_saved(base_dir, reward_dir, rankings, config).loss
    loss16 = score_saved(base_dir, reward_dir, rankings, config, BF16).loss
    assert math.isfinite(loss16) and loss16 == pytest.approx(loss32, rel=REL)


def test_a_bfloat16_ppo_step_matches_float32(base_dir: Path, reward_dir: Path) -> None:
    full = SharedBaseModels.build(base_dir, reward_dir, CONFIG)
    half = SharedBaseModels.build(base_dir, reward_dir, CONFIG, BF16)
    a = run_step(full, CONFIG, ptx_batch(full))
    b = run_step(half, CONFIG, ptx_batch(half))
    for name in ("reward_mean", "ptx_loss", "value_loss"):
        assert getattr(b, name) == pytest.approx(getattr(a, name), rel=REL), name
    assert b.policy_loss == pytest.approx(a.policy_loss, abs=0.01)
    assert b.kl_mean == pytest.approx(a.kl_mean, abs=0.01)
