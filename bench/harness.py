"""What the benchmarks and the tests share: free loopback ports, random LoRA adapters in the
served format, and `flywheel serve` in a subprocess."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FLYWHEEL = str(Path(sys.executable).parent / "flywheel")
START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_adapter(
    model_dir: Path,
    out_dir: Path,
    *,
    reward: bool = False,
    seed: int = 0,
    scale: float = 1.0,
    r: int = 4,
    dora: bool = False,
) -> Path:
    """A random LoRA adapter (and score head for a reward model) in the served format."""
    import torch
    from peft import LoraConfig, get_peft_model

    from flywheel_model import adapters, loading, scoring

    torch.manual_seed(seed)
    model, _ = loading.load_base(model_dir)
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
        use_dora=dora,
    )
    peft = get_peft_model(model, config, adapter_name="tmp")
    if scale != 1.0:
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.mul_(scale)
    head = scoring.ScoreHead(model.config.hidden_size) if reward else None
    return adapters.save_adapter(
        peft, "tmp", out_dir, head=head, base_model=loading.base_fingerprint(model_dir)
    )


def rss_bytes(pid: int) -> int:
    """A process's resident set now, from /proc (Linux)."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(match.group(1)) * 1024 if match else 0


def random_reward_model(model_dir: Path, out_dir: Path) -> Path:
    """A reward model (the learner's LoRA shape, r=4) with random, non-zero LoRA and a random
    score head, saved as the learner saves one: a stand-in where its scores need no meaning."""
    import torch

    from flywheel_learner.reward import RewardConfig, add_reward_adapter
    from flywheel_model import adapters, loading, scoring

    model, _ = loading.load_base(model_dir)
    torch.manual_seed(1)
    peft = add_reward_adapter(model, RewardConfig(r=4, alpha=8), "reward")
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    head = scoring.ScoreHead(model.config.hidden_size)
    return adapters.save_adapter(
        peft, "reward", out_dir, head=head, base_model=loading.base_fingerprint(model_dir)
    )


def weight_bytes(model: Any) -> int:
    """Bytes of a model's parameters, a tied embedding counted once."""
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    return sum(seen.values())


def held_bytes(models: Any, optimizer: Any) -> tuple[int, int]:
    """(base weights, trainable state): the bytes a PPO step cannot do without. The base counts
    a tied embedding once and no adapter; the trainable state is every optimised parameter in
    float32 with its gradient and AdamW's two moments, plus the frozen reward head."""
    lora = sum(p.numel() * p.element_size() for n, p in models.peft.named_parameters()
               if ".lora_" in n or "modules_to_save" in n)  # fmt: skip
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    train = sum(p.numel() * 4 * 4 for p in trainable)
    train += sum(p.numel() * 4 for p in models.reward_head.parameters())
    return weight_bytes(models.peft.get_base_model()) - lora, train


class ServerProcess:
    """`flywheel serve` in a subprocess, on free loopback ports."""

    def __init__(
        self,
        model: Path,
        data_dir: Path,
        *,
        env: dict[str, str] | None = None,
        args: list[str] = (),
        start_timeout_s: float = START_TIMEOUT_S,
        program: Sequence[str] = (FLYWHEEL,),
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.model = model
        self.tls = tls  # a server started with --tls-cert: how the readiness probe connects
        self.data_dir = data_dir
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.env = {**os.environ, **(env or {})}
        self.args = list(args)
        self.start_timeout_s = start_timeout_s
        self.program = list(program)  # what runs `serve ...` (a benchmark may wrap flywheel)
        self.proc: subprocess.Popen[str] | None = None
        self.log = data_dir / "server.log"

    @property
    def http(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def db_url(self) -> str:
        return f"sqlite:///{(self.data_dir / 'flywheel.db').resolve()}"

    def start(self) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            *self.program,
            "serve",
            "--model",
            str(self.model),
            "--data-dir",
            str(self.data_dir),
            "--http-port",
            str(self.http_port),
            "--grpc-port",
            str(self.grpc_port),
            *self.args,
        ]
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self.env, text=True
            )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(
                    f"{self.http}/readyz", timeout=1, context=self.tls
                ) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(
            f"server not ready in {self.start_timeout_s}s:\n{self.log.read_text()[-3000:]}"
        )

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def counts(self) -> dict[str, int]:
        """What the store holds, read directly (WAL lets a second reader in)."""
        from flywheel_server.store import Store

        store = Store.open(self.db_url)
        try:
            return store.counts()
        finally:
            store.close()

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the /metrics samples called `name` that carry these labels."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.http + "/metrics", timeout=30) as r:
            text = r.read().decode()
        return sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name and labels.items() <= s.labels.items()
        )

    def post(
        self, path: str, body: bytes | dict, headers: dict[str, str] | None = None
    ) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(
            self.http + path,
            data=data,
            headers={"content-type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")
