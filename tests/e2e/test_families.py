"""The model families people deploy, each through the public API: a tiny random model built from
the family's own config class, a local tokenizer carrying that family's chat template (written
here, nothing downloaded), then a chat completion, a ranking, one learner round (refit, PPO-ptx,
gate, publish) and the hot-swapped policy answering.

Llama-shaped families (Llama 3 with rope scaling and tied embeddings, Qwen2, Mistral) decode
with the lean decoder, whose logits tests/unit/test_llama_decoder.py holds equal to
transformers'; the others (Qwen3's q/k norms, Gemma 2 and 3, Phi-3's fused projections, GPT-2,
GPT-NeoX) decode with transformers' own forward, which the server names in its log.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from flywheel_cli.labelers import Labeler, demo_prompts, preference_from_spec
from flywheel_client import FlywheelClient
from flywheel_demo.model import _task_texts
from flywheel_demo.tokenizer import train_tokenizer
from tests.e2e.test_learn_loop import one_round, tiny_config
from tests.support import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEMPLATES = {  # (chat template, end-of-turn token), as each family's instruct tokenizer has them
    "llama3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
        "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}{% if "
        "add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
        "<|eot_id|>",
    ),
    "chatml": (CHATML, "<|im_end|>"),
    "mistral": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
        "{{ m['content'] }} [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}"
        "{% endfor %}",
        "</s>",
    ),
    "gemma": (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == "
        "'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if "
        "add_generation_prompt %}<start_of_turn>model\n{% endif %}",
        "<end_of_turn>",
    ),
    "phi3": (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
        "<|end|>",
    ),
    "none": (None, "<|endoftext|>"),  # base models: no template, "role: content" lines
}
LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {  # name: (model_type, template, config)
    "llama3": ("llama", "llama3", {**LLAMA_LIKE, "tie_word_embeddings": True, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),
    "qwen2": ("qwen2", "chatml", LLAMA_LIKE),
    "qwen3": ("qwen3", "chatml", {**LLAMA_LIKE, "head_dim": 16}),
    "mistral": ("mistral", "mistral", {**LLAMA_LIKE, "sliding_window": None}),
    "gemma2": ("gemma2", "gemma", {**LLAMA_LIKE, "head_dim": 16}),
    "gemma3": ("gemma3_text", "gemma", {**LLAMA_LIKE, "head_dim": 16}),
    "phi3": ("phi3", "phi3", LLAMA_LIKE),
    "gpt2": ("gpt2", "none", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256}),
    "gpt_neox": ("gpt_neox", "none", {"hidden_size": 64, "intermediate_size": 128,
                 "num_hidden_layers": 2, "num_attention_heads": 4,
                 "max_position_embeddings": 256}),
}  # fmt: skip


def build_family(name: str, out: Path) -> Path:
    """A tiny random model of the family, from its own config class, with a local tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, template_name, extra = FAMILIES[name]
    template, end = TEMPLATES[template_name]
    tokenizer = train_tokenizer(_task_texts(random.Random(0), 200))
    tokenizer.add_special_tokens({"eos_token": end})
    tokenizer.chat_template = template
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def chat(server: ServerProcess, content: str) -> dict[str, Any]:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 6}
    r = httpx.post(f"{server.http}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_family_serves_ranks_learns_and_swaps(family: str, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    model = build_family(family, tmp_path / family)
    server = ServerProcess(model, tmp_path / "data").start()
    try:
        first = chat(server, "reverse: abc")
        assert first["model"] == "policy-v0" and isinstance(
            first["choices"][0]["message"]["content"], str
        )
        with FlywheelClient(server.grpc, timeout=60) as client:
            labeler = Labeler(client, preference_from_spec("longer"), name=f"e2e-{family}",
                              k=3, max_tokens=6)  # fmt: skip
            assert labeler.run(demo_prompts(seed=3), count=32).submitted >= 16
            config = tiny_config(server, model, tmp_path / "learner")
            assert one_round(config) is True  # refit, PPO-ptx, the open gate, published live
            live = client.versions().live["policy"]
        assert live != "policy-v0"
        assert chat(server, "sort: cba")["model"] == live  # the swapped-in adapter answers
    finally:
        server.stop()
