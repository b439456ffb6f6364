"""A PEFT adapter directory as the upload `PublishAdapter` takes: header, then archive bytes.

The archive format itself (a deterministic plain tar, files at the root) is part of the
contract and lives in `flywheel_proto.archive`, so client and server cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from flywheel_proto.archive import pack_directory, sha256
from flywheel_proto.v1 import flywheel_pb2 as pb


@dataclass(frozen=True)
class AdapterArchive:
    data: bytes
    sha256: str

    @property
    def size(self) -> int:
        return len(self.data)


def pack_adapter(directory: str | Path) -> AdapterArchive:
    """The files of a flat adapter directory (adapter_config.json, adapter_model.safetensors,
    and score_head.safetensors for a reward adapter)."""
    root = Path(directory)
    if not root.is_dir():
        raise NotADirectoryError(
            f"adapter directory {str(root)!r} does not exist or is not a directory"
        )
    data = pack_directory(root)
    return AdapterArchive(data=data, sha256=sha256(data))


def upload_chunks(
    archive: AdapterArchive,
    *,
    name: str,
    base_model: str,
    metrics: Mapping[str, float] | None = None,
    promote: bool = False,
    challenger: bool = False,
    chunk_size: int = 1 << 20,
) -> Iterator[pb.AdapterChunk]:
    """The header, then the archive's bytes in pieces of at most `chunk_size`.

    Checked here, not lazily: gRPC consumes the iterator on its own thread, where an error
    would surface only as a cancelled call.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    header = pb.AdapterHeader(
        name=name,
        base_model=base_model,
        sha256=archive.sha256,
        size=archive.size,
        metrics=dict(metrics or {}),
        promote=promote,
        challenger=challenger,
    )
    return _chunks(header, archive.data, chunk_size)


def _chunks(header: pb.AdapterHeader, data: bytes, chunk_size: int) -> Iterator[pb.AdapterChunk]:
    yield pb.AdapterChunk(header=header)
    view = memoryview(data)
    for start in range(0, len(data), chunk_size):
        yield pb.AdapterChunk(data=bytes(view[start : start + chunk_size]))
