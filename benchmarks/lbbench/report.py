"""The report: medians, ratios, markdown tables, the matplotlib chart, notes on the run."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from lbbench.common import AGREEMENT, LOAD_BOUND_SHARE, QUIET_PCT
from lbbench.proxies import Proxy, run_text
from lbbench.scenarios import Runner, Settings, Target, fmt_number, ratio


@dataclass(frozen=True)
class Row:
    """One line of the results table."""

    scenario: str
    metric: str
    key: str
    unit: str
    better: str  # "higher" | "lower" | ""


TABLE = (
    Row("bulk", "throughput", "gbps", "Gbit/s", "higher"),
    Row("rr", "requests/s", "rate", "req/s", "higher"),
    Row("rr", "p99 latency", "p99_ms", "ms", "lower"),
    Row("connect", "connections/s", "rate", "conn/s", "higher"),
    Row("connect", "p99 latency", "p99_ms", "ms", "lower"),
    Row("c2000", "achieved rate", "rate", "req/s", "higher"),
    Row("c2000", "p99 latency", "p99_ms", "ms", "lower"),
    Row("c2000", "errors", "errors", "", "lower"),
    Row("idle_mem", "memory per idle session", "bytes_per_session", "bytes", "lower"),
)
CPU_TABLE = (
    Row("bulk", "proxy CPU per GB", "cpu_ms_per_gb", "ms", "lower"),
    Row("rr", "proxy CPU per request", "cpu_us_per_op", "µs", "lower"),
    Row("connect", "proxy CPU per connection", "cpu_us_per_op", "µs", "lower"),
    *(
        Row(scenario, what, key, "%", "")
        for scenario in ("bulk", "rr", "connect", "c2000")
        for what, key in (
            ("proxy process busy", "cpu_pct"),
            ("proxy core busy, all", "proxy_core_pct"),
            ("load core busy, all", "load_core_pct"),
        )
    ),
)
SCENARIOS = ("idle_mem", "bulk", "rr", "connect", "c2000")


def medians(results: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """{scenario: {target: {metric: median over the successful repeats}}}."""
    grouped: dict[tuple[str, str, str], list[float]] = {}
    for result in results:
        for key, value in result["metrics"].items():
            if isinstance(value, int | float):
                grouped.setdefault((result["scenario"], result["target"], key), []).append(value)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (scenario, target, key), values in grouped.items():
        out.setdefault(scenario, {}).setdefault(target, {})[key] = statistics.median(values)
    return out


def markdown_table(
    rows: Sequence[Row], med: dict[str, dict[str, dict[str, float]]], targets: list[Target]
) -> str:
    """The medians with the ratios of every proxy to HAProxy."""
    names = [t.name for t in targets]
    others = [t for t in targets if t.proxy is not None and t.name != "haproxy"]
    head = ["scenario", "metric", "better"] + [t.label for t in targets]
    if "haproxy" in names:
        head += [f"{t.label} / HAProxy" for t in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        values = [med.get(row.scenario, {}).get(n, {}).get(row.key) for n in names]
        if all(v is None for v in values):
            continue
        unit = f" ({row.unit})" if row.unit else ""
        cells = [row.scenario, row.metric + unit, row.better or "-"]
        cells += [fmt_number(v) for v in values]
        if "haproxy" in names:
            base = med.get(row.scenario, {}).get("haproxy", {}).get(row.key)
            for t in others:
                r = ratio(med.get(row.scenario, {}).get(t.name, {}).get(row.key), base)
                cells.append("-" if r is None or not row.better else f"{r:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart_groups(
    med: dict[str, dict[str, dict[str, float]]], targets: list[Target]
) -> tuple[list[Target], list[tuple[str, list[float | None]]]]:
    """Each proxy's ratio to HAProxy per metric, inverted for lower-is-better metrics so that
    above 1 always means better than HAProxy: (the proxies drawn, [(metric, ratios)])."""
    others = [t for t in targets if t.proxy is not None and t.name != "haproxy"]
    groups: list[tuple[str, list[float | None]]] = []
    for row in TABLE + CPU_TABLE[:3]:
        if row.better == "" or row.key == "errors":
            continue
        base = med.get(row.scenario, {}).get("haproxy", {}).get(row.key)
        bars: list[float | None] = []
        for t in others:
            r = ratio(med.get(row.scenario, {}).get(t.name, {}).get(row.key), base)
            if r is not None and row.better == "lower":
                r = 1 / r if r > 0 else None
            bars.append(r)
        if any(r is not None for r in bars):
            groups.append((f"{row.scenario}: {row.metric}", bars))
    return others, groups


def svg_chart(med: dict[str, dict[str, dict[str, float]]], targets: list[Target]) -> str:
    """A grouped bar chart (matplotlib, SVG text) of each proxy's ratio to HAProxy per metric,
    on a log2 scale; up always means better (lower-is-better ratios inverted)."""
    # Imported here: matplotlib is the `bench` extra, and only the chart needs it.
    import io

    import matplotlib

    matplotlib.use("svg")
    from matplotlib import pyplot

    others, groups = chart_groups(med, targets)
    colors = {"lbtcp": "#3b7dd8", "nginx": "#2a9d5b"}
    figure, axes = pyplot.subplots(figsize=(2.0 + 1.1 * max(1, len(groups)), 5.5))
    width = 0.8 / max(1, len(others))
    for j, target in enumerate(others):
        xs = [i + j * width for i, (_, bars) in enumerate(groups) if bars[j] is not None]
        ys = [bars[j] for _, bars in groups if bars[j] is not None]
        drawn = axes.bar(
            xs,
            [y - 1 for y in ys],  # type: ignore[operator]
            width,
            bottom=1,
            color=colors.get(target.name, "#888"),
            label=f"{target.label} / HAProxy",
        )
        axes.bar_label(drawn, labels=[f"{y:.2f}" for y in ys], fontsize=7)  # type: ignore[arg-type]
    axes.set_yscale("log", base=2)
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_xticks(
        [i + width * (len(others) - 1) / 2 for i in range(len(groups))],
        [title for title, _ in groups],
        rotation=40,
        ha="right",
        fontsize=8,
    )
    axes.set_title(
        "Each proxy relative to HAProxy (1 = same, above = better; log scale)\n"
        "lower-is-better metrics inverted: bar = HAProxy / proxy",
        fontsize=9,
    )
    axes.legend(fontsize=8)
    figure.tight_layout()
    out = io.StringIO()
    figure.savefig(out, format="svg")
    pyplot.close(figure)
    return out.getvalue()


def machine_info(proxies: list[Proxy]) -> dict[str, str]:
    """What the numbers were measured on."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": pkg_version("uvloop"),
        "lbtcp": pkg_version("lbtcp"),
    }
    for proxy in proxies:
        if proxy.name != "lbtcp":
            info[proxy.name] = proxy.version()
    for tool, argv in (("iperf3", ["iperf3", "--version"]), ("wrk", ["wrk", "--version"])):
        if shutil.which(tool):
            info[tool] = run_text(argv).splitlines()[0]
    with contextlib.suppress(OSError):
        info["load average at start"] = Path("/proc/loadavg").read_text().split(" ")[0]
    return info


