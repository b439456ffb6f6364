"""Activation checkpointing that follows autograd, not train/eval mode (`--gradient-checkpointing`).

transformers checkpoints a decoder layer only in training mode, but the learner trains in eval
mode (PPO keeps dropout off so the ratio starts at exactly 1; `ppo_models`). `enable` instead
checkpoints every decoder layer whenever it runs with gradients enabled: its activations are
dropped after the forward and recomputed in the backward, so a step holds one layer's
activations plus each layer's input, at the cost of one more forward. Passes under
`torch.no_grad` (rollouts, reference, reward) run as before.

Both forwards are covered: transformers' (each `GradientCheckpointingLayer`'s forward is
wrapped) and the lean Llama-family forward (`llama.read` sees the mark and `llama.layer_loop`
checkpoints each layer).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

MARK = "_flywheel_checkpointing"


def enable(model: Any) -> int:
    """Checkpoint each decoder layer of `model` (a transformers causal LM, before or after
    peft wraps it) when it runs with gradients enabled. Returns how many layers it wrapped;
    a model with none is refused with its type named. Idempotent."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    base = _base(model)
    layers = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        kind = getattr(getattr(base, "config", None), "model_type", type(base).__name__)
        raise ValueError(f"gradient checkpointing: this {kind} model has no decoder layers "
                         "that transformers can checkpoint")  # fmt: skip
    if not getattr(base, MARK, False):
        for layer in layers:
            layer.forward = _checkpointed(layer, layer.forward)  # type: ignore[method-assign]
        setattr(base, MARK, True)
    return len(layers)


def enabled(model: Any) -> bool:
    return bool(getattr(_base(model), MARK, False))


def _base(model: Any) -> Any:
    """The transformers model under a peft wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _checkpointed(layer: torch.nn.Module, forward: Any) -> Any:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        # The recompute would write a KV cache a second time: a training forward needs none.
        for name in ("past_key_values", "layer_past"):
            if kwargs.get(name) is not None:
                kwargs[name] = None
        adapters = _adapter_state(layer)

        def replay(*args: Any, **kwargs: Any) -> Any:
            # The backward may come after another adapter was switched on (PPO forwards the
            # policy, then the value, then runs one backward): recompute under this one.
            now = _adapter_state(layer)
            _set_adapter_state(adapters)
            try:
                return forward(*args, **kwargs)
            finally:
                _set_adapter_state(now)

        return checkpoint(replay, *args, use_reentrant=False, **kwargs)

    return run


# peft's LoRA layers (`BaseTunerLayer`) and which of their adapters run: the state that
# `set_adapter` and `disable_adapter` change between a forward and its backward.
AdapterState = list[tuple[Any, Any, Any]]


def _adapter_state(layer: torch.nn.Module) -> AdapterState:
    return [
        (m, m._active_adapter, m._disable_adapters)
        for m in layer.modules()
        if hasattr(m, "_active_adapter")
    ]


def _set_adapter_state(state: AdapterState) -> None:
    for module, active, disabled in state:
        module._active_adapter, module._disable_adapters = active, disabled
