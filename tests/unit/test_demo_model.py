import json
from pathlib import Path

import pytest
import torch

from flywheel_demo.model import (
    BUILD_INFO,
    DemoModelConfig,
    build_tiny_model,
    chat_prompt,
    ensure_demo_model,
    policy_accuracy,
)
from flywheel_demo.task import Example
from flywheel_model import adapters, loading

pytestmark = pytest.mark.unit

# Small enough to build in a few seconds; exercises every step of the real build.
SMALL = DemoModelConfig(
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    tokenizer_texts=100,
    demonstrations=64,
    sft_steps=3,
    sft_batch_size=4,
    preference_pairs=20,
    reward_steps=2,
    reward_batch_rankings=4,
    eval_examples=8,
)


def test_tiny_model_is_a_local_hf_directory(tmp_path: Path) -> None:
    directory = build_tiny_model(tmp_path / "tiny")
    model, tokenizer = loading.load_base(directory)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert any(directory.glob("*.safetensors"))
    prompt = chat_prompt(tokenizer, "add: 1 + 2")
    batch = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_config_rejects_heads_that_do_not_divide_hidden() -> None:
    with pytest.raises(
        ValueError, match=r"hidden_size \(30\) must be a multiple of num_heads \(4\)"
    ):
        DemoModelConfig(hidden_size=30)


def test_config_hash_changes_with_the_config() -> None:
    assert DemoModelConfig().short_hash() == DemoModelConfig().short_hash()
    assert DemoModelConfig().short_hash() != DemoModelConfig(seed=1).short_hash()


def test_policy_accuracy_scores_each_task(tmp_path: Path) -> None:
    model, tokenizer = loading.load_base(build_tiny_model(tmp_path / "tiny"))
    examples = [Example("add", "add: 1 + 2", "3"), Example("reverse", "reverse: abc", "cba")]
    scores = policy_accuracy(model, tokenizer, examples)
    assert set(scores) == {"all", "add", "reverse"}
    assert 0.0 <= scores["all"] <= 1.0


def test_ensure_builds_once_then_reuses_the_cache(tmp_path: Path) -> None:
    demo = ensure_demo_model(tmp_path, SMALL, progress=False)
    assert demo.model_dir == tmp_path / "models" / f"demo-{SMALL.short_hash()}" / "model"
    info = json.loads((demo.model_dir.parent / BUILD_INFO).read_text())
    assert info == demo.info
    assert set(info["policy_accuracy"]) >= {"all"}
    assert 0.0 <= info["reward_held_out_accuracy"] <= 1.0
    assert info["tokens"]["eos"] == loading.load_base(demo.model_dir)[1].eos_token_id
    assert adapters.read_adapter_meta(demo.reward_dir)["base_model"] == loading.base_fingerprint(
        demo.model_dir
    )
    assert [p.name for p in (tmp_path / "models").iterdir()] == [demo.model_dir.parent.name]

    mtime = (demo.model_dir.parent / BUILD_INFO).stat().st_mtime_ns
    again = ensure_demo_model(tmp_path, SMALL, progress=False)
    assert again == demo
    assert (demo.model_dir.parent / BUILD_INFO).stat().st_mtime_ns == mtime