def pkg_version(name: str) -> str:
    """An installed distribution's version, or 'not installed'."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def write_report(
    out_dir: Path,
    prefix: str,
    *,
    info: dict[str, str],
    command: str,
    settings: Settings,
    targets: list[Target],
    skipped: list[str],
    runner: Runner,
    cross: list[dict[str, Any]],
    pinning: str,
    started: str,
) -> Path:
    """Write PREFIX.md, PREFIX.svg and PREFIX.json; returns the markdown's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    med = medians(runner.results)
    data = {
        "started": started,
        "machine": info,
        "command": command,
        "settings": settings.__dict__,
        "pinning": pinning,
        "targets": [t.name for t in targets],
        "skipped": skipped,
        "medians": med,
        "runs": runner.results,
        "crosscheck": cross,
    }
    (out_dir / f"{prefix}.json").write_text(json.dumps(data, indent=2) + "\n")
    try:
        (out_dir / f"{prefix}.svg").write_text(svg_chart(med, targets))
    except ImportError:  # the chart is the only part that needs matplotlib
        print(
            "run.py: no chart: matplotlib is missing (scripts/setup-venv bench installs it)",
            file=sys.stderr,
        )
    md = [
        "# lbtcp vs HAProxy vs nginx",
        "",
        f"Run {started}. Reproduce with:",
        "",
        "```sh",
        "benchmarks/install-tools   # once: haproxy, nginx + stream module, iperf3, wrk",
        command,
        "```",
        "",
        "## Machine",
        "",
    ]
    md += [f"- {k}: {v}" for k, v in info.items()]
    md += [f"- pinning: {pinning}"]
    md += [
        "",
        f"Each number is the median of {settings.repeats} run(s) of {settings.duration:g} s "
        f"(after {settings.warmup:g} s of warm-up), the targets interleaved within each "
        "repeat. `direct` is the load generator talking to the backends with no proxy: the "
        "ceiling of the load core.",
        "",
    ]
    if skipped:
        md += ["Skipped:", ""] + [f"- {s}" for s in skipped] + [""]
    md += quietness_notes(runner.results)
    md += [
        "## Results",
        "",
        markdown_table(TABLE, med, targets),
        "",
        "Ratios are proxy / HAProxy for the same metric: above 1 is better for a 'higher' "
        "metric, below 1 is better for a 'lower' one (latency, errors, memory).",
        "",
        f"![ratios to HAProxy]({prefix}.svg)",
        "",
        "## Proxy CPU",
        "",
        "Sampled from /proc while the load ran (medians of 0.5 s windows). 'Proxy process "
        "busy' is the proxy's own CPU time (nginx: its worker) as a share of one core: near "
        "100 % the proxy was the bottleneck; well below, something else was (the load core, "
        "or other processes on the proxy's core), and throughput ratios then understate the "
        "faster proxy's lead. 'Proxy core busy, all' counts everything on that core (other "
        "processes, the loopback's softirq work): far above the proxy's own share means the "
        "machine was not quiet. CPU per operation is the proxy's CPU time divided by the work "
        "done; it compares efficiency when the proxies ran at similar load (at light load, "
        "event loops batch less and every operation costs more).",
        "",
        markdown_table(CPU_TABLE, med, targets),
        "",
    ]
    md += load_bound_notes(med, targets)
    md += crosscheck_section(cross, targets)
    failed = [r for r in runner.results if r["error"]]
    with_errors = [r for r in runner.results if r["metrics"].get("errors")]
    md += ["## Failures and errors", ""]
    if not failed and not with_errors:
        md += ["None: every run completed with 0 errors.", ""]
    for r in failed:
        md.append(f"- {r['scenario']} / {r['target']} repeat {r['repeat']}: {r['error']}")
    for r in with_errors:
        errs = r["raw"].get("errors", {})
        kinds = ", ".join(f"{k} {v}" for k, v in errs.items() if v)
        md.append(
            f"- {r['scenario']} / {r['target']} repeat {r['repeat']}: "
            f"{r['metrics']['errors']} errors ({kinds})"
        )
    md.append("")
    path = out_dir / f"{prefix}.md"
    path.write_text("\n".join(md))
    return path


