"""Peak memory of this process, for the learner's and the engine's metrics."""

from __future__ import annotations

import resource

import torch


def peak_bytes(device: str) -> int:
    """On CUDA, the most bytes torch ever held allocated on `device`; elsewhere, the process's
    peak resident set (Linux reports it in KiB)."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(torch.device(device)))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
