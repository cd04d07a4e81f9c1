"""The live status page (``GET /``, lbtcp/admin/page.html) in a real headless Chromium.

Debian's ``chromium`` is driven by selenium through Debian's ``chromium-driver``, both given by
path, so selenium-manager never runs (it would try to download a browser and a driver).
Missing packages fail the tests loudly: ``scripts/install-test-deps`` installs them.

Two kinds of peer serve the page:
- ``FakeAdmin``, a small HTTP server in this module that serves the packaged page.html and a
  /status document the test controls: 200 servers, hostile names, failures on demand, a token;
- a real ``lbtcp serve`` with an ``[admin]`` table, whose servers are killed during the test.

Every wait on the page is a bounded poll of the DOM (``wait_dom``): the page refreshes once a
second, so a change shows after one or two refreshes.
"""

from __future__ import annotations

import contextlib
import http.server
import importlib.resources
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By

from tests.support import REPO, Backends, Lbtcp, open_session, roundtrip, wait_until

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = REPO / "docs" / "status-page.png"
# Set to 1 to refresh docs/status-page.png (the README's screenshot); otherwise the
# screenshot test writes into its tmp_path and checks it there.
UPDATE_SCREENSHOT = os.environ.get("LBTCP_UPDATE_SCREENSHOT") == "1"

PAGE = (importlib.resources.files("lbtcp.admin") / "page.html").read_bytes()
NAME = "backend-{:03d}.example.internal"
STATES = ["healthy", "failing", "rising", "unknown", "draining", "disabled", "ejected", "unhealthy"]


