"""Publishing adapters exactly once across crashes.

The pending record (kind, local dir, sha256 of the packed archive) is checkpointed BEFORE the
upload. On restart the server's version list says whether that sha256 landed: if so the record
is simply cleared, otherwise the same directory is published again. A version is never
uploaded twice and never silently dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from flywheel_client import types as t
from flywheel_client.errors import FlywheelError, Unavailable
from flywheel_learner.checkpoint import LearnerState, PendingPublish, save_state
from flywheel_proto.archive import pack_directory, sha256

log = logging.getLogger("flywheel.learner")


class PublishClient(Protocol):
    """The part of `FlywheelClient` publishing needs (a fake in the unit tests)."""

    def versions(self, name: str = "") -> t.Versions: ...

    def publish_adapter(
        self,
        directory: str | Path,
        *,
        name: str,
        base_model: str,
        metrics: Mapping[str, float] | None = None,
        promote: bool = False,
        challenger: bool = False,
        chunk_size: int = 1 << 20,
    ) -> t.AdapterVersion: ...


def archive_sha256(directory: str | Path) -> str:
    """The sha256 the server records for this adapter directory (same packing as the upload)."""
    return sha256(pack_directory(directory))


def publish(
    client: PublishClient,
    work_dir: Path,
    state: LearnerState,
    pending: PendingPublish,
    base_model: str,
) -> tuple[LearnerState, t.AdapterVersion | None]:
    """Checkpoint `pending`, upload it, clear it. None when the server refused the adapter."""
    state = state.replace(pending=pending)
    save_state(work_dir, state)
    version = _upload(client, pending, base_model)
    state = state.replace(pending=None)
    save_state(work_dir, state)
    return state, version


def recover(
    client: PublishClient, work_dir: Path, state: LearnerState, base_model: str
) -> tuple[LearnerState, t.AdapterVersion | None]:
    """Finish a publish a crash interrupted: look the sha256 up first, upload only if absent."""
    pending = state.pending
    if pending is None:
        return state, None
    found = [v for v in client.versions(pending.kind).versions if v.sha256 == pending.sha256]
    if found:
        log.info("event=publish_recovered kind=%s version=%s", pending.kind, found[0].id)
        version: t.AdapterVersion | None = found[0]
    elif not Path(pending.directory).is_dir():
        log.warning(
            "event=publish_lost kind=%s dir=%s reason=directory_missing",
            pending.kind,
            pending.directory,
        )
        version = None
    else:
        version = _upload(client, pending, base_model)
    state = state.replace(pending=None)
    save_state(work_dir, state)
    return state, version


def _upload(
    client: PublishClient, pending: PendingPublish, base_model: str
) -> t.AdapterVersion | None:
    try:
        version = client.publish_adapter(
            pending.directory,
            name=pending.kind,
            base_model=base_model,
            metrics=pending.metrics,
            promote=pending.promote,
            challenger=pending.challenger,
        )
    except Unavailable:
        raise  # the record stays; the next start retries
    except FlywheelError as e:
        # The server checked the adapter and said no (smoke check, base mismatch): retrying
        # the same bytes would be refused again, so log it and move on.
        log.warning("event=publish_refused kind=%s reason=%r", pending.kind, e.message)
        return None
    log.info(
        "event=published kind=%s version=%s state=%s sha256=%s",
        pending.kind,
        version.id,
        version.state,
        version.sha256[:12],
    )
    return version
