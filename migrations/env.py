"""Alembic environment for dsq.

Run through ``dsq.db.session.upgrade`` (which hands over an open connection in
``config.attributes["connection"]``), or with the ``alembic`` command and
``-x url=...`` / ``sqlalchemy.url`` / ``DSQ_DATABASE_URL``.  Logging is
configured only when Alembic was started from an ini file, so the dsq CLI
stays quiet.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from dsq.db.models import Base, UTCDateTime
from dsq.db.session import default_database_url, make_engine

config = context.config
target_metadata = Base.metadata

if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    return (
        context.get_x_argument(as_dictionary=True).get("url")
        or config.get_main_option("sqlalchemy.url")
        or default_database_url()
    )


def _render_item(type_: str, obj, autogen_context):
    """Write dsq's column types as plain SQLAlchemy types, so revisions never import dsq."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(**kwargs) -> None:
    context.configure(
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things in place
        render_item=_render_item,
        compare_type=True,
        **kwargs,
    )


def _run(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_url())
    try:
        with engine.begin() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
