"""``dsq db``: database maintenance."""

import typer

from cli.common import boundary, console, settings
from dsq.db.session import make_engine, upgrade as upgrade_schema

app = typer.Typer(help="Database maintenance.", no_args_is_help=True)


@app.command()
def upgrade(ctx: typer.Context):
    """Apply all migrations to the database (also done automatically on first use)."""
    with boundary():
        engine = make_engine(settings(ctx).database_url)
        upgrade_schema(engine)
        console.print(f"database at head: {engine.url.render_as_string(hide_password=True)}")
