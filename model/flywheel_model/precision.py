"""Where the learner's base weights live and in what precision (`--device`, `--dtype`).

The frozen base is stored in `dtype`; what trains (LoRA matrices, score and value heads) and
the optimiser state stay float32: peft keeps adapter weights in float32 over a half-precision
base, and heads are built in float32. Forwards run under autocast, which casts each matmul's
inputs to `dtype`, so float32 adapters and heads meet half-precision activations without a
dtype error; losses take `.float()` logits and reduce in float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_HELP = "auto (CUDA when present), cpu, or cuda[:N]"
DTYPE_HELP = "auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16"


@dataclass(frozen=True)
class Precision:
    device: str = "cpu"
    dtype: torch.dtype = torch.float32

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Mixed precision for a forward, or nothing at float32."""
        if self.dtype == torch.float32:
            yield
            return
        with torch.autocast(torch.device(self.device).type, dtype=self.dtype):
            yield


FLOAT32_CPU = Precision()


def check_names(device: str, dtype: str) -> None:
    """ValueError naming the flag when `device` or `dtype` is not one this accepts."""
    if device not in ("auto", "cpu") and not (
        device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())
    ):
        raise ValueError(f"device must be {DEVICE_HELP}; got {device!r}")
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype must be {DTYPE_HELP}; got {dtype!r}")


def resolve(device: str = "auto", dtype: str = "auto") -> Precision:
    """`auto` made concrete on this machine; a CUDA device that is not there is an error."""
    check_names(device, dtype)
    cuda = torch.cuda.is_available()
    if device == "auto":
        device = "cuda" if cuda else "cpu"
    elif device.startswith("cuda") and not cuda:
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device here")
    if dtype == "auto":
        return Precision(device, torch.bfloat16 if device.startswith("cuda") else torch.float32)
    return Precision(device, DTYPES[dtype])
