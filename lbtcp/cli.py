"""The command line (click). Commands parse their arguments and call into the package."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from lbtcp import __version__
from lbtcp.addresses import AddressError, Endpoint, parse_endpoint
from lbtcp.config import Config, ConfigError, FleetConfig, load_config

if TYPE_CHECKING:
    from lbtcp.admin.client import AdminClient

EXIT_BAD_CONFIG = 2
EXIT_FAILURE = 1
F = TypeVar("F", bound=Callable[..., Any])


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


def _fail(message: str) -> NoReturn:
    """One line on stderr and exit 1: what an admin command prints instead of a traceback."""
    click.echo(f"lbtcp: {message}", err=True)
    sys.exit(EXIT_FAILURE)


def _endpoint(ctx: click.Context, param: click.Parameter, value: str | None) -> Endpoint | None:
    if value is None:
        return None
    try:
        return parse_endpoint(value)
    except AddressError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option(
    "--admin",
    metavar="HOST:PORT",
    callback=_endpoint,
    help="Add the live view of the lbtcp running there (default: the config's [admin] listen).",
)
@click.option(
    "--token",
    metavar="TOKEN",
    help="The admin token (default: $LBTCP_ADMIN_TOKEN, else the config's [admin] token).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor(config: str, admin: Endpoint | None, token: str | None, as_json: bool) -> None:
    """Say why a pool of CONFIG would refuse clients ("no healthy upstream"): exit 0 when
    every pool serves, 1 otherwise, 2 on a bad config."""
    import asyncio

    from lbtcp.admin.client import AdminError, choose_target
    from lbtcp.doctor import render_text, run_doctor, to_json

    parsed = _load_or_exit(config)
    target: tuple[Endpoint, str] | None = None
    problem = ""
    if admin is not None or parsed.admin is not None:
        try:
            target = choose_target(admin, parsed.admin, token, os.environ)
        except AdminError as exc:
            problem = str(exc)
    report = asyncio.run(run_doctor(parsed, target, problem))
    if as_json:
        click.echo(json.dumps(to_json(report), indent=2))
    else:
        click.echo(render_text(report), nl=False)
    sys.exit(report.exit_code)


def _admin_options(command: F) -> F:
    """The options every admin command shares (DESIGN.md section 1)."""
    options = [
        click.option(
            "--admin",
            metavar="HOST:PORT",
            callback=_endpoint,
            help="The admin API's address (default: the config's [admin] listen with -c, "
            "else 127.0.0.1:9900).",
        ),
        click.option(
            "-c",
            "--config",
            type=click.Path(dir_okay=False),
            help="Take the admin address and token from this config's [admin] table.",
        ),
        click.option(
            "--token",
            metavar="TOKEN",
            help="The admin token (default: $LBTCP_ADMIN_TOKEN, else the config's, with -c).",
        ),
        click.option(
            "--timeout",
            type=click.FloatRange(min=0, min_open=True),
            metavar="SECONDS",
            default=5.0,
            show_default=True,
            help="Seconds to wait for the admin API to connect and to answer.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _admin_client(
    admin: Endpoint | None, config: str | None, token: str | None, timeout: float
) -> AdminClient:
    from lbtcp.admin.client import AdminClient, AdminError, choose_target

    settings = None
    if config is not None:
        settings = _load_or_exit(config).admin
        if settings is None:
            _fail(f"{config} has no [admin] table: lbtcp serve runs no admin API with it")
    try:
        endpoint, secret = choose_target(admin, settings, token, os.environ)
    except AdminError as exc:
        _fail(str(exc))
    return AdminClient(endpoint, secret, timeout)


@main.command()
@_admin_options
@click.option("--json", "as_json", is_flag=True, help="Print the /status JSON document.")
@click.option("--watch", is_flag=True, help="Redraw every second until Ctrl-C.")
@click.option(
    "--fleet",
    is_flag=True,
    help="Every live node of the fleet (from etcd) and where their views differ; needs -c.",
)
def status(
    admin: Endpoint | None,
    config: str | None,
    token: str | None,
    timeout: float,
    as_json: bool,
    watch: bool,
    fleet: bool,
) -> None:
    """Show the live pools and servers, from the admin API."""
    if fleet:
        from lbtcp.fleet import commands

        if watch:
            raise click.UsageError("--fleet and --watch do not go together")
        try:
            document = commands.status(_fleet_config(config))
        except commands.FleetCommandError as exc:
            _fail(str(exc))
        with _reader_may_leave():
            text = commands.dumps(document) + "\n" if as_json else commands.status_text(document)
            click.echo(text, nl=False)
        return
    from rich.console import Console

    from lbtcp.admin import table
    from lbtcp.admin.client import AdminError

    if as_json and watch:
        raise click.UsageError("--json and --watch do not go together")
    with _admin_client(admin, config, token, timeout) as client, _reader_may_leave():
        try:
            if watch:
                with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a watch ends
                    table.watch(client.status, Console(), errors=(AdminError,))
                return
            document = client.status()
        except AdminError as exc:
            _fail(str(exc))
        if as_json:
            click.echo(json.dumps(document, indent=2))
        elif sys.stdout.isatty():
            Console().print(table.render_status(document, time.time()))
        else:
            click.echo(table.status_text(document, time.time()), nl=False)


@contextlib.contextmanager
def _reader_may_leave() -> Iterator[None]:
    """``lbtcp status | head``: the reader going away is not an error of ours. Exit 0, and
    point stdout at /dev/null so that the interpreter's final flush does not fail again."""
    try:
        yield
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)


