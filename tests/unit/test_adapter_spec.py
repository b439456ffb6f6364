"""The adapter spec: an adapter's files read and checked once, in the model layer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.harness import make_adapter
from flywheel_model import adapters, loading

pytestmark = pytest.mark.unit


def test_a_plain_lora_adapter_reads_into_its_spec(tiny_model: Path, tmp_path: Path) -> None:
    reward = make_adapter(tiny_model, tmp_path / "r", reward=True, r=4)
    spec = adapters.read_spec(reward, base_model=loading.base_fingerprint(tiny_model))
    assert spec.score_head and not spec.final_norm
    assert spec.base_model == loading.base_fingerprint(tiny_model)
    assert spec.shape == (4, 8.0, frozenset({"q_proj", "v_proj"}))


def _edit(directory: Path, **changes: object) -> Path:
    path = directory / adapters.ADAPTER_CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return directory


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"modules_to_save": ["lm_head"]}, r"trains whole modules \['lm_head'\]"),
        ({"use_dora": True}, "is DoRA, not plain LoRA"),
        ({"lora_bias": True}, "trains a LoRA bias"),
        ({"trainable_token_indices": [1, 2]}, "trains token rows"),
        ({"peft_type": "IA3"}, "holds a 'IA3' adapter; only LORA"),
    ],
)
def test_what_the_server_cannot_serve_is_refused_on_reading(
    tiny_model: Path, tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    adapter = _edit(make_adapter(tiny_model, tmp_path / "a"), **changes)
    with pytest.raises(ValueError, match=message):
        adapters.read_spec(adapter, name="policy-v9")


def test_the_final_norm_alone_may_train_whole(tiny_model: Path, tmp_path: Path) -> None:
    adapter = _edit(make_adapter(tiny_model, tmp_path / "a"), modules_to_save=[adapters.FINAL_NORM])
    assert adapters.read_spec(adapter).final_norm


def test_an_adapter_of_another_base_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    adapter = make_adapter(tiny_model, tmp_path / "a")
    with pytest.raises(ValueError, match="adapter policy-v2 was trained on base model"):
        adapters.read_spec(adapter, base_model="another", name="policy-v2")
    assert adapters.read_spec(adapter).base_model  # no base to compare with: read as is


@pytest.mark.parametrize(("model_type", "expected"), [
    ("llama", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    ("phi3", ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]),
    ("gpt2", ["c_attn", "c_fc", "c_proj"]),
])  # fmt: skip
def test_all_linear_is_every_linear_layer_but_the_output_head(
    model_type: str, expected: list[str]
) -> None:
    from peft import LoraConfig, get_peft_model

    from tests.support import tiny_causal_lm

    extra = {"gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4}, "phi3": {"pad_token_id": 0}}
    model = tiny_causal_lm(model_type, **extra.get(model_type, {}))
    assert adapters.peft_targets(adapters.ALL_LINEAR, model) == expected
    assert adapters.peft_targets(("q_proj",), model) == ["q_proj"]  # names given: as given
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=expected))
    assert adapters.peft_targets(adapters.ALL_LINEAR, wrapped) == expected  # not lora_A, ...
