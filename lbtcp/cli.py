"""The command line (click). Commands parse their arguments and call into the package."""

from __future__ import annotations

import sys

import click

from lbtcp import __version__
from lbtcp.config import Config, ConfigError, load_config

EXIT_BAD_CONFIG = 2


def _load_or_exit(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        click.echo(f"{exc.source}: {len(exc.errors)} error(s) in the config:", err=True)
        for error in exc.errors:
            click.echo(f"  {error}", err=True)
        sys.exit(EXIT_BAD_CONFIG)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lbtcp")
def main() -> None:
    """lbtcp: a pure TCP (layer-4) load balancer."""


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
def serve(config: str) -> None:
    """Run in the foreground until SIGTERM (drain) or SIGINT (at once)."""
    from lbtcp.runtime import serve as run_serve

    parsed = _load_or_exit(config)
    sys.exit(run_serve(parsed))


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
def check(config: str) -> None:
    """Validate CONFIG: exit 0 with a summary, or 2 with every error found."""
    parsed = _load_or_exit(config)
    servers = sum(len(pool.servers) for pool in parsed.pools.values())
    click.echo(
        f"{config}: OK: {len(parsed.listeners)} listener(s), {len(parsed.pools)} pool(s), "
        f"{servers} server(s)"
    )


def _add_bench_commands() -> None:
    from lbtcp.bench.commands import bench, echo, sink

    for command in (bench, echo, sink):
        main.add_command(command)


_add_bench_commands()
