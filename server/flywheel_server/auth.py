"""API keys with scopes, from a JSON file and/or the FLYWHEEL_API_KEYS variable.

File: {"keys": [{"name": "app", "key": "…", "scopes": ["generate", "feedback"]}]}
Variable: "KEY1=generate+feedback,KEY2=admin". The admin scope implies the other two.
With no keys at all, auth is off and the server refuses to bind anything but loopback.

A key in the file may carry a request limit, "rate_per_s" (and "burst", default a second's
worth): past it, its requests get 429 with Retry-After before their body is read (`limits`);
and a token budget, "tokens_per_min": each generation or comparison spends n x max_tokens of
it, once its body is checked and before any work.

With auth on, a key's name is the labeler its rankings and demonstrations are recorded under: a
body that names another labeler is refused, unless the key says "sub_labelers": true (a
labeling team's shared key), whose labeler "alice" is recorded as "team/alice".
"""

from __future__ import annotations

import hmac
import json
import time
from collections import Counter
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from flywheel_server.errors import PermissionDenied, RateLimited, Unauthenticated
from flywheel_server.limits import Limit, TokenBucket

SCOPES = ("generate", "feedback", "admin")

# The name of the key the current request came with, set by both transports after `check`; the
# audit trail records it. "server" outside a request (start-up, the store follower).
CALLER: ContextVar[str] = ContextVar("flywheel_caller", default="server")


@dataclass(frozen=True)
class ApiKey:
    name: str
    key: str
    scopes: frozenset[str]
    limit: Limit | None = None  # None: only the server's global admission queue bounds it
    sub_labelers: bool = False  # may record feedback as "<name>/<labeler>"
    tokens: Limit | None = None  # tokens it may ask to generate: per second, and at once


def _scopes(raw: object, where: str) -> frozenset[str]:
    scopes = frozenset(raw) if isinstance(raw, list | tuple) else frozenset()
    bad = scopes - set(SCOPES)
    if not scopes or bad:
        raise ValueError(
            f"{where}: scopes must be a non-empty list of {', '.join(SCOPES)}; got {raw!r}"
        )
    return scopes


def parse_env(value: str) -> list[ApiKey]:
    keys = []
    for i, item in enumerate(filter(None, (p.strip() for p in value.split(",")))):
        key, sep, scopes = item.partition("=")
        if not sep or not key:
            raise ValueError(f"FLYWHEEL_API_KEYS entry {i + 1} must look like KEY=scope+scope")
        keys.append(
            ApiKey(
                f"env-{i + 1}", key, _scopes(scopes.split("+"), f"FLYWHEEL_API_KEYS entry {i + 1}")
            )
        )
    return keys


def parse_file(path: Path) -> list[ApiKey]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read API keys from {path}: {e}") from e
    entries = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f'{path} must hold {{"keys": [{{"name", "key", "scopes"}}, ...]}}')
    keys = []
    for i, entry in enumerate(entries):
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("key"), str)
            or len(entry["key"]) < 8
        ):
            raise ValueError(f"{path}: keys[{i}].key must be a string of at least 8 characters")
        keys.append(
            ApiKey(
                str(entry.get("name", f"key-{i}")),
                entry["key"],
                _scopes(entry.get("scopes"), f"{path}: keys[{i}]"),
                _limit(entry, f"{path}: keys[{i}]"),
                _flag(entry, "sub_labelers", f"{path}: keys[{i}]"),
                _token_budget(entry, f"{path}: keys[{i}]"),
            )
        )
    return keys


def _flag(entry: Mapping[str, object], name: str, where: str) -> bool:
    value = entry.get(name, False)
    if not isinstance(value, bool):
        raise ValueError(f"{where}: {name} must be true or false, got {value!r}")
    return value


def _token_budget(entry: Mapping[str, object], where: str) -> Limit | None:
    per_min = entry.get("tokens_per_min")
    if per_min is None:
        return None
    if isinstance(per_min, bool) or not isinstance(per_min, int) or per_min < 1:
        raise ValueError(f"{where}: tokens_per_min must be a whole number >= 1, got {per_min!r}")
    return Limit(per_min / 60, per_min)  # a minute's worth at once


def _limit(entry: Mapping[str, object], where: str) -> Limit | None:
    rate, burst = entry.get("rate_per_s"), entry.get("burst")
    if rate is None:
        if burst is not None:
            raise ValueError(f"{where}: burst needs rate_per_s")
        return None
    if isinstance(rate, bool) or not isinstance(rate, int | float):
        raise ValueError(f"{where}: rate_per_s must be a number of requests per second")
    if burst is not None and (isinstance(burst, bool) or not isinstance(burst, int)):
        raise ValueError(f"{where}: burst must be a whole number of requests")
    try:
        return Limit.default_burst(rate) if burst is None else Limit(rate, burst)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


