"""Connecting to the store's database and migrating it: SQLite (WAL, full sync, immediate write
transactions) or PostgreSQL, brought to the newest schema by Alembic on open."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL
from sqlalchemy.pool import StaticPool

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
BUSY_TIMEOUT_MS = 10_000
WRITE = "flywheel_write"  # execution option: this transaction will write

_SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    # FULL syncs the WAL on every commit: a ranking is on disk before it is acknowledged.
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
    f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}",
)


def create(url: URL) -> Engine:
    """An engine for `url`: SQLite with WAL, full sync and immediate write transactions, or
    PostgreSQL through psycopg."""
    if url.get_backend_name() == "sqlite":
        return _create_sqlite_engine(url)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")  # the driver the postgres extra installs
    # Pre-ping replaces connections a database restart or a cut network left dead; a connect
    # that hangs (a silent network) gives up after a few seconds, so requests fail with 503.
    return create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 3})


def _create_sqlite_engine(url: URL) -> Engine:
    database = url.database or ""
    in_memory = database in ("", ":memory:")
    if not in_memory and not database.startswith("file:"):
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False},
        poolclass=StaticPool if in_memory else None,
    )
    event.listen(engine, "connect", _on_sqlite_connect)
    event.listen(engine, "begin", _on_sqlite_begin)
    return engine


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Take transaction control from the sqlite3 module so we can say BEGIN IMMEDIATE.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    for pragma in _SQLITE_PRAGMAS:
        cursor.execute(pragma)
    cursor.close()


def _on_sqlite_begin(conn: Connection) -> None:
    # A deferred BEGIN that later writes fails with SQLITE_BUSY, without waiting, when another
    # writer committed in between; BEGIN IMMEDIATE waits its turn (busy_timeout) up front.
    writes = conn.get_execution_options().get(WRITE, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if writes else "BEGIN")


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    return config


def upgrade_to_head(engine: Engine) -> None:
    config = alembic_config()
    with engine.execution_options(**{WRITE: True}).connect() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
