"""The torch engine's adapters: every loaded LoRA on one peft model over the base, each reward
model's score head, each policy's own final norm. Loading reads the adapter's spec, attaches it,
hands the lean decoder its weights and smoke-checks it; a failure leaves nothing loaded.

Every method runs on the engine's scheduler thread, between two decode steps.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch

from flywheel_model import adapters, scoring
from flywheel_model.adapters import AdapterSpec
from flywheel_model.scoring import make_batch, score_batch
from flywheel_server.decoding import Decoder
from flywheel_server.engine_api import SMOKE_PROMPT, SMOKE_TOKENS, read_spec
from flywheel_server.errors import AdapterNotFound, AdapterRefused, Conflict
from flywheel_server.llama_decoder import LlamaDecoder

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


class LoadedAdapters:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        device: str,
        base_model: str,
        max_length: int,
        in_use: Callable[[], Collection[str | None]],
    ) -> None:
        """in_use: the adapters of the engine's running and waiting rows (never unloaded)."""
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.base_model = base_model
        self.max_length = max_length
        self.in_use = in_use
        self.peft: Any = None  # peft.PeftModel once the first adapter is loaded
        self.heads: dict[str, scoring.ScoreHead] = {}
        self.final_norms: dict[str, torch.Tensor] = {}  # policies that train their own
        self.decoder: Decoder | None = None  # set by the engine once it has built its decoder

    @property
    def names(self) -> list[str]:
        return sorted(self.peft.peft_config) if self.peft is not None else []

    @property
    def net(self) -> Any:
        return self.peft if self.peft is not None else self.model

    def check_loaded(self, adapters: list[str | None]) -> None:
        missing = sorted({a for a in adapters if a is not None} - set(self.names))
        if missing:
            raise AdapterNotFound(f"adapter {', '.join(missing)} is not loaded")

    def adapter_names(self, adapters: list[str | None]) -> dict[str, Any]:
        """peft's per-row adapter selection, as keyword arguments of the forward."""
        self.check_loaded(adapters)
        return {} if self.peft is None else {"adapter_names": [a or BASE for a in adapters]}

    def forward(self, adapters: list[str | None], **kwargs: Any) -> Any:
        """transformers' forward, each row on its adapter."""
        return self.net(**kwargs, **self.adapter_names(adapters))

    @torch.inference_mode()
    def score(self, adapter: str, prompt: str, completions: list[str]) -> list[float]:
        # One ranking tier holding every completion: one right-padded row each, in order.
        batch = make_batch(self.tokenizer, [(prompt, [completions])], self.max_length)
        use = self.adapter_names([adapter] * len(completions))
        return score_batch(self.net, self.heads[adapter], batch, **use).float().cpu().tolist()

    def load(self, adapter_id: str, path: Path, reward: bool) -> None:
        spec = read_spec(adapter_id, path, self.base_model)
        try:
            head = (
                scoring.ScoreHead.load(path, self.model.config.hidden_size).to(self.device)
                if reward
                else None
            )
            self._attach(adapter_id, spec)
        except Exception as e:
            raise AdapterRefused(f"adapter {adapter_id} could not be loaded: {e}") from e
        try:
            self.read_into_decoder()
        except ValueError as e:
            self.unload(adapter_id)
            raise AdapterRefused(str(e)) from e
        try:
            if head is not None:
                self.heads[adapter_id] = head
            self._smoke_check(adapter_id, head)
        except Exception as e:
            self.unload(adapter_id)
            if isinstance(e, AdapterRefused):
                raise
            raise AdapterRefused(f"adapter {adapter_id} failed its smoke check: {e}") from e

    def _attach(self, adapter_id: str, spec: AdapterSpec) -> None:
        """Give peft the adapter's LoRA matrices; keep its own final norm, if any, apart.

        peft cannot mix adapters that swap the norm in one batch, and only the lean decoder
        applies a final norm per row, so the norm never reaches peft."""
        if adapter_id in self.names:
            return  # idempotent: versions are immutable, never reloaded in place
        path = spec.path
        with tempfile.TemporaryDirectory() as tmp:
            norm = split_final_norm(spec, Path(tmp) / "lora")
            if norm is not None:
                if not isinstance(self.decoder, LlamaDecoder):
                    raise AdapterRefused(
                        f"adapter {adapter_id} trains its own final norm, which only the lean "
                        "decoder applies; serve it with decoder 'auto' on a Llama-shaped model, "
                        "or train the policy without it (flywheel learn --final-norm-lr 0)"
                    )
                if not torch.isfinite(norm).all():
                    raise AdapterRefused(f"adapter {adapter_id} has a non-finite final norm")
                path = Path(tmp) / "lora"
            self._attach_lora(adapter_id, path)
        if norm is not None:
            self.final_norms[adapter_id] = norm.to(self.device, self.model.dtype)

    def _attach_lora(self, adapter_id: str, path: Path) -> None:
        from peft import PeftModel

        try:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(
                    self.model, str(path), adapter_name=adapter_id
                )
                self.peft.eval()
            else:
                self.peft.load_adapter(str(path), adapter_name=adapter_id)
        except Exception:
            # peft injects LoRA layers before it reads the weights: take them out again.
            if self.peft is None:
                strip_lora_layers(self.model)
            else:
                self.unload(adapter_id)
            raise

    @torch.inference_mode()
    def _smoke_check(self, adapter_id: str, head: scoring.ScoreHead | None) -> None:
        prompt = self.tokenizer(SMOKE_PROMPT, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt or [self.tokenizer.eos_token_id]], device=self.device)
        use = self.adapter_names([adapter_id])
        if head is not None:
            starts = torch.tensor([ids.shape[1] - 1], device=self.device)  # the last token
            values = scoring.score(self.net, head, ids, torch.ones_like(ids), starts, **use)
            if not torch.isfinite(values).all():
                raise AdapterRefused(f"adapter {adapter_id} gives non-finite rewards")
            return
        for _ in range(SMOKE_TOKENS):
            logits = self.net(input_ids=ids, **use).logits[:, -1]
            if not torch.isfinite(logits).all():
                raise AdapterRefused(f"adapter {adapter_id} gives non-finite logits")
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=-1)

    def unload(self, adapter_id: str) -> None:
        self.heads.pop(adapter_id, None)
        self.final_norms.pop(adapter_id, None)
        if adapter_id not in self.names:
            return
        if adapter_id in self.in_use():
            raise Conflict(f"adapter {adapter_id} is serving requests; unload it once they finish")
        remaining = [a for a in self.names if a != adapter_id]
        if remaining:
            self.peft.set_adapter(remaining[0])
            self.peft.delete_adapter(adapter_id)
        else:
            # peft cannot hold zero adapters: drop the wrapper and restore the bare base layers.
            self.model = self.peft.unload()
            self.peft = None
        self.read_into_decoder()

    def read_into_decoder(self) -> None:
        """Hand the loaded LoRA weights to the lean decoder (ValueError: it cannot run one)."""
        if isinstance(self.decoder, LlamaDecoder):
            self.decoder.read_adapters(self.peft, self.final_norms)


def split_final_norm(spec: AdapterSpec, into: Path) -> torch.Tensor | None:
    """The final norm's weight of an adapter that trains its own (PEFT `modules_to_save`
    ["model.norm"], as the learner's `final_norm_lr` does), with a LoRA-only copy of the adapter
    written to `into`. None, writing nothing, when it trains no whole module."""
    from safetensors.torch import load_file, save_file

    if not spec.final_norm:
        return None
    weights = load_file(str(spec.path / adapters.ADAPTER_WEIGHTS))
    norm = weights.pop(f"base_model.model.{adapters.FINAL_NORM}.weight", None)
    if norm is None:
        raise AdapterRefused(f"adapter {spec.path.name} names {adapters.FINAL_NORM} but holds none")
    into.mkdir(parents=True)
    config = {**spec.config, "modules_to_save": None}
    (into / adapters.ADAPTER_CONFIG).write_text(json.dumps(config))
    save_file(weights, str(into / adapters.ADAPTER_WEIGHTS))
    return norm


def strip_lora_layers(model: torch.nn.Module) -> None:
    """Put every module peft wrapped back to its base layer (after a failed first load)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
