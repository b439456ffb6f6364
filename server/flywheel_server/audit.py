"""The audit trail: who published, promoted, rolled back or challenged what, and when (issue 18).

Each admin action is recorded with the name of the API key that asked for it (`auth.CALLER`,
set by both transports once the key is checked; "server" for the server's own actions at start,
"challenge" for a challenge that decided itself), right after the change commits: a crash in
between loses that record, never the change. Requests refused for their key (unknown key,
missing scope, over its rate, another labeler's name) are tallied by `auth.Authenticator` and
written here as one record per key and reason each `flush`, so a flood of refusals costs the
store a row a second, not a row a request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from flywheel_server import auth
from flywheel_server.domain import AuditEntry
from flywheel_server.store.store import Store

log = logging.getLogger("flywheel.audit")

Refusals = Mapping[tuple[str, str], int]  # (key name, error class) -> requests refused


class AuditTrail:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.refusals: Callable[[], Refusals] = dict  # the app points it at the authenticator

    async def record(self, action: str, target: str, detail: str = "", actor: str = "") -> None:
        """Best effort: the change it records has committed, so a failure here is logged, never
        raised (a caller told to retry would publish or roll back a second time)."""
        entry = AuditEntry(actor or auth.CALLER.get(), action, target, detail)
        try:
            await asyncio.to_thread(self.store.add_audit, [entry])
        except Exception:
            log.exception("audit record lost: %s", entry)

    async def flush(self) -> None:
        """Write the refusals tallied since the last flush."""
        entries = [
            AuditEntry(key, "key_rejected", reason, f"{count} requests")
            for (key, reason), count in sorted(self.refusals().items())
        ]
        if entries:
            await asyncio.to_thread(self.store.add_audit, entries)

    async def export(self, after: int, limit: int) -> list[AuditEntry]:
        await self.flush()
        return await asyncio.to_thread(self.store.export_audit, after, limit)

    async def run(self, interval: float = 1.0) -> None:
        """Flush every `interval` seconds until cancelled; a failed flush is logged, retried."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.flush()
            except Exception:  # the store is away: the tally is lost, the server keeps serving
                log.exception("audit flush failed")
