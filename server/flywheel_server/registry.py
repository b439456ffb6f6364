"""Which adapter versions are loaded, and which one each alias ("policy", "reward") points to.

Versions are addressed by id ("policy-v3"). "policy-v0" is the bare base model: always there,
live until a policy adapter is promoted. The registry resolves names and counts the requests
running on each version (`acquire` on admission, `release` at the end), so a retired version is
unloaded when its count reaches zero (`idle`), not by polling. Loading is the engine's job and
persistence the store's.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace

from flywheel_server.domain import ADAPTER_NAMES, AdapterVersion
from flywheel_server.errors import AdapterNotFound, Conflict, InvalidRequest

ID_PATTERN = re.compile(r"^(policy|reward)(?:-v(\d+))?$")


def parse_id(text: str, *, field: str) -> tuple[str, int | None]:
    """'policy' -> ('policy', None); 'reward-v2' -> ('reward', 2)."""
    m = ID_PATTERN.match(text)
    if not m:
        raise AdapterNotFound(
            f"{field} {text!r} is not a model id: use 'policy', 'reward' or a version such as "
            "'policy-v3' (GET /v1/policies lists them)",
            field=field,
        )
    return m.group(1), (int(m.group(2)) if m.group(2) is not None else None)


class AdapterRegistry:
    def __init__(self, base_model: str) -> None:
        self.base = AdapterVersion("policy", 0, "ready", "", "", base_model)
        self._loaded: dict[str, AdapterVersion] = {}
        self._live: dict[str, str] = {}
        self._users: Counter[str] = Counter()  # requests running on each version
        self._idle: dict[str, asyncio.Event] = {}  # set when a version's count reaches zero

    # -- requests running on a version ----------------------------------------------------

    def acquire(self, adapter_ids: Iterable[str | None]) -> None:
        """A request admitted on these versions (None: the base, never unloaded)."""
        for adapter_id in adapter_ids:
            if adapter_id is not None:
                self._users[adapter_id] += 1

    def release(self, adapter_ids: Iterable[str | None]) -> None:
        """That request finished (or failed, or was dropped)."""
        for adapter_id in adapter_ids:
            if adapter_id is None:
                continue
            self._users[adapter_id] -= 1
            if self._users[adapter_id] <= 0:
                del self._users[adapter_id]
                if adapter_id in self._idle:
                    self._idle.pop(adapter_id).set()

    def in_use(self, adapter_id: str) -> int:
        return self._users[adapter_id]

    async def idle(self, adapter_id: str) -> None:
        """Return once no request runs on the version."""
        if self._users[adapter_id]:
            await self._idle.setdefault(adapter_id, asyncio.Event()).wait()

    # -- versions and aliases -------------------------------------------------------------

    def add(self, version: AdapterVersion) -> None:
        self._loaded[version.id] = version

    def remove(self, adapter_id: str) -> None:
        self._loaded.pop(adapter_id, None)
        for name, live in list(self._live.items()):
            if live == adapter_id:
                del self._live[name]

    def set_live(self, version: AdapterVersion) -> None:
        self._loaded[version.id] = version
        self._live[version.name] = version.id

    def refresh(self, name: str, stored: list[AdapterVersion]) -> None:
        """Take states from the store (the source of truth) for the loaded versions of name."""
        self._live.pop(name, None)
        for v in stored:
            if v.id in self._loaded:
                self._loaded[v.id] = v
                if v.state == "live":
                    self._live[name] = v.id

    def live(self) -> dict[str, str]:
        return {"policy": self._live.get("policy", self.base.id)} | (
            {"reward": self._live["reward"]} if "reward" in self._live else {}
        )

    def versions(self, name: str = "") -> list[AdapterVersion]:
        if name and name not in ADAPTER_NAMES:
            raise InvalidRequest(
                f"name must be one of {', '.join(ADAPTER_NAMES)}, got {name[:80]!r}", field="name"
            )
        everything = [self._shown(v) for v in (self.base, *self._loaded.values())]
        everything.sort(key=lambda v: (v.name, v.version))
        return [v for v in everything if not name or v.name == name]

    def _shown(self, v: AdapterVersion) -> AdapterVersion:
        """The alias decides what is live; a version it moved away from shows as retired."""
        if self.live().get(v.name) == v.id:
            return replace(v, state="live")
        return replace(v, state="retired") if v.state == "live" else v

    def resolve(self, requested: str, *, kind: str, field: str) -> tuple[str, str | None]:
        """(version id, engine adapter id or None for the base) for a request's model field."""
        name, version = parse_id(requested or kind, field=field)
        if name != kind:
            raise InvalidRequest(
                f"{field} must name a {kind} model, got {requested!r}", field=field
            )
        if version is None:
            adapter_id = self.live().get(kind)
            if adapter_id is None:
                raise Conflict(
                    f"no {kind} model is live yet; the learner publishes one after its first refit",
                    field=field,
                )
        else:
            adapter_id = f"{kind}-v{version}"
        if adapter_id == self.base.id:
            return adapter_id, None
        if adapter_id not in self._loaded:
            known = ", ".join(v.id for v in self.versions(kind))
            raise AdapterNotFound(
                f"{field} {adapter_id!r} is not loaded; available: {known}", field=field
            )
        return adapter_id, adapter_id
