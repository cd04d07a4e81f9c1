"""examples/alerts.yml: promtool accepts it, its unit tests pass and bite, and it only speaks
of metrics, labels and label values that lbtcp has.

promtool is the real peer here (Debian's ``prometheus`` package, installed by
scripts/install-test-deps); without it these tests fail, they do not skip. The mutation
tests prove that the promtool cases in tests/alerts/ are not vacuous: each alert's firing
cases fail once the rule is gone, and its quiet cases fail once the rule fires on every series
it reads.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from lbtcp.listener import REFUSAL_REASONS
from lbtcp.metrics import CONNECT_FAILURE_KINDS, SERVER_STATES
from lbtcp.resolution import QUERY_RESULTS
from tests.dns_server import DOMAIN as DNS_DOMAIN
from tests.dns_server import Dnsmasq
from tests.support import REPO, Backends, Lbtcp, closed_port, open_session, roundtrip, wait_until

RULES = REPO / "examples" / "alerts.yml"
UNIT_TESTS = sorted((REPO / "tests" / "alerts").glob("*_test.yml"))
DESIGN = REPO.parent / "shared" / "DESIGN.md"

# Metrics the rules need that DESIGN.md §7 does not list yet: the listener's configured limit
# (0 = unlimited), without which "near max_connections" cannot be expressed.
NOT_YET_IN_DESIGN = {"listener_max_connections"}
NOT_YET_IN_DESIGN_METRICS = {f"lbtcp_{name}" for name in NOT_YET_IN_DESIGN}
# Prometheus' own series for each scrape target: 1 if the scrape worked.
PROMETHEUS_SERIES = {"up"}
# The scrape job the rules assume (examples/alerts.yml's header says so).
JOB = "lbtcp"

SEVERITIES = {"critical", "warning", "info"}
LABEL_NAMES = {
    "job",
    "instance",
    "listener",
    "pool",
    "server",
    "reason",
    "state",
    "result",
    "kind",
    "name",
    "version",
}
# PromQL words that are not metric names.
PROMQL_WORDS = {
    "sum",
    "rate",
    "increase",
    "changes",
    "absent",
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "bool",
    "vector",
}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is missing: it is in Debian's 'prometheus' package, which "
            "scripts/install-test-deps installs (scripts/test-deps.txt)"
        )
    return path


def run_promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )


def load_rules(path: Path = RULES) -> list[dict[str, Any]]:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def alert_names() -> list[str]:
    return [rule["alert"] for rule in load_rules()]


def load_unit_tests() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, yaml.safe_load(path.read_text(encoding="utf-8"))) for path in UNIT_TESTS]


def design_metric_names() -> set[str]:
    """The metric names of DESIGN.md §7's list (the paragraph before "Meanings")."""
    text = DESIGN.read_text(encoding="utf-8")
    section = text.split("## 7.", 1)[1].split("\n## ", 1)[0]
    listing = section.split("Meanings:", 1)[0]
    names = set()
    for token in re.findall(r"`([a-z_*]+)(?:\{[a-z_]+\})?`", listing):
        if not token.endswith("*"):  # process_*: the library's, not ours
            names.add(token)
    return names


def strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads: identifiers outside label matchers, label lists,
    ranges and strings that are not PromQL words."""
    text = strip_strings(expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", text)  # label lists
    identifiers = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text))
    return identifiers - PROMQL_WORDS


def matchers(expr: str) -> list[tuple[str, str, str, str]]:
    """(metric, label, operator, value) for every label matcher of ``expr``."""
    found = []
    for metric, body in re.findall(r"([A-Za-z_:][A-Za-z0-9_:]*)\{([^}]*)\}", expr):
        for label, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', body):
            found.append((metric, label, op, value))
    return found


def label_lists(expr: str) -> set[str]:
    names: set[str] = set()
    for body in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", strip_strings(expr)):
        names |= {part.strip() for part in body.split(",") if part.strip()}
    return names


# --- promtool --------------------------------------------------------------------------------


def test_promtool_check_rules_accepts_the_file() -> None:
    result = run_promtool("check", "rules", "--lint=all", "--lint-fatal", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(load_rules())} rules found" in result.stdout, result.stdout


def test_promtool_unit_tests_pass() -> None:
    assert UNIT_TESTS, "no promtool unit tests in tests/alerts/"
    result = run_promtool("test", "rules", *(str(p) for p in UNIT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(UNIT_TESTS), result.stdout


def test_promtool_rejects_a_broken_rule_file(tmp_path: Path) -> None:
    """The check above can fail: a rule with a syntax error is refused."""
    broken = tmp_path / "alerts.yml"
    broken.write_text(RULES.read_text(encoding="utf-8").replace("== 0", "== = 0", 1), "utf-8")
    result = run_promtool("check", "rules", str(broken))
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr


# --- every alert: tested both ways, and the tests bite ---------------------------------------


def cases_by_alert() -> dict[str, dict[str, int]]:
    """For each alert name, how many promtool cases expect it to fire, and how many expect
    it quiet."""
    counts: dict[str, dict[str, int]] = {}
    for _path, document in load_unit_tests():
        for test in document["tests"]:
            for case in test.get("alert_rule_test", []):
                kind = "firing" if case.get("exp_alerts") else "quiet"
                entry = counts.setdefault(case["alertname"], {"firing": 0, "quiet": 0})
                entry[kind] += 1
    return counts


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    counts = cases_by_alert()
    for name in alert_names():
        assert counts.get(name, {}).get("firing", 0) >= 1, f"{name}: no case where it fires"
        assert counts.get(name, {}).get("quiet", 0) >= 1, f"{name}: no case where it is quiet"
    unknown = set(counts) - set(alert_names())
    assert not unknown, f"promtool cases for alerts that do not exist: {sorted(unknown)}"


def write_suite(tmp_path: Path, rules: list[dict[str, Any]], keep: str, firing: bool) -> Path:
    """Copies of the rules (as given) and of the unit tests, reduced to ``keep``'s cases that
    expect it firing (or quiet)."""
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    document["groups"] = [{"name": "lbtcp", "rules": rules}]
    tmp_path.mkdir()
    rules_path = tmp_path / "alerts.yml"
    rules_path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    tests = []
    evaluation = None
    for _path, unit in load_unit_tests():
        for test in unit["tests"]:
            cases = [
                case
                for case in test.get("alert_rule_test", [])
                if case["alertname"] == keep and bool(case.get("exp_alerts")) == firing
            ]
            if cases:
                reduced = copy.deepcopy(test)
                reduced["alert_rule_test"] = cases
                # promtool has one evaluation interval per file: carry it on the test's own.
                evaluation = unit.get("evaluation_interval", "1m")
                tests.append((reduced, evaluation))
    assert tests, f"no {'firing' if firing else 'quiet'} case for {keep}"
    paths = []
    for number, (test, evaluation) in enumerate(tests):
        path = tmp_path / f"{keep}-{number}_test.yml"
        unit = {
            "rule_files": [str(rules_path)],
            "evaluation_interval": evaluation,
            "tests": [test],
        }
        path.write_text(yaml.safe_dump(unit, sort_keys=False), encoding="utf-8")
        paths.append(path)
    return tmp_path


def run_reduced(directory: Path) -> subprocess.CompletedProcess[str]:
    return run_promtool("test", "rules", *(str(p) for p in sorted(directory.glob("*_test.yml"))))


@pytest.mark.parametrize("alert", alert_names())
def test_firing_cases_need_the_rule(alert: str, tmp_path: Path) -> None:
    """With the alert's rule removed, its firing cases fail (and pass with it)."""
    rules = load_rules()
    intact = write_suite(tmp_path / "intact", rules, alert, firing=True)
    assert run_reduced(intact).returncode == 0
    without = [rule for rule in rules if rule["alert"] != alert]
    mutated = write_suite(tmp_path / "without", without, alert, firing=True)
    result = run_reduced(mutated)
    assert result.returncode != 0, f"{alert}'s firing cases pass without the rule"
    assert f"alertname: {alert}" in result.stdout + result.stderr