class Authenticator:
    def __init__(self, keys: list[ApiKey], clock: Callable[[], float] = time.monotonic) -> None:
        names = [k.name for k in keys]
        if len(set(names)) != len(names):
            raise ValueError(f"API key names must be unique (limits go by name); got {names}")
        if any("/" in name for name in names):  # "team/alice" is a sub-labeler's name
            raise ValueError(f"API key names may not contain '/'; got {names}")
        self.keys = keys
        self._by_name = {k.name: k for k in keys}
        self._refused: Counter[tuple[str, str]] = Counter()  # drained by the audit trail
        self._buckets = {k.name: TokenBucket(k.limit, clock) for k in keys if k.limit}
        self._budgets = {k.name: TokenBucket(k.tokens, clock) for k in keys if k.tokens}

    @classmethod
    def load(cls, path: Path | None, environ: Mapping[str, str]) -> Authenticator:
        keys = parse_file(path) if path else []
        keys += parse_env(environ.get("FLYWHEEL_API_KEYS", ""))
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def drain_refusals(self) -> dict[tuple[str, str], int]:
        """Requests refused for their key since the last call, by (key name, error class)."""
        refused, self._refused = dict(self._refused), Counter()
        return refused

    def check(self, authorization: str | None, scope: str) -> str:
        """Name of the caller, also set as CALLER; raises Unauthenticated, PermissionDenied or
        RateLimited, and tallies the refusal."""
        try:
            name = self._check(authorization, scope)
        except (Unauthenticated, PermissionDenied, RateLimited) as e:
            self._refused[(e.key or "(no key)", type(e).__name__)] += 1
            raise
        CALLER.set(name)
        return name

    def _check(self, authorization: str | None, scope: str) -> str:
        if not self.enabled:
            return "anonymous"
        scheme, _, rest = (authorization or "").strip().partition(" ")
        token = (
            rest.strip() if scheme.lower() == "bearer" else scheme
        )  # "Bearer <key>" or the bare key
        if not token:
            raise Unauthenticated("missing API key: send 'authorization: Bearer <key>'")
        for k in self.keys:
            if hmac.compare_digest(k.key.encode(), token.encode()):
                if scope not in k.scopes and "admin" not in k.scopes:
                    raise PermissionDenied(
                        f"API key {k.name!r} lacks the {scope!r} scope", key=k.name
                    )
                self._limit(k)
                return k.name
        raise Unauthenticated("unknown API key", key="(unknown key)")

    def labeler(self, caller: str, requested: str) -> str:
        """The labeler feedback from `caller` (a name `check` returned) is recorded under."""
        key = self._by_name.get(caller)
        if key is None:  # auth is off: the body names its labeler
            return requested
        if not requested.strip() or requested == key.name:
            return key.name
        if key.sub_labelers:
            return f"{key.name}/{requested}"
        self._refused[(key.name, "PermissionDenied")] += 1
        raise PermissionDenied(
            f"API key {key.name!r} records feedback as labeler {key.name!r}, not "
            f"{requested[:80]!r}: "
            'omit labeler, or give the key "sub_labelers": true in the keys file (a shared '
            "labeling-team key, recorded as name/labeler)",
            field="labeler",
            key=key.name,
        )

    def charge(self, caller: str, tokens: int) -> None:
        """Spend `tokens` of `caller`'s token budget (a name `check` returned; none: free)."""
        bucket = self._budgets.get(caller)
        wait = bucket.take(tokens) if bucket else 0.0
        if wait == 0:
            return
        assert bucket is not None
        per_min = bucket.limit.burst
        self._refused[(caller, "RateLimited")] += 1
        if wait == float("inf"):
            raise RateLimited(
                f"n x max_tokens = {tokens} is more than API key {caller!r} may ask for at once "
                f"({per_min} tokens per minute); ask for fewer",
                key=caller,
                retry_after=60.0,
            )
        raise RateLimited(
            f"API key {caller!r} has spent its {per_min} tokens per minute; {tokens} more are "
            f"there in {wait:.1f} s",
            key=caller,
            retry_after=wait,
        )

    def _limit(self, key: ApiKey) -> None:
        bucket = self._buckets.get(key.name)
        wait = bucket.take() if bucket else 0.0
        if wait > 0:
            assert key.limit is not None
            raise RateLimited(
                f"API key {key.name!r} is over its limit of {key.limit.rate_per_s:g} requests/s "
                f"(burst {key.limit.burst}); retry after {wait:.2f} s",
                key=key.name,
                retry_after=wait,
            )
