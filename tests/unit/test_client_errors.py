"""Client-side mapping tables, ranking arguments and the adapter archive."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import grpc
import pytest

from flywheel_client import errors as e
from flywheel_client.adapter_archive import pack_adapter, upload_chunks
from flywheel_client.ranking import as_tiers, parse_tiers
from flywheel_proto.archive import unpack_archive

pytestmark = pytest.mark.unit


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple = ()) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return self._trailing


GRPC_CASES = [
    (grpc.StatusCode.INVALID_ARGUMENT, e.InvalidArgument),
    (grpc.StatusCode.OUT_OF_RANGE, e.InvalidArgument),
    (grpc.StatusCode.NOT_FOUND, e.NotFound),
    (grpc.StatusCode.FAILED_PRECONDITION, e.Conflict),
    (grpc.StatusCode.ALREADY_EXISTS, e.Conflict),
    (grpc.StatusCode.ABORTED, e.Conflict),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, e.Overloaded),
    (grpc.StatusCode.UNAUTHENTICATED, e.Unauthenticated),
    (grpc.StatusCode.PERMISSION_DENIED, e.PermissionDenied),
    (grpc.StatusCode.UNAVAILABLE, e.Unavailable),
    (grpc.StatusCode.DEADLINE_EXCEEDED, e.Unavailable),
    (grpc.StatusCode.INTERNAL, e.FlywheelError),
    (grpc.StatusCode.UNKNOWN, e.FlywheelError),
    (grpc.StatusCode.UNIMPLEMENTED, e.FlywheelError),
]


@pytest.mark.parametrize(("code", "cls"), GRPC_CASES, ids=[c.name for c, _ in GRPC_CASES])
def test_grpc_code_maps_to_class(code: grpc.StatusCode, cls: type[e.FlywheelError]) -> None:
    error = e.from_grpc_error(FakeRpcError(code, "what went wrong"))
    assert type(error) is cls
    assert error.message == "what went wrong"
    assert error.code == code.name
    assert error.status is None


def test_every_grpc_table_entry_is_tested() -> None:
    assert set(e.GRPC_ERRORS) <= {code for code, _ in GRPC_CASES}


def test_grpc_error_carries_field_from_trailing_metadata() -> None:
    error = e.from_grpc_error(
        FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad", (("field", "sampling.top_p"),))
    )
    assert error.field == "sampling.top_p"


def test_overloaded_errors_carry_the_servers_retry_after() -> None:
    trailing = (("retry-after", "2.500"),)
    error = e.from_grpc_error(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow", trailing))
    assert type(error) is e.Overloaded and error.retry_after == 2.5
    http = e.from_http_error(429, b"{}", {"retry-after": "3"})
    assert type(http) is e.Overloaded and http.retry_after == 3.0
    for odd in ("soon", "-1", "nan", "Wed, 21 Oct 2026 07:28:00 GMT"):  # ignored, not raised
        assert e.from_http_error(429, b"{}", {"retry-after": odd}).retry_after is None
    assert e.from_http_error(429, b"{}").retry_after is None


def test_grpc_error_without_details_uses_the_code_name() -> None:
    error = e.from_grpc_error(FakeRpcError(grpc.StatusCode.NOT_FOUND, ""))
    assert error.message == "NOT_FOUND"


HTTP_CASES = [
    (400, e.InvalidArgument),
    (401, e.Unauthenticated),
    (403, e.PermissionDenied),
    (404, e.NotFound),
    (409, e.Conflict),
    (413, e.InvalidArgument),
    (422, e.InvalidArgument),
    (429, e.Overloaded),
    (502, e.Unavailable),
    (503, e.Unavailable),
    (504, e.Unavailable),
    (500, e.FlywheelError),
    (418, e.FlywheelError),
]


@pytest.mark.parametrize(("status", "cls"), HTTP_CASES)
def test_http_status_maps_to_class(status: int, cls: type[e.FlywheelError]) -> None:
    body = {
        "error": {
            "message": "n must be between 1 and 16, got 0",
            "type": "x",
            "param": "n",
            "code": None,
        }
    }
    error = e.from_http_error(status, body)
    assert type(error) is cls
    assert error.status == status
    assert error.message == "n must be between 1 and 16, got 0"
    assert error.field == "n"
    assert error.code is None


def test_every_http_table_entry_is_tested() -> None:
    assert set(e.HTTP_ERRORS) <= {status for status, _ in HTTP_CASES}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"error": {"message": "no such id", "param": "ranking"}}', "no such id"),
        ('{"detail": "Not Found"}', "Not Found"),
        (b"plain text failure", "plain text failure"),
        (b"", "HTTP 404"),
        (None, "HTTP 404"),
    ],
)
def test_http_error_body_shapes(body: object, message: str) -> None:
    error = e.from_http_error(404, body)
    assert isinstance(error, e.NotFound)
    assert error.message == message


@pytest.mark.parametrize(("kind", "cls"), sorted(e.HTTP_ERROR_TYPES.items()))
def test_stream_error_event_maps_by_type(kind: str, cls: type[e.FlywheelError]) -> None:
    error = e.from_http_error(None, {"error": {"message": "policy-v9 was unloaded", "type": kind}})
    assert type(error) is cls
    assert (error.message, error.status) == ("policy-v9 was unloaded", None)


def test_stream_error_event_prefers_its_status_code() -> None:
    body = {"error": {"message": "full", "type": "invalid_request_error", "code": 429}}
    error = e.from_http_error(None, body)
    assert type(error) is e.Overloaded
    assert error.status == 429


def test_stream_error_event_of_unknown_type_is_the_base_class() -> None:
    error = e.from_http_error(None, {"error": {"message": "boom", "type": "Exploded"}})
    assert type(error) is e.FlywheelError


def test_all_errors_share_the_base_class() -> None:
    for cls in {*e.GRPC_ERRORS.values(), *e.HTTP_ERRORS.values(), *e.HTTP_ERROR_TYPES.values()}:
        assert issubclass(cls, e.FlywheelError)


# -- ranking arguments -------------------------------------------------------------------------


def test_as_tiers_plain_ids_and_nested_ties() -> None:
    assert as_tiers(["a", ["b", "c"], ("d",)]) == (("a",), ("b", "c"), ("d",))


@pytest.mark.parametrize("bad", ["abc", ["a", []], ["a", ""], ["a", [1]]])
def test_as_tiers_rejects_malformed(bad: object) -> None:
    with pytest.raises(e.InvalidArgument) as info:
        as_tiers(bad)  # type: ignore[arg-type]
    assert info.value.field == "ranking"


def test_parse_tiers_joins_ties_with_equals() -> None:
    assert parse_tiers(["a", "b=c", "d=e=f"]) == (("a",), ("b", "c"), ("d", "e", "f"))


@pytest.mark.parametrize("bad", ["a=", "=a", "a==b", ""])
def test_parse_tiers_rejects_empty_ids(bad: str) -> None:
    with pytest.raises(e.InvalidArgument, match="empty completion id"):
        parse_tiers(["x", bad])


# -- adapter archive ---------------------------------------------------------------------------


def _adapter(directory: Path, weights: bytes) -> Path:
    directory.mkdir()
    (directory / "adapter_model.safetensors").write_bytes(weights)
    (directory / "adapter_config.json").write_text('{"r": 4}')
    (directory / "score_head.safetensors").write_bytes(b"\x00" * 10)
    return directory


def test_archive_is_deterministic_and_checksummed(tmp_path: Path) -> None:
    weights = bytes(range(256)) * 40
    first = pack_adapter(_adapter(tmp_path / "one", weights))
    # Same content written in another order, at another time, under another name.
    second_dir = tmp_path / "two"
    second_dir.mkdir()
    (second_dir / "score_head.safetensors").write_bytes(b"\x00" * 10)
    (second_dir / "adapter_config.json").write_text('{"r": 4}')
    (second_dir / "adapter_model.safetensors").write_bytes(weights)
    second = pack_adapter(second_dir)

    assert first.data == second.data
    assert first.sha256 == hashlib.sha256(first.data).hexdigest() == second.sha256
    assert first.size == len(first.data)


def test_archive_holds_files_at_root_in_sorted_order(tmp_path: Path) -> None:
    archive = pack_adapter(_adapter(tmp_path / "adapter", b"weights"))
    with tarfile.open(fileobj=io.BytesIO(archive.data), mode="r:") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [
            "adapter_config.json",
            "adapter_model.safetensors",
            "score_head.safetensors",
        ]
        assert all(m.isfile() and m.mtime == 0 and m.uid == 0 for m in members)
        extracted = tar.extractfile("adapter_model.safetensors")
        assert extracted is not None and extracted.read() == b"weights"


def test_archive_unpacks_with_the_contracts_unpacker(tmp_path: Path) -> None:
    source = _adapter(tmp_path / "adapter", b"weights")
    archive = pack_adapter(source)
    destination = tmp_path / "unpacked"
    destination.mkdir()
    names = unpack_archive(archive.data, destination)
    assert sorted(names) == sorted(p.name for p in source.iterdir())
    for name in names:
        assert (destination / name).read_bytes() == (source / name).read_bytes()


def test_archive_of_an_empty_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no files"):
        pack_adapter(tmp_path / "empty")


def test_archive_of_a_missing_directory_says_so(tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError, match="does not exist"):
        pack_adapter(tmp_path / "missing")


def test_upload_chunks_header_first_then_all_bytes(tmp_path: Path) -> None:
    archive = pack_adapter(_adapter(tmp_path / "adapter", b"w" * 5000))
    chunks = list(
        upload_chunks(archive, name="policy", base_model="fp", metrics={"kl": 0.5}, chunk_size=1000)
    )
    header = chunks[0].header
    assert chunks[0].WhichOneof("part") == "header"
    assert (header.name, header.base_model, header.sha256, header.size) == (
        "policy",
        "fp",
        archive.sha256,
        archive.size,
    )
    assert dict(header.metrics) == {"kl": 0.5}
    assert all(c.WhichOneof("part") == "data" and len(c.data) <= 1000 for c in chunks[1:])
    assert len(chunks) - 1 == -(-archive.size // 1000)
    assert b"".join(c.data for c in chunks[1:]) == archive.data


def test_upload_chunks_checks_chunk_size_eagerly(tmp_path: Path) -> None:
    archive = pack_adapter(_adapter(tmp_path / "adapter", b"w"))
    with pytest.raises(ValueError, match="chunk_size"):
        upload_chunks(archive, name="policy", base_model="fp", chunk_size=0)


def test_binary_trailing_metadata_is_left_alone() -> None:
    """Proxies and rich-status servers add -bin entries; only the keys read are decoded."""
    trailing = (("grpc-status-details-bin", b"\x08\xff\xfe"), ("field", b"top_p"))
    error = e.from_grpc_error(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad", trailing))
    assert type(error) is e.InvalidArgument and error.field == "top_p"