def quietness_notes(results: list[dict[str, Any]]) -> list[str]:
    """How busy other processes kept the proxy core, measured while nothing of ours ran there.

    During the ``direct`` runs no proxy runs on the proxy core and the loopback work is
    charged to the load core (the sender's), so whatever kept the proxy core busy then was
    someone else.
    """
    others = [
        r["metrics"]["proxy_core_pct"]
        for r in results
        if r["target"] == "direct" and "proxy_core_pct" in r["metrics"]
    ]
    if not others:
        return []
    busy = statistics.median(others)
    line = (
        f"Quietness: while `direct` ran (nothing of this benchmark on the proxy core), other "
        f"processes kept the proxy core {busy:.0f} % busy (median of {len(others)} runs; "
        f"max {max(others):.0f} %)."
    )
    if busy <= QUIET_PCT:
        return [line, ""]
    return [
        f"**Warning: the machine was not quiet.** {line} The proxies shared their core with "
        "that load (each then gets about its fair share of the core, whatever it needs), so "
        "absolute rates are low and noisy; ratios between the interleaved proxies and CPU per "
        "operation hold up better. Re-run on a quiet machine for numbers to quote.",
        "",
    ]


def load_bound_notes(
    med: dict[str, dict[str, dict[str, float]]], targets: list[Target]
) -> list[str]:
    """Flag results that reach the no-proxy ceiling (the load core was the limit)."""
    notes = []
    for scenario, key in (("bulk", "gbps"), ("rr", "rate"), ("connect", "rate")):
        ceiling = med.get(scenario, {}).get("direct", {}).get(key)
        if not ceiling:
            continue
        for t in targets:
            value = med.get(scenario, {}).get(t.name, {}).get(key)
            if t.proxy is not None and value and value >= LOAD_BOUND_SHARE * ceiling:
                notes.append(
                    f"- {scenario}: {t.label} reached {value / ceiling:.0%} of the no-proxy "
                    "ceiling: the load core was (nearly) the limit, so this proxy could do more."
                )
    if not notes:
        return []
    return ["## Where the load side was the limit", "", *notes, ""]


