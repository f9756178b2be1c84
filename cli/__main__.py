"""``python -m cli``: the dsq command."""

from cli.main import app

app(prog_name="dsq")
