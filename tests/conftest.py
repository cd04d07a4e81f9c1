from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.dns_server import dns_servers  # noqa: F401  (a fixture for every test module)
from tests.support import Backends, EchoProcess, Lbtcp


@pytest.fixture
def backends() -> Iterator[Backends]:
    servers = Backends()
    yield servers
    servers.close()


@pytest.fixture
def start_lbtcp(tmp_path: Path) -> Iterator[Callable[..., Lbtcp]]:
    started: list[Lbtcp] = []

    def start(config_text: str, **kwargs: object) -> Lbtcp:
        proc = Lbtcp(config_text, tmp_path, **kwargs)  # type: ignore[arg-type]
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def echo_processes() -> Iterator[Callable[[int], EchoProcess]]:
    started: list[EchoProcess] = []

    def start(count: int, mode: str = "echo") -> EchoProcess:
        proc = EchoProcess(count, mode)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
