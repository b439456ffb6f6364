"""The adapter format shared by the learner and the server.

Every adapter is a standard PEFT LoRA directory (`adapter_config.json`,
`adapter_model.safetensors`) on the served causal-LM base, so plain peft and vLLM load it. A
reward adapter adds `score_head.safetensors` (`scoring.ScoreHead`), and Flywheel's own metadata
(the base model's fingerprint) sits beside them in `flywheel.json`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peft import PeftModel

    from flywheel_model.scoring import ScoreHead

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SCORE_HEAD = "score_head.safetensors"
LIKELIHOOD = "likelihood"  # the score head's weight on the response's mean log-likelihood
# Our metadata (the base model fingerprint) lives beside the PEFT files, not inside
# adapter_config.json, so plain peft and vLLM read the adapter with no unknown keys.
FLYWHEEL_META = "flywheel.json"
# The final RMSNorm of Llama-shaped models, before the LM head. A policy adapter may train its
# own copy (PEFT modules_to_save; the learner's PPOConfig.final_norm_lr): the logits' scale
# lives there.
FINAL_NORM = "model.norm"
# LoRA on every linear layer but the output head: the seven projections of a Llama-shaped
# model, a fused qkv_proj and gate_up_proj on Phi-3, c_attn, c_proj and c_fc on GPT-2.
ALL_LINEAR = ("all-linear",)


def peft_targets(targets: tuple[str, ...], model: Any) -> list[str]:
    """`target_modules` for peft: the names given, or for ALL_LINEAR the short names of the
    model's linear layers (GPT-2's Conv1D included) but its output head. Short names, as
    adapters made elsewhere list them, so two adapters on the same layers have one shape."""
    if tuple(targets) != ALL_LINEAR:
        return list(targets)
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear | Conv1D) or module is head:
            continue
        parts = name.split(".")
        if any(p.startswith("lora_") for p in parts):  # another adapter's own matrices
            continue
        names.add(parts[-2] if parts[-1] == "base_layer" else parts[-1])  # under another LoRA
    return sorted(names)


def save_adapter(
    model: PeftModel,
    adapter_name: str,
    out_dir: str | Path,
    *,
    head: ScoreHead | None = None,
    base_model: str = "",
) -> Path:
    """Write one adapter as a flat PEFT directory, atomically (temporary name, then rename)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(str(tmp), selected_adapters=[adapter_name])
        # peft nests every adapter but "default" in a folder of its name; flatten it.
        nested = tmp / adapter_name
        if nested.is_dir():
            for f in nested.iterdir():
                f.rename(tmp / f.name)
            nested.rmdir()
        if head is not None:
            head.save(tmp)
        if base_model:
            (tmp / FLYWHEEL_META).write_text(json.dumps({"base_model": base_model}, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_adapter_config(directory: str | Path) -> dict:
    """The adapter's PEFT config, with a clear error when the directory is not an adapter."""
    directory = Path(directory)
    config_path = directory / ADAPTER_CONFIG
    if not config_path.is_file() or not (directory / ADAPTER_WEIGHTS).is_file():
        raise ValueError(
            f"{directory} is not a PEFT adapter: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from e
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{directory} holds a {config.get('peft_type')!r} adapter; only LORA")
    return config


def read_adapter_meta(directory: str | Path) -> dict:
    """Flywheel's metadata for an adapter ({} for an adapter made elsewhere)."""
    path = Path(directory) / FLYWHEEL_META
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter directory, read and checked once (`read_spec`): plain LoRA, on the base it
    says, training at most the final norm whole. Consumers read fields; none re-checks files."""

    path: Path
    config: dict[str, Any]  # PEFT's adapter_config.json, as written
    base_model: str  # the fingerprint it was trained on; "" for an adapter made elsewhere
    final_norm: bool  # trains its own copy of the final norm (PEFT modules_to_save)
    score_head: bool  # a reward model: score_head.safetensors beside the LoRA

    @property
    def shape(self) -> tuple[int, float, frozenset[str]]:
        """(rank, alpha, target modules): two adapters of one shape can share weights."""
        return lora_shape(self.config)


def lora_shape(config: dict[str, Any]) -> tuple[int, float, frozenset[str]]:
    """(rank, alpha, target modules) of a PEFT LoRA config, as written or as peft holds it."""
    targets = config.get("target_modules") or ()
    targets = [targets] if isinstance(targets, str) else targets
    return int(config["r"]), float(config["lora_alpha"]), frozenset(targets)


def read_spec(
    directory: str | Path, *, base_model: str | None = None, name: str = ""
) -> AdapterSpec:
    """Read an adapter's files and check them: ValueError saying what is wrong, else its spec.
    `base_model`: the fingerprint of the base it must have been trained on; `name`: what to
    call it in errors (default: its directory's name)."""
    path = Path(directory)
    config = read_adapter_config(path)
    name = name or path.name
    if config.get("use_dora"):
        raise ValueError(f"adapter {name} is DoRA, not plain LoRA")
    if config.get("lora_bias"):
        raise ValueError(f"adapter {name} trains a LoRA bias, not plain LoRA")
    if config.get("trainable_token_indices"):
        raise ValueError(f"adapter {name} trains token rows besides its LoRA matrices")
    whole = list(config.get("modules_to_save") or [])
    if whole not in ([], [FINAL_NORM]):
        raise ValueError(
            f"adapter {name} trains whole modules {whole}; only LoRA matrices and the final "
            f"norm ({FINAL_NORM}) are served"
        )
    trained_on = str(read_adapter_meta(path).get("base_model") or "")
    if base_model is not None and trained_on and trained_on != base_model:
        raise ValueError(
            f"adapter {name} was trained on base model {trained_on}, not on {base_model}"
        )
    return AdapterSpec(path, config, trained_on, bool(whole), (path / SCORE_HEAD).is_file())


def load_adapter_weights(peft_model: PeftModel, directory: str | Path, adapter_name: str) -> bool:
    """Copy a saved adapter's LoRA weights into `peft_model`'s adapter `adapter_name`.

    Returns False, loading nothing, when the saved adapter has another shape (rank, alpha,
    target modules or whole modules it trains): the caller then starts that adapter fresh.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = read_adapter_config(directory)
    current = peft_model.peft_config[adapter_name].to_dict()
    same = lora_shape(saved) == lora_shape(current) and set(
        saved.get("modules_to_save") or ()
    ) == set(current.get("modules_to_save") or ())
    if same:
        weights = load_file(str(Path(directory) / ADAPTER_WEIGHTS))
        set_peft_model_state_dict(peft_model, weights, adapter_name=adapter_name)
    return same
