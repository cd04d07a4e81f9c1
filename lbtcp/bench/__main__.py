"""``python -m lbtcp.bench bench|echo|sink ...``: the bench commands without the main CLI."""

from lbtcp.bench.commands import cli

cli(prog_name="python -m lbtcp.bench")