@pytest.mark.parametrize("alert", alert_names())
def test_quiet_cases_catch_a_rule_that_fires_on_everything(alert: str, tmp_path: Path) -> None:
    """With the alert's expression replaced by every series it reads (same ``for``), at least
    one of its quiet cases fails (and they all pass with the real rule)."""
    rules = load_rules()
    intact = write_suite(tmp_path / "intact", rules, alert, firing=False)
    assert run_reduced(intact).returncode == 0
    mutated_rules = copy.deepcopy(rules)
    for rule in mutated_rules:
        if rule["alert"] == alert:
            names = "|".join(sorted(metric_names(rule["expr"])))
            rule["expr"] = f'{{__name__=~"{names}"}}'
    mutated = write_suite(tmp_path / "everything", mutated_rules, alert, firing=False)
    result = run_reduced(mutated)
    assert result.returncode != 0, f"{alert}'s quiet cases pass with a rule that always fires"


# --- the rules speak lbtcp's metrics -------------------------------------------------------


def test_design_lists_the_metrics_the_parser_expects() -> None:
    """The §7 parser finds DESIGN.md's names (else the name check below would be empty)."""
    names = design_metric_names()
    assert {"server_up", "pool_healthy_servers", "listener_refused_total"} <= names
    assert "config_last_reload_successful" in names
    assert not any(name.startswith("process_") for name in names)


def test_every_metric_in_the_rules_is_one_design_names() -> None:
    allowed = design_metric_names() | NOT_YET_IN_DESIGN
    used: set[str] = set()
    for rule in load_rules():
        for name in metric_names(rule["expr"]):
            used.add(name)
            if name in PROMETHEUS_SERIES:
                continue
            assert name.startswith("lbtcp_"), f"{rule['alert']}: {name} is not lbtcp's"
            assert name.removeprefix("lbtcp_") in allowed, (
                f"{rule['alert']}: {name} is not a metric of DESIGN.md §7"
            )
    # The extraction works: the rules read these at least.
    assert {"lbtcp_server_up", "lbtcp_pool_healthy_servers", "up"} <= used


def test_the_name_check_can_fail() -> None:
    assert metric_names('rate(lbtcp_server_bytes_total{pool="a"}[5m]) > 0') == {
        "lbtcp_server_bytes_total"
    }
    assert "lbtcp_server_bytes_total".removeprefix("lbtcp_") not in design_metric_names()


def test_labels_and_label_values_are_lbtcps() -> None:
    values = {
        "reason": set(REFUSAL_REASONS),
        "state": set(SERVER_STATES),
        "result": set(QUERY_RESULTS),
        "kind": set(CONNECT_FAILURE_KINDS),
        "job": {JOB},
    }
    seen = set()
    for rule in load_rules():
        expr = rule["expr"]
        assert label_lists(expr) <= LABEL_NAMES, rule["alert"]
        for metric, label, op, value in matchers(expr):
            assert label in LABEL_NAMES, f"{rule['alert']}: label {label} on {metric}"
            assert label in values, f"{rule['alert']}: no known values for {label}"
            alternatives = value.split("|") if op in ("=~", "!~") else [value]
            for alternative in alternatives:
                assert alternative in values[label], (
                    f"{rule['alert']}: {metric}{{{label}{op}{value!r}}}: {alternative!r} is "
                    f"not one of lbtcp's values {sorted(values[label])}"
                )
            seen.add((label, value))
    assert ("reason", "no_healthy") in seen
    assert ("result", "ok") in seen
    assert ("state", "draining|disabled") in seen


def test_every_alert_has_a_severity_and_says_what_to_check() -> None:
    names = alert_names()
    assert len(names) == len(set(names)), "duplicate alert names"
    for rule in load_rules():
        assert rule["alert"].startswith("Lbtcp"), rule["alert"]
        assert rule.get("labels", {}).get("severity") in SEVERITIES, rule["alert"]
        annotations = rule.get("annotations", {})
        assert annotations.get("summary"), rule["alert"]
        description = annotations.get("description", "")
        assert "First check" in description, f"{rule['alert']}: no first thing to check"
        causes = ("overload", "config", "network", "DNS", "dns")
        assert any(cause in description for cause in causes), (
            f"{rule['alert']}: names no likely cause"
        )


# --- the rules on a real lbtcp's metrics -----------------------------------------------------

TARGET = {"job": JOB, "instance": "lb1:9900"}
FAST_HEALTH = """\
interval = "100ms"
fast_interval = "50ms"
down_interval = "100ms"
timeout = "500ms"
rise = 1
fall = 1
initial = "healthy"
"""


