"""The model and adapter formats shared by the learner and the server's engine.

Every adapter is a standard PEFT LoRA directory (`adapter_config.json`,
`adapter_model.safetensors`) on the served causal-LM base, so plain peft and vLLM load it.
A reward adapter adds `score_head.safetensors`: a linear map from the final (post-norm) hidden
state of the last token of `prompt + completion + eos` to a scalar, plus a learned weight on the
mean log-likelihood of the completion's tokens (and eos) under the adapted model (`score`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from flywheel_learner import lean_forward

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SCORE_HEAD = "score_head.safetensors"
LIKELIHOOD = "likelihood"  # the score head's weight on the response's mean log-likelihood
# Our metadata (the base model fingerprint) lives beside the PEFT files, not inside
# adapter_config.json, so plain peft and vLLM read the adapter with no unknown keys.
FLYWHEEL_META = "flywheel.json"
# The final RMSNorm of Llama-shaped models, before the LM head. A policy adapter may train its
# own copy (PEFT modules_to_save; ppo.PPOConfig.final_norm_lr): the logits' scale lives there.
FINAL_NORM = "model.norm"


def load_base(
    path: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a local Hugging Face causal-LM directory and its tokenizer (never the hub)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    model.to(device)  # type: ignore[arg-type]  # transformers' decorated .to confuses mypy
    model.eval()
    return model, tokenizer


def base_fingerprint(path: str | Path) -> str:
    """A short id of a base model: its config plus the names and sizes of its weight files.

    Cheap enough for multi-GB checkpoints; an adapter records it so the server can refuse one
    trained on another base.
    """
    path = Path(path)
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


class ScoreHead(nn.Module):
    """Hidden state -> scalar (reward model; PPO's value head starts as a copy).

    `likelihood` weighs the reward model's mean log-likelihood of the response (see `score`).
    It starts at 1, so a fresh reward model begins by preferring what its language model finds
    likely, and the ranking loss learns how much that is worth (0 ignores it). A head saved
    without it loads with 0 and scores as before. The value head does not use it.
    """

    def __init__(self, hidden_size: int, likelihood: float = 1.0) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.linear.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.linear.bias)
        self.likelihood = nn.Parameter(torch.tensor(float(likelihood)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (..., H) -> (...)
        return self.linear(features).squeeze(-1)

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        state = {**self.linear.state_dict(), LIKELIHOOD: self.likelihood}
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
                  str(directory / SCORE_HEAD))  # fmt: skip

    @classmethod
    def load(cls, directory: Path, hidden_size: int) -> ScoreHead:
        from safetensors.torch import load_file

        state = load_file(str(directory / SCORE_HEAD))
        if tuple(state["weight"].shape) != (1, hidden_size):
            raise ValueError(
                f"score head in {directory} maps {tuple(state['weight'].shape)[1]} features, "
                f"the base model has hidden size {hidden_size}"
            )
        head = cls(hidden_size, likelihood=float(state.pop(LIKELIHOOD, torch.tensor(0.0))))
        head.linear.load_state_dict(state)
        return head


def last_token_features(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden state at each row's last attended position (left or right padding).

    hidden: (B, T, H); attention_mask: (B, T) -> (B, H)
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask.long() * positions).argmax(dim=-1)  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def reward_tokens(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[tuple[str, str]], max_length: int
) -> list[tuple[list[int], int]]:
    """Token ids the reward model reads for each (prompt, completion): prompt + completion +
    eos, truncated from the left, and the index of the first response token (at least 1, so
    eos is always scored). Two tokenizer calls for the whole list."""
    if not texts:
        return []
    full = tokenizer([p + c for p, c in texts], add_special_tokens=False)["input_ids"]
    prompts = list(dict.fromkeys(p for p, _ in texts))  # a ranking's completions share one
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    prompt_length = {p: len(ids) for p, ids in zip(prompts, encoded, strict=True)}
    eos = tokenizer.eos_token_id  # an attribute lookup that costs as much as the loop's body
    out = []
    for (prompt, _), ids in zip(texts, full, strict=True):
        ids = [*ids, eos]
        cut = max(0, len(ids) - max_length)
        out.append((ids[cut:], min(max(1, prompt_length[prompt] - cut), len(ids) - cut - 1)))
    return out


def response_loglik(
    model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    starts: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """Mean log-probability of each row's tokens from `starts[r]` on (right padding).

    hidden: (B, T, H) final post-norm states; input_ids, attention_mask: (B, T); starts: (B,)
    -> (B,). The LM head runs only from the earliest response token on, as one 2-D matmul.
    """
    first = int(starts.min())
    states = hidden[:, first - 1 : -1]  # (B, R, H), R = T - first
    rows, width = states.shape[:2]
    targets = input_ids[:, first:].reshape(-1)
    logp = token_logprobs(model, states.reshape(rows * width, -1), targets).view(rows, width)
    positions = torch.arange(first, input_ids.shape[1], device=input_ids.device)
    mask = (positions[None, :] >= starts[:, None]) & attention_mask[:, first:].bool()
    return (logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def token_logprobs(model: nn.Module, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) under the model's LM head from final states. (M, H), (M,) -> (M,)"""
    lm_head: nn.Module = model.get_output_embeddings()  # type: ignore[operator]
    return -F.cross_entropy(lm_head(states).float(), targets, reduction="none")


def score(
    model: nn.Module,
    head: ScoreHead,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    starts: torch.Tensor,
    **model_kwargs: Any,
) -> torch.Tensor:
    """Reward of each row: head(last hidden state) + head.likelihood * response_loglik.

    input_ids, attention_mask: (B, T), right-padded; starts: (B,) index of each row's first
    response token -> (B,). A small reward model cannot check an answer in its last hidden
    state alone; its language model's per-token likelihood of the answer reads every
    response position. On the demo policy's own samples the demo build's reward model orders
    right over wrong 96% of the time with it and 73% without (bench/reward_on_policy.py).
    The LM head runs on response positions only.
    """
    hidden = final_hidden(model, input_ids, attention_mask, **model_kwargs)
    loglik = response_loglik(model, hidden, input_ids, attention_mask, starts)
    return head(last_token_features(hidden, attention_mask)) + head.likelihood * loglik


def final_hidden(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, **model_kwargs: Any
) -> torch.Tensor:
    """Final (post-norm) hidden states of right-padded rows. (B, T) -> (B, T, H).

    Llama-shaped models with at most one active plain LoRA adapter take the lean forward
    (`lean_forward`, the same values with fewer ops); any other model, or extra model
    arguments (such as peft's per-row adapter names), take transformers' forward.
    """
    if not model_kwargs and bool((attention_mask.long().diff(dim=1) <= 0).all()):
        try:
            weights = lean_forward.read(model)
        except lean_forward.Unsupported:
            pass
        else:
            return lean_forward.final_hidden(weights, input_ids)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        output_hidden_states=True,
        logits_to_keep=1,
        **model_kwargs,
    )
    return out.hidden_states[-1]


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


def load_adapter_weights(peft_model: PeftModel, directory: str | Path, adapter_name: str) -> bool:
    """Copy a saved adapter's LoRA weights into `peft_model`'s adapter `adapter_name`.

    Returns False, loading nothing, when the saved adapter has another shape (rank, alpha,
    target modules or whole modules it trains): the caller then starts that adapter fresh.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = read_adapter_config(directory)
    current = peft_model.peft_config[adapter_name].to_dict()
    same = all(saved.get(k) == current.get(k) for k in ("r", "lora_alpha")) and all(
        set(saved.get(k) or ()) == set(current.get(k) or ())
        for k in ("target_modules", "modules_to_save")
    )
    if same:
        weights = load_file(str(Path(directory) / ADAPTER_WEIGHTS))
        set_peft_model_state_dict(peft_model, weights, adapter_name=adapter_name)
    return same