_fleet_option = click.option(
    "--fleet",
    is_flag=True,
    help="Through etcd for every node of the fleet (needs -c CONFIG with [fleet]).",
)


def _fleet_config(config: str | None) -> FleetConfig:
    if config is None:
        raise click.UsageError("--fleet needs -c CONFIG (its [fleet] table names etcd)")
    settings = _load_or_exit(config).fleet
    if settings is None:
        _fail(f"{config} has no [fleet] table")
    return settings


def _change(
    action: str,
    pool: str,
    server: str,
    weight: int,
    options: tuple[Endpoint | None, str | None, str | None, float],
    fleet: bool = False,
) -> None:
    from lbtcp.admin.client import AdminError, apply_change

    if fleet:
        from lbtcp.fleet import commands

        try:
            click.echo(commands.change(_fleet_config(options[1]), pool, server, action, weight))
        except commands.FleetCommandError as exc:
            _fail(str(exc))
        return
    with _admin_client(*options) as client:
        try:
            line = apply_change(client, pool, server, action, weight)
        except AdminError as exc:
            _fail(str(exc))
    click.echo(line)


def _state_command(action: str, doc: str) -> click.Command:
    """``drain``, ``enable`` and ``disable``: the same arguments and options, one action each
    (``weight`` adds its N)."""

    def command(
        pool: str,
        server: str,
        admin: Endpoint | None,
        config: str | None,
        token: str | None,
        timeout: float,
        fleet: bool,
    ) -> None:
        _change(action, pool, server, 0, (admin, config, token, timeout), fleet)

    command.__doc__ = doc
    # The decorators in the order ``@main.command() @argument("pool") @argument("server")
    # @_admin_options @_fleet_option`` apply them, so the help and parameter order stay.
    with_options = _admin_options(_fleet_option(command))
    return main.command(name=action)(click.argument("pool")(click.argument("server")(with_options)))


drain = _state_command(
    "drain", "Drain SERVER of POOL: no new sessions; live ones and probes go on."
)
enable = _state_command("enable", "Enable SERVER of POOL: back in rotation after drain or disable.")
disable = _state_command(
    "disable", "Disable SERVER of POOL: out of rotation, not probed; live sessions go on."
)


@main.command()
@click.argument("pool")
@click.argument("server")
@click.argument("n", type=click.IntRange(0, 256))
@_admin_options
@_fleet_option
def weight(
    pool: str,
    server: str,
    n: int,
    admin: Endpoint | None,
    config: str | None,
    token: str | None,
    timeout: float,
    fleet: bool,
) -> None:
    """Set the weight of SERVER of POOL to N (0..256) at runtime."""
    _change("weight", pool, server, n, (admin, config, token, timeout), fleet)


@main.command()
@_admin_options
def reload(
    admin: Endpoint | None,
    config: str | None,
    token: str | None,
    timeout: float,
) -> None:
    """Reload the running config file in place (as SIGHUP), through the admin API.

    Prints what changed; with an invalid file, prints every error and exits 2 (the running
    configuration is untouched)."""
    from lbtcp.admin.client import AdminError, printable

    with _admin_client(admin, config, token, timeout) as client:
        try:
            result = client.reload()
        except AdminError as exc:
            _fail(str(exc))
    source = printable(str(result.get("config", "")))
    if not result.get("ok"):
        errors = [printable(str(e)) for e in result.get("errors") or []]
        click.echo(f"{source}: not reloaded, {len(errors)} error(s):", err=True)
        for error in errors:
            click.echo(f"  {error}", err=True)
        click.echo("the running configuration is unchanged", err=True)
        sys.exit(EXIT_BAD_CONFIG)
    click.echo(f"{source}: reloaded: {printable(str(result.get('summary', '')))}")
    for note in result.get("restart_needed") or []:
        click.echo(f"  note: {printable(str(note))}", err=True)


def _add_bench_commands() -> None:
    from lbtcp.bench.commands import bench, echo, sink

    for command in (bench, echo, sink):
        main.add_command(command)


_add_bench_commands()
