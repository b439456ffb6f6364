"""Alembic environment, run programmatically by Store.open (no alembic.ini needed).

Store.open passes its own connection in `config.attributes["connection"]`; the alembic command
line can still be used with `-x`-less configs that set `sqlalchemy.url`.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine, pool, text

from flywheel_server.store.schema import Base

# Any constant: replicas that start together take turns upgrading the shared PostgreSQL database.
_UPGRADE_LOCK_ID = 0x466C7977  # "Flyw"


def _configure_and_run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        compare_type=True,
        # SQLite supports transactional DDL; alembic assumes not. One transaction per upgrade
        # means a crashed upgrade leaves nothing half-built, and BEGIN IMMEDIATE serialises
        # two processes upgrading the same file.
        transactional_ddl=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _UPGRADE_LOCK_ID})
        context.run_migrations()


def run_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _configure_and_run(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("set sqlalchemy.url in the alembic config or pass a connection")
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as conn:
        _configure_and_run(conn)


def run_offline() -> None:
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url"),
        target_metadata=Base.metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
