"""Alembic environment for the feedback service (run through rlhfkit.feedback.db.upgrade)."""

from __future__ import annotations

from alembic import context

from rlhfkit.feedback.db import make_engine
from rlhfkit.feedback.models import Base

config = context.config
target_metadata = Base.metadata


def run_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    engine = make_engine(config.get_main_option("sqlalchemy.url"), pool_size=1)
    try:
        with engine.connect() as connection:
            if connection.dialect.name == "sqlite":
                # Batch mode rebuilds a table (copy, DROP, rename): with foreign keys on, the DROP
                # cascade-deletes every row that refers to it. SQLite ignores this pragma inside a
                # transaction, so it goes straight to the driver (autocommit) before one begins;
                # the engine, and with it this connection, is disposed afterwards.
                connection.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")
            context.configure(connection=connection, target_metadata=target_metadata,
                              render_as_batch=connection.dialect.name == "sqlite")
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