# --- the browser -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if missing:
        pytest.fail(
            "the status page test needs Debian's chromium and chromium-driver"
            f" ({', '.join(missing)} not found): run scripts/install-test-deps (as root)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_dom(driver: WebDriver, script: str, what: str, timeout: float = 10.0, *args: Any) -> Any:
    """Run ``script`` (a JS function body) until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    result: Any = None
    while time.monotonic() < deadline:
        result = driver.execute_script(script, *args)
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {result!r}")


# Every server row of the page as plain data, read in one call (the page renders between
# calls, never during one).
ROWS_JS = """
return [...document.querySelectorAll('details.pool')].flatMap((pool) =>
  [...pool.querySelectorAll('tbody tr')].map((tr) => ({
    pool: pool.getAttribute('data-pool'),
    name: tr.cells[0].querySelector('.name').textContent,
    backup: tr.cells[0].querySelector('.tag') !== null,
    address: tr.cells[1].textContent,
    state: tr.cells[2].querySelector('.word').textContent,
    state_attr: tr.getAttribute('data-state'),
    color: getComputedStyle(tr.cells[2].querySelector('.dot')).backgroundColor,
    weight: tr.cells[3].textContent,
    active: tr.cells[4].textContent,
    rate: tr.cells[5].textContent,
    total: tr.cells[6].textContent,
    failures: tr.cells[7].textContent,
    probe: tr.cells[9].textContent,
    probe_detail: tr.cells[9].getAttribute('title'),
    change: tr.cells[10].textContent,
    age: tr.cells[11].textContent,
    hidden: tr.hidden,
  })));
"""
POOLS_JS = """
return Object.fromEntries([...document.querySelectorAll('details.pool')].map((pool) => [
  pool.getAttribute('data-pool'), {
    verdict: pool.querySelector('.verdict').textContent,
    counts: pool.querySelector('.counts').textContent,
    bar: pool.querySelector('.bar').getAttribute('aria-label'),
    legend: pool.querySelector('.legend').textContent,
  }]));
"""


def rows(driver: WebDriver) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = driver.execute_script(ROWS_JS)
    return result


def banner(driver: WebDriver) -> str | None:
    """The error banner's text while it is shown, else None."""
    text: str | None = driver.execute_script(
        "const e = document.getElementById('error'); return e.hidden ? null : e.textContent;"
    )
    return text


# --- a controllable admin server -------------------------------------------------------------


class FakeAdmin:
    """Serves the packaged page.html at / and ``document(n)`` (n = 1, 2, ... per request) at
    /status, or ``failure`` = (status, JSON body) when set; records every request."""

    def __init__(self, document: Callable[[int], dict[str, Any]], token: str = "") -> None:
        self.document = document
        self.token = token
        self.failure: tuple[int, dict[str, Any]] | None = None
        self.requests: list[tuple[str, str | None]] = []
        self.status_requests = 0
        self.lock = threading.Lock()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with owner.lock:
                    owner.requests.append((self.path, self.headers.get("Authorization")))
                if self.path == "/":
                    self.answer(200, "text/html; charset=utf-8", PAGE)
                elif self.path == "/status":
                    self.status()
                else:
                    self.answer(404, "application/json", b'{"error": "not found"}')

            def status(self) -> None:
                if owner.token and self.headers.get("Authorization") != f"Bearer {owner.token}":
                    body = json.dumps({"error": "missing or wrong token"}).encode()
                    self.answer(401, "application/json", body, {"WWW-Authenticate": "Bearer"})
                    return
                with owner.lock:
                    failure = owner.failure
                    owner.status_requests += 1
                    count = owner.status_requests
                if failure is not None:
                    self.answer(failure[0], "application/json", json.dumps(failure[1]).encode())
                else:
                    body = json.dumps(owner.document(count)).encode()
                    self.answer(200, "application/json", body)

            def answer(
                self, code: int, kind: str, body: bytes, extra: dict[str, str] | None = None
            ) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                for name, value in (extra or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # the test asserts on ``requests`` instead

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def fake_admin() -> Iterator[Callable[..., FakeAdmin]]:
    started: list[FakeAdmin] = []

    def start(document: Callable[[int], dict[str, Any]], token: str = "") -> FakeAdmin:
        admin = FakeAdmin(document, token)
        started.append(admin)
        return admin

    yield start
    for admin in started:
        admin.close()


def server_doc(name: str, state: str = "healthy", **fields: Any) -> dict[str, Any]:
    """One server of a /status document (status-schema.md), with neutral defaults."""
    admin = state if state in ("draining", "disabled") else "enabled"
    health = "healthy" if admin != "enabled" else state
    doc: dict[str, Any] = {
        "name": name,
        "address": f"10.0.0.{len(name) % 250 + 1}:8080",
        "backup": False,
        "state": state,
        "health": health,
        "admin": admin,
        "weight": 1,
        "effective_weight": 1.0,
        "max_connections": 0,
        "active": 0,
        "total": 0,
        "connect_failures": {"refused": 0, "timeout": 0, "other": 0},
        "ejections": 0,
        "bytes_sent": 0,
        "bytes_received": 0,
        "last_probe": {"result": "ok", "detail": "", "duration_ms": 0.4, "at": 1764619201.0},
        "last_change": {
            "at": 1764619201.0,
            "from": "unknown",
            "to": state,
            "reason": "probe: 2 consecutive successes",
        },
    }
    doc.update(fields)
    return doc


def pool_doc(name: str, servers: list[dict[str, Any]], verdict: str = "ok") -> dict[str, Any]:
    return {
        "name": name,
        "balance": "round_robin",
        "verdict": verdict,
        "servers_total": len(servers),
        "in_service": sum(s["state"] in ("healthy", "failing") for s in servers),
        "servers": servers,
    }


def status_doc(pools: list[dict[str, Any]], uptime: float = 100.0, **fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": "0.1.0",
        "pid": 4242,
        "config": "/etc/lbtcp/lbtcp.toml",
        "started_at": 1764619200.5,
        "uptime_s": uptime,
        "draining": False,
        "listeners": [
            {
                "name": "web",
                "pool": pools[0]["name"] if pools else "app",
                "addresses": ["127.0.0.1:8080", "[::1]:8080"],
                "active": 3,
                "total": 10,
                "max_connections": 0,
                "refused": {"no_healthy": 0, "acl": 0, "limit": 0, "proxy_protocol": 0},
            }
        ],
        "pools": pools,
    }
    doc.update(fields)
    return doc


# --- the page against a controlled document --------------------------------------------------


def test_page_renders_200_servers_compactly_with_states_and_rates(
    browser: WebDriver, fake_admin: Callable[..., FakeAdmin]
) -> None:
    # Names as long as real ones, so that "compact" is checked with realistic widths.
    # Server i gains (i % 7) sessions per request and the uptime grows 2 s per request, so
    # its rate is exactly (i % 7) / 2 sessions per second whatever the page's timing.
    count = 200

    def document(n: int) -> dict[str, Any]:
        servers = [
            server_doc(NAME.format(i), STATES[i % len(STATES)], total=n * (i % 7), active=i % 3)
            for i in range(count)
        ]
        return status_doc([pool_doc("big", servers, "degraded")], uptime=100.0 + 2 * n)

    admin = fake_admin(document)
    browser.get(admin.url)
    wait_dom(
        browser,
        "const r = document.querySelectorAll('details.pool tbody tr');"
        "return r.length === 200 && r[13].cells[5].textContent.endsWith('/s');",
        "200 rows with a rate",
    )
    seen = rows(browser)
    assert [row["name"] for row in seen] == [NAME.format(i) for i in range(count)]
    for i, row in enumerate(seen):
        assert row["state"] == STATES[i % len(STATES)], row
        assert row["state_attr"] == row["state"]
        assert row["rate"] == f"{(i % 7) / 2:.1f}/s", row
        assert row["active"] == str(i % 3)
    # Every total comes from the same document: the one the rates were computed from.
    totals = {int(row["total"]) // (i % 7) for i, row in enumerate(seen) if i % 7}
    assert len(totals) == 1, totals
    # The colour says the state too: one colour per state, different for each.
    colors = {row["state"]: row["color"] for row in seen}
    assert len(set(colors.values())) == len(STATES), colors

    pools = browser.execute_script(POOLS_JS)
    assert pools["big"]["verdict"] == "degraded"
    assert pools["big"]["counts"] == "50 of 200 in service"
    for state in STATES:
        assert f"25 {state}" in pools["big"]["bar"]
        assert f"25 {state}" in pools["big"]["legend"]

    # Readable at 200 servers: compact rows, and the pool's table scrolls inside its box
    # instead of making the page 200 rows long.
    layout = browser.execute_script(
        "const wrap = document.querySelector('.table-wrap');"
        "const row = wrap.querySelector('tbody tr');"
        "return {row: row.getBoundingClientRect().height,"
        " line: parseFloat(getComputedStyle(row.cells[0]).lineHeight), inner: wrap.scrollHeight,"
        " box: wrap.clientHeight, page: document.documentElement.scrollHeight,"
        " view: window.innerHeight};"
    )
    assert layout["row"] < 1.5 * layout["line"] + 6, layout  # one line of text per server
    assert layout["inner"] > layout["box"], layout
    assert layout["page"] < 2 * layout["view"], layout

    # The "out of service" filter leaves exactly the servers that take no new session.
    browser.find_element(By.ID, "problems").click()
    wait_dom(browser, "return document.getElementById('shown').textContent", "the filter count")
    visible = [row for row in rows(browser) if not row["hidden"]]
    assert {row["state"] for row in visible} == set(STATES) - {"healthy", "failing"}
    assert len(visible) == 150
    assert browser.find_element(By.ID, "shown").text == "150 of 200 servers shown"
    # A pool is collapsible: its summary closes it.
    browser.find_element(By.CSS_SELECTOR, "details.pool > summary").click()
    assert browser.execute_script("return document.querySelector('details.pool').open") is False
    # Two more refreshes must not reopen what the operator closed.
    with admin.lock:
        seen_requests = admin.status_requests

    def refreshed() -> bool:
        with admin.lock:
            return admin.status_requests >= seen_requests + 2

    wait_until(refreshed, timeout=10, what="two more refreshes")
    wait_dom(browser, "return document.getElementById('error').hidden", "a rendered refresh")
    assert browser.execute_script("return document.querySelector('details.pool').open") is False


HOSTILE = [
    "<script>window.__pwned = 1</script>",
    '<img src=x onerror="window.__pwned = 2">',
    "a&amp;b \"quoted\" 'single' </td></tr>",
    "\u202eevil\u202c ünïcödé 名前",
]


def test_page_shows_operator_strings_as_text_never_as_markup(
    browser: WebDriver, fake_admin: Callable[..., FakeAdmin]
) -> None:
    servers = [
        server_doc(
            name,
            "unhealthy",
            address=f"<b>{i}</b>:80",
            last_change={"at": 1764619300.0, "from": "healthy", "to": "unhealthy", "reason": name},
            last_probe={"result": "<i>fail</i>", "detail": name, "duration_ms": 1.0, "at": 1.0},
        )
        for i, name in enumerate(HOSTILE)
    ]
    pool_name = "<svg onload=window.__pwned=3>"
    admin = fake_admin(lambda n: status_doc([pool_doc(pool_name, servers, "empty")]))
    browser.get(admin.url)
    wait_dom(
        browser,
        "return document.querySelectorAll('details.pool tbody tr').length === 4",
        "the rows",
    )
    seen = rows(browser)
    assert [row["name"] for row in seen] == HOSTILE
    assert [row["change"] for row in seen] == HOSTILE
    assert [row["address"] for row in seen] == [f"<b>{i}</b>:80" for i in range(len(HOSTILE))]
    assert {row["pool"] for row in seen} == {pool_name}
    assert all(row["probe"].startswith("<i>fail</i>") for row in seen)
    assert browser.find_element(By.CSS_SELECTOR, ".pool-name").text == pool_name
    found = browser.execute_script(
        "return {pwned: window.__pwned === undefined ? null : window.__pwned,"
        " scripts: document.scripts.length,"
        " markup: document.querySelectorAll('main img, main svg, main b, main i:not(.dot)').length}"
    )
    assert found == {"pwned": None, "scripts": 1, "markup": 0}


def test_page_keeps_the_last_data_and_shows_an_error_banner_while_status_fails(
    browser: WebDriver, fake_admin: Callable[..., FakeAdmin]
) -> None:
    admin = fake_admin(
        lambda n: status_doc([pool_doc("app", [server_doc("a"), server_doc("b", "unhealthy")])])
    )
    browser.get(admin.url)
    wait_dom(
        browser,
        "return document.querySelectorAll('details.pool tbody tr').length === 2",
        "the rows",
    )
    assert banner(browser) is None
    updated = browser.find_element(By.ID, "updated").text
    assert re.fullmatch(r"last updated \d\d:\d\d:\d\d", updated), updated

    admin.failure = (500, {"error": "status document failed: boom"})
    text = wait_dom(
        browser,
        "const e = document.getElementById('error'); return !e.hidden && e.textContent;",
        "the error banner",
    )
    assert "HTTP 500" in text
    assert "status document failed: boom" in text
    assert "Showing the last data" in text
    assert [(row["name"], row["state"]) for row in rows(browser)] == [
        ("a", "healthy"),
        ("b", "unhealthy"),
    ]
    assert "stale" in browser.find_element(By.ID, "updated").get_attribute("class")
    # "last updated" keeps counting while it fails.
    wait_dom(
        browser, "return /ago\\)$/.test(document.getElementById('updated').textContent)", "an age"
    )

    admin.failure = None
    wait_dom(browser, "return document.getElementById('error').hidden", "the banner to go")
    assert "stale" not in browser.find_element(By.ID, "updated").get_attribute("class")

    # An admin server that stops answering at all is an error too, with the data kept.
    admin.close()
    text = wait_dom(
        browser,
        "const e = document.getElementById('error'); return !e.hidden && e.textContent;",
        "the unreachable banner",
    )
    assert "cannot reach the admin API" in text
    assert len(rows(browser)) == 2


def test_page_sends_the_token_from_the_url_fragment(
    browser: WebDriver, fake_admin: Callable[..., FakeAdmin]
) -> None:
    secret = "s3cret&t=k/1%+"  # visible ASCII that needs percent-encoding in a URL
    admin = fake_admin(lambda n: status_doc([pool_doc("app", [server_doc("a")])]), token=secret)
    browser.get(admin.url)
    text = wait_dom(
        browser,
        "const e = document.getElementById('error'); return !e.hidden && e.textContent;",
        "the 401 banner",
    )
    assert "HTTP 401" in text
    assert "#token=" in text
    assert rows(browser) == []

    browser.get("about:blank")
    browser.get(admin.url + "#token=" + urllib.request.quote(secret, safe=""))
    wait_dom(
        browser, "return document.querySelectorAll('details.pool tbody tr').length === 1", "the row"
    )
    assert banner(browser) is None
    with admin.lock:
        sent = {auth for path, auth in admin.requests if path == "/status"}
    assert f"Bearer {secret}" in sent
    # The fragment stays in the browser: no request carries the token in its path.
    assert all("s3cret" not in path for path, _ in admin.requests)


def test_page_is_self_contained(browser: WebDriver, fake_admin: Callable[..., FakeAdmin]) -> None:
    admin = fake_admin(lambda n: status_doc([pool_doc("app", [server_doc("a")])]))
    browser.get(admin.url)
    wait_dom(
        browser, "return document.querySelectorAll('details.pool tbody tr').length === 1", "the row"
    )
    wait_dom(browser, "return performance.getEntriesByType('resource').length >= 2", "2 fetches")
    resources = browser.execute_script(
        "return performance.getEntriesByType('resource').map((e) => e.name);"
    )
    assert {url.split("?")[0] for url in resources} == {admin.url + "status"}
    with admin.lock:
        assert {path for path, _ in admin.requests} == {"/", "/status"}
    text = PAGE.decode()
    # No external reference of any kind, and no HTML built from strings.
    assert re.findall(r"""(?:src|href|url)\s*[=(]\s*["']?([^"')\s>]+)""", text) == ["data:,"]
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in text


# --- the page against a real lbtcp -----------------------------------------------------------


def admin_address(lbtcp: Lbtcp) -> tuple[str, int]:
    """The admin server's address from its ``listening`` line."""
    line = lbtcp.wait_line(r"\badmin_listening\b", timeout=15)
    match = re.search(r'address(?:=|": ")\[?([0-9a-f.:]+?)\]?:(\d+)', line)
    assert match, line
    return match.group(1), int(match.group(2))


HEALTH = """\
[pools.app.health]
interval = "200ms"
fast_interval = "100ms"
down_interval = "200ms"
timeout = "150ms"
rise = 1
fall = 2
jitter = 0
"""


def live_config(ports: list[int], admin_extra: str = "") -> str:
    lines = [
        "[admin]",
        'listen = "127.0.0.1:0"',
        admin_extra,
        "[listeners.web]",
        'bind = "127.0.0.1:0"',
        'pool = "app"',
        "[pools.app]",
        'balance = "round_robin"',
    ]
    for i, port in enumerate(ports):
        lines += ["[[pools.app.servers]]", f'name = "srv-{i}"', f'address = "127.0.0.1:{port}"']
    return "\n".join(lines) + "\n" + HEALTH


def test_page_follows_a_live_lbtcp_and_shows_a_killed_server_unhealthy(
    browser: WebDriver,
    backends: Backends,
    start_lbtcp: Callable[..., Lbtcp],
) -> None:
    ports = [backends.echo() for _ in range(3)]
    lbtcp = start_lbtcp(live_config(ports))
    host, port = admin_address(lbtcp)
    url = f"http://{host}:{port}/"
    with urllib.request.urlopen(url, timeout=5) as answer:
        assert answer.read() == PAGE  # GET / is the packaged page, byte for byte
    browser.get(url)
    browser.execute_script("window.__same_page = true;")
    wait_dom(
        browser,
        "const r = [...document.querySelectorAll('details.pool tbody tr')];"
        "return r.length === 3 && r.every((tr) => tr.getAttribute('data-state') === 'healthy');",
        "three healthy servers",
    )
    seen = rows(browser)
    assert [(r["name"], r["address"], r["state"]) for r in seen] == [
        (f"srv-{i}", f"127.0.0.1:{p}", "healthy") for i, p in enumerate(ports)
    ]
    assert browser.execute_script(POOLS_JS)["app"]["verdict"] == "ok"

    # Traffic shows up: 6 sessions round robin, 2 per server, and a live one as active.
    address = lbtcp.address()
    for _ in range(6):
        assert roundtrip(address, b"ping") == b"ping"
    with contextlib.closing(open_session(address)):
        wait_dom(
            browser,
            "const r = [...document.querySelectorAll('details.pool tbody tr')];"
            "return r.reduce((n, tr) => n + Number(tr.cells[6].textContent), 0) === 7"
            " && r.some((tr) => tr.cells[4].textContent === '1');",
            "7 sessions in all and one active",
        )

    backends.stop(ports[1])
    wait_dom(
        browser,
        "const tr = document.querySelector('tr[data-server=\"srv-1\"]');"
        "return tr && tr.getAttribute('data-state') === 'unhealthy';",
        "srv-1 unhealthy",
        timeout=15,
    )
    seen = rows(browser)
    assert [(r["name"], r["state"]) for r in seen] == [
        ("srv-0", "healthy"),
        ("srv-1", "unhealthy"),
        ("srv-2", "healthy"),
    ]
    # Why: the failed probe and the reason of the change, as the probes put it.
    assert re.fullmatch(r"fail \d+\.\d ms", seen[1]["probe"]), seen[1]
    assert seen[1]["probe_detail"] == "connection refused", seen[1]
    assert "connection refused" in seen[1]["change"], seen[1]
    assert seen[1]["change"].startswith("probe: "), seen[1]
    pools = browser.execute_script(POOLS_JS)["app"]
    assert pools["verdict"] == "degraded"
    assert pools["counts"] == "2 of 3 in service"
    assert "1 unhealthy" in pools["bar"]
    # No reload happened: the marker set on the first load is still there.
    assert browser.execute_script("return window.__same_page === true") is True
    assert banner(browser) is None


def test_page_reads_a_token_protected_lbtcp_with_the_token_in_the_fragment(
    browser: WebDriver,
    backends: Backends,
    start_lbtcp: Callable[..., Lbtcp],
) -> None:
    secret = "Zm9v+YmFy/MTIz=="  # base64-like: '+', '/' and '=' must survive the fragment
    ports = [backends.echo()]
    lbtcp = start_lbtcp(live_config(ports, f'token = "{secret}"\nauth_reads = true'))
    host, port = admin_address(lbtcp)
    url = f"http://{host}:{port}/"
    # A browser cannot send a Bearer header when it opens a page, so the page (which holds no
    # data) must be served without the token; the data it reads, /status, needs it.
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            assert answer.read() == PAGE
    except urllib.error.HTTPError as exc:
        pytest.fail(
            f"GET / needs the token under auth_reads (HTTP {exc.code}): no browser can open it"
        )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url + "status", timeout=5)
    assert refused.value.code == 401
    refused.value.close()
    browser.get(url)
    text = wait_dom(
        browser,
        "const e = document.getElementById('error'); return !e.hidden && e.textContent;",
        "the 401 banner",
    )
    assert "HTTP 401" in text
    assert "#token=" in text
    assert rows(browser) == []

    browser.get("about:blank")
    browser.get(url + "#token=" + urllib.request.quote(secret, safe=""))
    wait_dom(
        browser,
        "const r = document.querySelectorAll('details.pool tbody tr');"
        "return r.length === 1 && r[0].getAttribute('data-state') === 'healthy';",
        "the server, healthy",
    )
    assert banner(browser) is None

    # A wrong token is refused and the banner says so.
    browser.get("about:blank")
    browser.get(url + "#token=wrong")
    text = wait_dom(
        browser,
        "const e = document.getElementById('error'); return !e.hidden && e.textContent;",
        "the 401 banner for a wrong token",
    )
    assert "HTTP 401" in text
    assert "was refused" in text


# --- the README screenshot -------------------------------------------------------------------


def screenshot_config(ports: dict[str, list[int]]) -> str:
    """Three listeners and pools, the db pool with a backup, all probed."""
    lines = ["[admin]", 'listen = "127.0.0.1:0"']
    for pool in ports:
        lines += [f"[listeners.{pool}]", 'bind = "127.0.0.1:0"', f'pool = "{pool}"']
    for pool, pool_ports in ports.items():
        balance = "least_connections" if pool == "api" else "round_robin"
        lines += [f"[pools.{pool}]", f'balance = "{balance}"']
        for i, port in enumerate(pool_ports, 1):
            backup = pool == "db" and i == len(pool_ports)
            lines += [
                f"[[pools.{pool}.servers]]",
                f'name = "{pool}-{i}"',
                f'address = "127.0.0.1:{port}"',
                f"weight = {2 if pool == 'web' and i == 1 else 1}",
                f"backup = {'true' if backup else 'false'}",
            ]
        lines.append(HEALTH.replace("pools.app", f"pools.{pool}"))
    return "\n".join(lines) + "\n"


def server_states(base: str) -> dict[str, str]:
    """Server name -> state, from a live /status."""
    with urllib.request.urlopen(f"{base}/status", timeout=5) as answer:
        document = json.load(answer)
    return {s["name"]: s["state"] for pool in document["pools"] for s in pool["servers"]}


def traffic(addresses: list[tuple[str, int]], stop: threading.Event) -> None:
    """Bounded background sessions (at most 600, for at most 20 s) so rates are not zero."""
    deadline = time.monotonic() + 20
    for n in range(600):
        if stop.is_set() or time.monotonic() > deadline:
            return
        with contextlib.suppress(OSError):
            roundtrip(addresses[n % len(addresses)], b"hello")
        stop.wait(0.02)


def test_screenshot_of_a_realistic_state(
    browser: WebDriver,
    backends: Backends,
    start_lbtcp: Callable[..., Lbtcp],
    tmp_path: Path,
) -> None:
    """A real lbtcp with three pools: web degraded (one server drained through the admin API,
    one killed), api and db ok, traffic running. The picture is the README's screenshot."""
    ports = {
        pool: [backends.echo() for _ in range(n)] for pool, n in [("web", 5), ("api", 3), ("db", 2)]
    }
    lbtcp = start_lbtcp(screenshot_config(ports))
    host, port = admin_address(lbtcp)
    base = f"http://{host}:{port}"
    addresses = [lbtcp.address(pool) for pool in ports]
    request = urllib.request.Request(f"{base}/pools/web/servers/web-3/drain", method="POST")
    with urllib.request.urlopen(request, timeout=5) as answer:
        assert answer.status == 200
    backends.stop(ports["web"][3])  # web-4
    expected = {f"{pool}-{i}": "healthy" for pool in ports for i in range(1, len(ports[pool]) + 1)}
    expected.update({"web-3": "draining", "web-4": "unhealthy"})
    # Sessions are opened once the probes have put the servers in service (initial unknown).
    wait_until(lambda: server_states(base) == expected, timeout=15, what="the probes' verdicts")
    live = [open_session(addresses[i % 3]) for i in range(5)]
    stop = threading.Event()
    worker = threading.Thread(target=traffic, args=(addresses, stop), daemon=True)
    worker.start()
    try:
        browser.get(base + "/")
        wait_dom(
            browser,
            'const s = (n) => document.querySelector(`tr[data-server="${n}"]`);'
            "const st = (n) => s(n) && s(n).getAttribute('data-state');"
            "return st('web-3') === 'draining' && st('web-4') === 'unhealthy'"
            " && ['web-1', 'web-2', 'web-5', 'api-1', 'api-2', 'api-3', 'db-1', 'db-2']"
            "    .every((n) => st(n) === 'healthy')"
            " && [...document.querySelectorAll('details.pool tbody tr')]"
            "    .some((tr) => /[1-9]/.test(tr.cells[5].textContent));",
            "the realistic state with rates",
            timeout=20,
        )
        verdicts = {
            name: pool["verdict"] for name, pool in browser.execute_script(POOLS_JS).items()
        }
        assert verdicts == {"web": "degraded", "api": "ok", "db": "ok"}
        assert banner(browser) is None
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(1400, min(int(height) + 140, 1600))
        wait_dom(browser, "return document.getElementById('error').hidden", "a fresh render")
        target = SCREENSHOT if UPDATE_SCREENSHOT else tmp_path / "status-page.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(target))
    finally:
        stop.set()
        worker.join(10)
        for sock in live:
            sock.close()
        browser.set_window_size(1400, 1000)
    data = target.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 20_000  # a rendered page, not a blank one