def http(address: tuple[str, int], method: str, path: str) -> tuple[int, str]:
    url = f"http://{address[0]}:{address[1]}{path}"
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(address: tuple[str, int], names: set[str] | None = None) -> Samples:
    """lbtcp's /metrics as {(sample name, sorted labels): value}, parsed by prometheus_client.
    ``names`` collects the sample names each family declares, with samples or without."""
    status, body = http(address, "GET", "/metrics")
    assert status == 200, body
    samples = {}
    for family in text_string_to_metric_families(body):
        if names is not None:
            names.add(f"{family.name}_total" if family.type == "counter" else family.name)
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), math.nan)


def series_text(name: str, labels: dict[str, str]) -> str:
    inner = ", ".join(f'{key}="{val}"' for key, val in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def admin_address(proc: Lbtcp) -> tuple[str, int]:
    line = proc.wait_line(r"\badmin_listening\b")
    match = re.search(r"address=([0-9.]+):(\d+)", line)
    assert match, line
    return match.group(1), int(match.group(2))


def number(x: float) -> str:
    text = repr(float(x))
    assert "e" not in text and "n" not in text, f"value {x} needs another notation"
    return text


def test_the_rules_fire_on_a_real_lbtcps_metrics(
    backends: Backends, start_lbtcp: Callable[..., Lbtcp], tmp_path: Path
) -> None:
    """A live ``lbtcp serve``: pool app loses two of its three servers (one of them drained by
    an operator first), pool dead has nothing that listens, three clients of listener dead are
    refused. Its scrapes, replayed into promtool as a target's series, fire exactly the alerts
    that state should fire, with lbtcp's real label values; the others stay quiet."""
    a, b, c = backends.echo(), backends.echo(), backends.echo()
    proc = start_lbtcp(
        f"""\
[global]
access_log = false
[admin]
listen = "127.0.0.1:0"
[listeners.web]
bind = "127.0.0.1:0"
pool = "app"
max_connections = 2
[listeners.dead]
bind = "127.0.0.1:0"
pool = "dead"
[pools.app]
[pools.app.health]
{FAST_HEALTH}
[[pools.app.servers]]
address = "127.0.0.1:{a}"
name = "a"
[[pools.app.servers]]
address = "127.0.0.1:{b}"
name = "b"
[[pools.app.servers]]
address = "127.0.0.1:{c}"
name = "c"
[pools.dead]
[pools.dead.health]
{FAST_HEALTH}
[[pools.dead.servers]]
address = "127.0.0.1:{closed_port()}"
name = "gone"
"""
    )
    admin = admin_address(proc)
    web, dead = proc.address("web"), proc.address("dead")

    status, body = http(admin, "POST", "/pools/app/servers/c/drain")
    assert status == 200, body
    backends.stop(b)
    backends.stop(c)

    def settled() -> bool:
        now = scrape(admin)
        return (
            value(now, "lbtcp_server_up", pool="app", server="b") == 0
            and value(now, "lbtcp_server_up", pool="app", server="c") == 0
            and value(now, "lbtcp_server_up", pool="dead", server="gone") == 0
            and value(now, "lbtcp_server_state", pool="app", server="c", state="draining") == 1
        )

    wait_until(settled, what="b, c and gone out of service, c draining")
    # A live session on a (the one left), under web's max_connections of 2.
    with open_session(web):
        before = scrape(admin)
        for _ in range(3):
            assert roundtrip(dead, b"hello") == b""
        wait_until(
            lambda: (
                value(
                    scrape(admin),
                    "lbtcp_listener_refused_total",
                    listener="dead",
                    reason="no_healthy",
                )
                == 3
            ),
            what="3 no_healthy refusals counted",
        )
        exposed: set[str] = set()
        after = scrape(admin, exposed)

    # The rules read only these names; every one of them is in the real exposition (the
    # listener's limit is checked by the limit test below).
    missing = rule_metrics() - NOT_YET_IN_DESIGN_METRICS - exposed
    assert not missing, f"read by the rules but not exposed: {sorted(missing)}"
    assert_alerts_on_replay(
        tmp_path,
        before,
        after,
        # 2 m 15 s: past every `for` of these alerts, and the refusals (between the scrapes,
        # replayed at 90 s) still in LbtcpNoHealthyRefusals' one-minute window.
        step_at=6,
        eval_time="2m15s",
        expected=[
            alert("LbtcpPoolEmpty", "critical", pool="dead"),
            alert("LbtcpPoolDegraded", "warning", pool="app"),
            alert("LbtcpServerDown", "warning", pool="app", server="b"),
            alert("LbtcpServerDown", "warning", pool="dead", server="gone"),
            alert("LbtcpNoHealthyRefusals", "critical", listener="dead", reason="no_healthy"),
        ],
    )


def test_the_limit_rule_fires_on_a_real_lbtcps_metrics(
    backends: Backends, start_lbtcp: Callable[..., Lbtcp], tmp_path: Path
) -> None:
    """A live ``lbtcp serve`` whose listener web holds 2 sessions of its max_connections = 2,
    and whose listener open (no limit) holds 3: LbtcpListenerNearConnectionLimit fires for web
    alone, and nothing else fires. Needs lbtcp_listener_max_connections in /metrics."""
    echo = backends.echo()
    proc = start_lbtcp(
        f"""\
[global]
access_log = false
[admin]
listen = "127.0.0.1:0"
[listeners.web]
bind = "127.0.0.1:0"
pool = "app"
max_connections = 2
[listeners.open]
bind = "127.0.0.1:0"
pool = "app"
[pools.app]
[[pools.app.servers]]
address = "127.0.0.1:{echo}"
name = "a"
"""
    )
    admin = admin_address(proc)
    web, unlimited = proc.address("web"), proc.address("open")
    with contextlib.ExitStack() as held:
        for address in (web, web, unlimited, unlimited, unlimited):
            held.enter_context(open_session(address))
        wait_until(
            lambda: value(scrape(admin), "lbtcp_listener_active_connections", listener="web") == 2,
            what="web's two sessions counted",
        )
        exposed: set[str] = set()
        now = scrape(admin, exposed)
    assert exposed >= NOT_YET_IN_DESIGN_METRICS, (
        "lbtcp_listener_max_connections is not in /metrics: LbtcpListenerNearConnectionLimit "
        "cannot fire (lbtcp.metrics must expose each listener's max_connections, 0 = unlimited)"
    )
    assert value(now, "lbtcp_listener_max_connections", listener="web") == 2
    assert value(now, "lbtcp_listener_max_connections", listener="open") == 0
    assert_alerts_on_replay(
        tmp_path,
        now,
        now,
        step_at=1,
        eval_time="3m",
        expected=[alert("LbtcpListenerNearConnectionLimit", "warning", listener="web")],
    )


def test_the_dns_rules_fire_on_a_real_lbtcps_metrics(
    start_lbtcp: Callable[..., Lbtcp], dns_servers: Callable[..., Dnsmasq], tmp_path: Path
) -> None:
    """A live ``lbtcp serve`` whose only server name gets NXDOMAIN from a real dnsmasq: its
    failed lookups (two scrapes, a retry apart) fire LbtcpDnsFailing for that name with
    lbtcp's real labels, and LbtcpPoolEmpty for the pool it leaves empty."""
    dns = dns_servers(hosts={f"other.{DNS_DOMAIN}": ["127.0.0.1"]})
    proc = start_lbtcp(
        f"""\
[global]
access_log = false
[admin]
listen = "127.0.0.1:0"
[resolver]
nameservers = ["{dns.nameserver}"]
timeout = "1s"
[listeners.web]
bind = "127.0.0.1:0"
pool = "app"
[pools.app]
[[pools.app.servers]]
address = "missing.{DNS_DOMAIN}:80"
"""
    )
    admin = admin_address(proc)

    def failures(samples: Samples) -> float:
        return sum(
            v
            for (name, labels), v in samples.items()
            if name == "lbtcp_dns_queries_total" and dict(labels).get("result") != "ok"
        )

    wait_until(lambda: failures(scrape(admin)) >= 1, what="the first failed lookup counted")
    before = scrape(admin)
    wait_until(
        lambda: failures(scrape(admin)) > failures(before), what="the retry's failure counted"
    )
    exposed: set[str] = set()
    after = scrape(admin, exposed)
    names = {dict(labels)["name"] for name, labels in after if name == "lbtcp_dns_queries_total"}
    assert len(names) == 1, names
    (queried,) = names
    assert f"missing.{DNS_DOMAIN}" in queried
    assert_alerts_on_replay(
        tmp_path,
        before,
        after,
        # The ratio exists from the step (30 s) on: 2 minutes of `for` later, it fires.
        step_at=2,
        eval_time="3m",
        expected=[
            alert("LbtcpDnsFailing", "warning", name=queried),
            alert("LbtcpPoolEmpty", "critical", pool="app"),
        ],
    )


def test_the_reload_rule_fires_on_a_real_lbtcps_failed_reload(
    start_lbtcp: Callable[..., Lbtcp], tmp_path: Path
) -> None:
    """A live ``lbtcp serve`` reloaded (SIGHUP) with a config that has an unknown key:
    LbtcpReloadFailed fires, and nothing else; reloaded again with the key gone, it clears."""
    text = """\
[admin]
listen = "127.0.0.1:0"
[listeners.web]
bind = "127.0.0.1:0"
pool = "app"
[pools.app]
[[pools.app.servers]]
address = "127.0.0.1:9"
"""
    proc = start_lbtcp(text)
    admin = admin_address(proc)
    good = scrape(admin)
    assert value(good, "lbtcp_config_last_reload_successful") == 1

    def reload(config: str, successful: int, count: int) -> Samples:
        """Write ``config``, SIGHUP, and wait for the ``count``-th reload to be counted."""
        proc.config_path.write_text(config, encoding="utf-8")
        proc.signal(signal.SIGHUP)

        def counted() -> bool:
            now = scrape(admin)
            done = value(now, "lbtcp_config_reloads_total", result="failure") + value(
                now, "lbtcp_config_reloads_total", result="success"
            )
            return done >= count

        wait_until(counted, what=f"reload {count} counted")
        now = scrape(admin)
        assert value(now, "lbtcp_config_last_reload_successful") == successful
        return now

    failed = reload(text + "bogus = 1\n", successful=0, count=1)
    fixed = reload(text, successful=1, count=2)
    assert_alerts_on_replay(
        tmp_path / "failed",
        good,
        failed,
        step_at=2,
        eval_time="1m",
        expected=[alert("LbtcpReloadFailed", "warning")],
    )
    assert_alerts_on_replay(
        tmp_path / "fixed", failed, fixed, step_at=2, eval_time="1m", expected=[]
    )


def rule_metrics() -> set[str]:
    """The lbtcp metric names the rules read."""
    names: set[str] = set().union(*(metric_names(rule["expr"]) for rule in load_rules()))
    return names - PROMETHEUS_SERIES


def alert(alertname: str, severity: str, **labels: str) -> dict[str, Any]:
    """An ``ALERTS`` sample of a firing alert of the replayed target."""
    full = {"alertname": alertname, "alertstate": "firing", "severity": severity}
    full.update(TARGET, **labels)
    return {"labels": series_text("ALERTS", full), "value": 1}


def assert_alerts_on_replay(
    tmp_path: Path,
    before: Samples,
    after: Samples,
    *,
    step_at: int,
    eval_time: str,
    expected: list[dict[str, Any]],
) -> None:
    """Replay two scrapes as one target scraped every 15 s (``before`` for the first
    ``step_at`` samples, ``after`` from then on, 30 samples in all) into promtool with the
    rules, and check that exactly ``expected`` alerts fire at ``eval_time``."""
    samples = 30
    input_series = [{"series": series_text("up", TARGET), "values": f"1x{samples - 1}"}]
    used = rule_metrics()
    for key in sorted(set(before) | set(after)):
        name, labels = key
        if name not in used:
            continue
        first = number(before[key]) if key in before else "_"
        last = number(after[key]) if key in after else "_"
        input_series.append(
            {
                "series": series_text(name, {**dict(labels), **TARGET}),
                "values": f"{first}x{step_at - 1} {last}x{samples - step_at - 1}",
            }
        )
    unit = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "15s",
        "tests": [
            {
                "name": "a live lbtcp's scrapes",
                "interval": "15s",
                "input_series": input_series,
                "promql_expr_test": [
                    {
                        "expr": 'ALERTS{alertstate="firing"}',
                        "eval_time": eval_time,
                        "exp_samples": expected,
                    }
                ],
            }
        ],
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "live_test.yml"
    path.write_text(yaml.safe_dump(unit, sort_keys=False), encoding="utf-8")
    result = run_promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
