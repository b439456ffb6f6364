"""Test support: tiny Llama-shaped models for the lean forwards' tests, and (from
`bench.harness`, which the benchmarks share) free loopback ports, random LoRA adapters and a
`flywheel serve` subprocess."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.harness import FLYWHEEL, ServerProcess, free_port, make_adapter

__all__ = [
    "FLYWHEEL",
    "LABELING_KEYS",
    "LLAMA_SHAPES",
    "TINY_VOCAB",
    "ServerProcess",
    "free_port",
    "labeling_server",
    "make_adapter",
    "server_with_reward",
    "tiny_causal_lm",
]

VLLM_START_S = 600  # vLLM's first start on 2 busy cores takes minutes; the torch server seconds


TINY_VOCAB = 96
# The Llama-shaped families the lean forwards run, as (model type, extra config).
LLAMA_SHAPES = [
    ("llama", {}),
    ("llama", {"num_key_value_heads": 2}),  # grouped-query attention
    ("qwen2", {"num_key_value_heads": 2}),  # biases on q, k, v
    ("mistral", {"sliding_window": None, "num_key_value_heads": 4}),
]


def tiny_causal_lm(model_type: str = "llama", **extra: object) -> Any:
    """A random 2-layer causal LM of `model_type`, seeded, built from its config alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type, vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128, **extra,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


def server_with_reward(
    model: Path, tmp_path_factory: pytest.TempPathFactory, *, args: list[str] = ()
) -> Iterator[ServerProcess]:
    """A server with a reward model published and live."""
    from flywheel_client import FlywheelClient
    from flywheel_model import loading

    proc = ServerProcess(
        model, tmp_path_factory.mktemp("server"), args=args, start_timeout_s=VLLM_START_S
    ).start()
    try:
        adapters = tmp_path_factory.mktemp("adapters")
        with FlywheelClient(proc.grpc) as client:
            client.publish_adapter(
                make_adapter(model, adapters / "reward", reward=True),
                name="reward",
                base_model=loading.base_fingerprint(model),
                promote=True,
            )
        yield proc
    finally:
        proc.stop()


# A labeling team: an operator (admin) and two labelers (feedback), by key name.
LABELING_KEYS = {"ops": "ops-key-0123456789", "ann": "ann-key-0123456789",
                 "bob": "bob-key-0123456789"}  # fmt: skip


def labeling_server(model: Path, data: Path, *args: str) -> ServerProcess:
    """`flywheel serve` with auth on for LABELING_KEYS, and `args`."""
    import json

    keys = data / "keys.json"
    scopes = {"ops": ["admin"], "ann": ["feedback"], "bob": ["feedback"]}
    keys.write_text(json.dumps({"keys": [
        {"name": name, "key": key, "scopes": scopes[name]} for name, key in LABELING_KEYS.items()
    ]}))  # fmt: skip
    return ServerProcess(model, data, args=["--api-keys-file", str(keys), *args]).start()
