"""The adapter upload format, part of the contract: a plain tar of a flat adapter directory.

Packing is deterministic (sorted names, zeroed times and owners), so the same directory always
has the same sha256. Unpacking refuses anything but regular files at the archive root.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

MAX_FILES = 64


def pack_directory(directory: str | Path) -> bytes:
    directory = Path(directory)
    files = sorted(p for p in directory.iterdir() if p.is_file())
    if not files:
        raise ValueError(f"{directory} holds no files to pack")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in files:
            data = path.read_bytes()
            info = tarfile.TarInfo(path.name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def unpack_archive(data: bytes, destination: str | Path) -> list[str]:
    """Extract into destination (which must exist); return the file names."""
    destination = Path(destination)
    names: list[str] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members = tar.getmembers()
            if len(members) > MAX_FILES:
                raise ValueError(f"archive holds {len(members)} entries; at most {MAX_FILES}")
            for m in members:
                if not m.isfile() or "/" in m.name or m.name in ("", ".", ".."):
                    raise ValueError(f"archive entry {m.name!r} is not a plain file at the root")
                source = tar.extractfile(m)
                assert source is not None
                (destination / m.name).write_bytes(source.read())
                names.append(m.name)
    except tarfile.TarError as e:
        raise ValueError(f"adapter archive is not a readable tar: {e}") from e
    return names
