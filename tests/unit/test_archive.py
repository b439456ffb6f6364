"""The adapter upload format: deterministic packing, round trips, and what unpacking refuses."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from flywheel_proto.archive import MAX_FILES, pack_directory, sha256, unpack_archive

pytestmark = pytest.mark.unit

FILES = {
    "adapter_config.json": b'{"peft_type": "LORA", "r": 4}',
    "adapter_model.safetensors": bytes(range(256)) * 40,
    "README.md": b"# adapter\n",
    "empty.txt": b"",
}


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    d = tmp_path / "adapter"
    d.mkdir()
    for name, data in FILES.items():
        (d / name).write_bytes(data)
    return d


def tar_of(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def regular(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def test_sha256_is_the_hex_digest() -> None:
    assert sha256(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_pack_is_deterministic_and_ignores_mtimes(adapter_dir: Path) -> None:
    first = pack_directory(adapter_dir)
    assert pack_directory(adapter_dir) == first
    # Change every file's mtime (and atime): the bytes, hence the sha256, stay the same.
    for f in adapter_dir.iterdir():
        os.utime(f, (1_000_000_000, 1_000_000_000))
    assert pack_directory(adapter_dir) == first
    (adapter_dir / "README.md").touch()
    assert sha256(pack_directory(adapter_dir)) == sha256(first) == hashlib.sha256(first).hexdigest()


def test_pack_does_not_depend_on_the_directory_name_or_creation_order(
    adapter_dir: Path, tmp_path: Path
) -> None:
    other = tmp_path / "elsewhere"
    other.mkdir()
    for name in reversed(list(FILES)):
        (other / name).write_bytes(FILES[name])
    assert pack_directory(other) == pack_directory(adapter_dir)


def test_pack_changes_when_content_changes(adapter_dir: Path) -> None:
    before = pack_directory(adapter_dir)
    (adapter_dir / "README.md").write_bytes(b"# adapter!\n")
    assert pack_directory(adapter_dir) != before


def test_packed_members_are_sorted_plain_files_with_zeroed_metadata(adapter_dir: Path) -> None:
    (adapter_dir / "subdir").mkdir()  # directories are skipped
    (adapter_dir / "subdir" / "nested.bin").write_bytes(b"nested")
    with tarfile.open(fileobj=io.BytesIO(pack_directory(adapter_dir)), mode="r:") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(FILES)
    for m in members:
        assert m.isfile()
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
        assert m.size == len(FILES[m.name])


def test_pack_refuses_an_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"holds no files to pack$"):
        pack_directory(tmp_path)


def test_round_trip(adapter_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    names = unpack_archive(pack_directory(adapter_dir), out)
    assert names == sorted(FILES)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == FILES


def test_unpack_accepts_a_plain_tar_made_elsewhere(tmp_path: Path) -> None:
    data = tar_of(regular("b.txt", b"bee"), regular("a.txt", b"ay"))
    assert unpack_archive(data, tmp_path) == ["b.txt", "a.txt"]
    assert (tmp_path / "a.txt").read_bytes() == b"ay"
    assert (tmp_path / "b.txt").read_bytes() == b"bee"


@pytest.mark.parametrize("name", ["sub/file", "../evil", "/etc/evil", "./file", "..", "a/../../b"])
def test_unpack_refuses_names_outside_the_root(tmp_path: Path, name: str) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ValueError, match=r"is not a plain file at the root$") as info:
        unpack_archive(tar_of(regular(name)), dest)
    assert str(info.value) == f"archive entry {name!r} is not a plain file at the root"
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "evil").exists()


def test_unpack_refuses_a_symlink(tmp_path: Path) -> None:
    link = tarfile.TarInfo("adapter_model.safetensors")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    with pytest.raises(ValueError) as info:
        unpack_archive(tar_of((link, None)), tmp_path)
    assert (
        str(info.value)
        == "archive entry 'adapter_model.safetensors' is not a plain file at the root"
    )
    assert list(tmp_path.iterdir()) == []


def test_unpack_refuses_a_hard_link(tmp_path: Path) -> None:
    link = tarfile.TarInfo("b")
    link.type = tarfile.LNKTYPE
    link.linkname = "a"
    with pytest.raises(ValueError, match="archive entry 'b' is not a plain file at the root"):
        unpack_archive(tar_of(regular("a"), (link, None)), tmp_path)


def test_unpack_refuses_a_directory(tmp_path: Path) -> None:
    d = tarfile.TarInfo("weights")
    d.type = tarfile.DIRTYPE
    with pytest.raises(ValueError, match="archive entry 'weights' is not a plain file at the root"):
        unpack_archive(tar_of((d, None)), tmp_path)
    assert not (tmp_path / "weights").exists()


@pytest.mark.parametrize("data", [b"", b"not a tar at all", b"\x01" * 1024])
def test_unpack_refuses_bytes_that_are_not_a_tar(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(ValueError, match=r"^adapter archive is not a readable tar: ") as info:
        unpack_archive(data, tmp_path)
    assert isinstance(info.value.__cause__, tarfile.TarError)


def test_unpack_refuses_a_compressed_tar(adapter_dir: Path, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(adapter_dir / "README.md", arcname="README.md")
    with pytest.raises(ValueError, match=r"^adapter archive is not a readable tar: "):
        unpack_archive(buffer.getvalue(), tmp_path)


def test_unpack_refuses_an_archive_truncated_inside_a_file(
    adapter_dir: Path, tmp_path: Path
) -> None:
    # Members in order: README.md, adapter_config.json, adapter_model.safetensors (10240 bytes of
    # data from offset 2560), empty.txt; cutting at 5000 ends the archive inside the weights.
    data = pack_directory(adapter_dir)
    with pytest.raises(
        ValueError, match=r"^adapter archive is not a readable tar: unexpected end of data"
    ):
        unpack_archive(data[:5000], tmp_path)


def test_unpack_refuses_too_many_entries(tmp_path: Path) -> None:
    data = tar_of(*(regular(f"f{i}") for i in range(MAX_FILES + 1)))
    with pytest.raises(ValueError) as info:
        unpack_archive(data, tmp_path)
    assert str(info.value) == f"archive holds {MAX_FILES + 1} entries; at most {MAX_FILES}"
    assert list(tmp_path.iterdir()) == []
    # Exactly MAX_FILES is fine.
    assert (
        len(unpack_archive(tar_of(*(regular(f"f{i}") for i in range(MAX_FILES))), tmp_path))
        == MAX_FILES
    )