def crosscheck_section(cross: list[dict[str, Any]], targets: list[Target]) -> list[str]:
    """The side-by-side table of lbtcp bench and the independent tools."""
    if not cross:
        return []
    labels = {t.name: t.label for t in targets}
    lines = [
        "## Cross-check: lbtcp bench vs independent tools",
        "",
        "Through the same proxy, in ABBA order (bench, tool, tool, bench: the means are "
        "compared, so steady drift cancels), bytes matched: iperf3 with 64 KiB writes vs "
        "`lbtcp bench --mode stream --size 64KiB` into the sink; wrk with requests and "
        "responses padded to 64 bytes (HTTP responder `benchmarks/httpd.py`) vs `lbtcp bench` "
        "rr/connect with 64-byte echo messages, same connection counts. They should agree "
        f"within {AGREEMENT:.0%} when the proxy is the bottleneck.",
        "",
        "| through | scenario | lbtcp bench | independent tool | bench / tool | agree | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in cross:
        who = labels.get(row["target"], row["target"])
        if "error" in row:
            lines.append(f"| {who} | {row['scenario']} | - | - | - | - | failed: {row['error']} |")
            continue
        agree = "yes" if row["agree"] else "NO"
        lines.append(
            f"| {who} | {row['scenario']} | {fmt_number(row['bench'])} {row['metric']} | "
            f"{row['tool']} {fmt_number(row['other'])} {row['metric']} | "
            f"{fmt_number(row['ratio'])} | {agree} | {row['note']} |"
        )
    lines.append("")
    disagree = [r for r in cross if r.get("agree") is False]
    if disagree:
        direct = {
            r["scenario"]: r["ratio"] for r in cross if r["target"] == "direct" and r.get("ratio")
        }
        lines += [
            "Why they can disagree: (1) the load side. wrk and iperf3 (C) cost less per "
            "exchange on the load core than lbtcp bench with the Python echo/sink; wherever the "
            "load core, not the proxy, sets the pace, that difference shows. The `direct` row "
            "measures it with no proxy at all. (2) The exchanges differ in detail: in wrk's "
            "connect form the server closes first (`Connection: close`), in lbtcp bench's the "
            "client does, so a proxy handles the FINs in a different order; HTTP adds nothing "
            "a layer-4 proxy sees but bytes, and those are matched. (3) Noise from other "
            "processes: the per-run values show it (ABBA cancels only steady drift).",
            "",
        ]
        for row in disagree:
            who = labels.get(row["target"], row["target"])
            base = direct.get(row["scenario"])
            runs = row["runs"]
            values = (
                f"bench {', '.join(fmt_number(v) for v in runs['bench'])}; "
                f"{row['tool']} {', '.join(fmt_number(v) for v in runs['tool'])}"
            )
            if row["target"] == "direct":
                why = "the tools' own difference on the load core (no proxy in the path)"
            elif base and abs(row["ratio"] / base - 1) <= AGREEMENT:
                why = (
                    f"about the tools' own difference measured directly ({base:.2f}); "
                    f"with that taken out they agree ({row['ratio'] / base:.2f})"
                )
            else:
                why = "not the tools' own difference" + (f" (direct: {base:.2f})" if base else "")
            lines.append(
                f"- {who}, {row['scenario']}: bench / {row['tool']} = {row['ratio']:.2f}, "
                f"{why}. Per run: {values}."
            )
        lines.append("")
    return lines


# ---------------------------------------------------------------------------- main
