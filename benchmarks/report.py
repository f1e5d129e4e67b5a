"""The benchmark's report: `results.md` (tables, verdicts) and the plots, from `results.json`.

`write(results, out)` renders everything from the one results dict `benchmarks.run` saves, so a
report can be re-rendered from an old `results.json`:

    python -m benchmarks.report results/bench-<...>/results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from loadtests import environment

PLOTS = ("throughput_vs_concurrency.png", "latency_percentiles.png", "capacity.png")


def _num(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:.0%}"


def verdict(target: dict[str, Any]) -> str:
    """PASS, MISS or NOT RUN (a report-only target: REPORTED when its figure was verified)."""
    if target.get("passed") is None:
        return "NOT RUN"
    if target.get("report_only"):
        return "**REPORTED** (verified)" if target["passed"] else "**MISS** (no rate verified)"
    return "**PASS**" if target["passed"] else "**MISS**"


def targets_table(results: dict[str, Any]) -> str:
    """One row per target: what was asked, what was measured, the ratio, the verdict."""
    lines = [
        "| # | comparison | target | measured | ratio | verdict | generator CPU share |",
        "| ---: | --- | --- | --- | ---: | --- | ---: |",
    ]
    for t in results["targets"]:
        generator = t.get("generator", "kiln load generator")
        lines.append(
            f"| {t['number']} | {t['title']} | {t['target']} | {t['measured']} | "
            f"{_num(t.get('ratio'), 2)} | {verdict(t)} | {_pct(t.get('generator_cpu'))} ({generator}) |"
        )
        extra = t.get("extra") or {}
        if t["number"] == 2 and extra.get("fp32_ratio") is not None:
            p99s = f"kiln FP32 p99 {_num(extra.get('p99_kiln_fp32_ms'))} ms, baseline p99 "
            p99s += f"{_num(extra.get('p99_baseline_ms'))} ms"
            lines.append(
                f"| 2' | FP32 against FP32 (the serving gain alone) | reported | {p99s} | "
                f"{_num(extra['fp32_ratio'], 2)} | REPORTED | {_pct(t.get('generator_cpu'))} ({generator}) |"
            )
    return "\n".join(lines)


def cells_table(cells: list[dict[str, Any]]) -> str:
    """Every measured cell: medians over the repeats, throughput range, CPU shares."""
    lines = [
        "| cell | system | transport | load | throughput /s (median [min-max]) | p50 ms | p95 ms | p99 ms | "
        "requests | failures | generator CPU | server CPU |",
        "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for cell in cells:
        m = cell.get("median") or {}
        if cell["mode"] == "open":
            load = f"{cell['level']:.0f}/s"
        elif cell["mode"] == "closed":
            load = f"c={cell['level']:g}"
        else:
            load = "batches"
        errors = f" (errors: {'; '.join(cell['errors'][:2])})" if cell.get("errors") else ""
        lines.append(
            f"| `{cell['id']}` | {cell['system']} | {cell['transport']} | {load} | "
            f"{_num(m.get('throughput'))} [{_num(m.get('throughput_min'))}-{_num(m.get('throughput_max'))}]"
            f"{errors} | {_num(m.get('p50_ms'))} | {_num(m.get('p95_ms'))} | {_num(m.get('p99_ms'))} | "
            f"{m.get('requests', '-')} | {m.get('failures', '-')} | {_pct(m.get('generator_cpu'))} | "
            f"{_pct(m.get('server_cpu'))} |"
        )
    return "\n".join(lines)


def perf_table(results: dict[str, Any]) -> str:
    """perf_analyzer's figures beside the kiln generator's for the same system and load."""
    cells = {c["id"]: c for c in results["cells"]}
    lines = [
        "| run | model | load | perf_analyzer /s | p99 ms | kiln generator /s (same cell) | "
        "perf_analyzer / kiln | "
        "perf_analyzer CPU |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for entry in results["perf_analyzer"]:
        load = f"c={entry['level']:g}" if entry["mode"] == "concurrency" else f"{entry['level']:.0f}/s"
        mine = (cells.get(entry.get("cell") or "") or {}).get("median", {}).get("throughput")
        ratio = entry["throughput"] / mine if entry.get("throughput") and mine else None
        shown = (
            _num(entry.get("throughput")) if not entry.get("error") else f"no figure: {entry['error'][:120]}"
        )
        lines.append(
            f"| `{entry['id']}` | {entry['model']} | {load} | {shown} | {_num(entry.get('p99_ms'))} | "
            f"{_num(mine)} | {_num(ratio, 2)} | {_pct(entry.get('generator_cpu'))} |"
        )
    return "\n".join(lines)


def ensembles_section(results: dict[str, Any]) -> str:
    """Per ensemble: throughput against its slowest step alone; per step: server-side time."""
    parts = []
    for e in results["ensembles"]:
        parts.append(
            f"**{e['ensemble']}** at concurrency {e['concurrency']}: {_num(e['throughput'])}/s, p99 "
            f"{_num(e['p99_ms'])} ms; slowest step alone: {e['slowest_step']} at "
            f"{_num(e['slowest_throughput'])}/s; ratio {_num(e['ratio'], 2)}. Server-side time per request: "
            f"ensemble {_num(e['server_total_us'], 0)} us, "
            f"sum of its steps {_num(e['steps_total_us'], 0)} us.\n"
        )
        parts.append(
            "| step | backend | alone /s | alone p99 ms | in the ensemble: queue us | compute in us | "
            "compute infer us | compute out us | total us | avg batch |"
        )
        parts.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for s in e["steps"]:
            t = s["in_ensemble"] or {}
            parts.append(
                f"| {s['model']} | {s['backend']} | {_num(s['alone_throughput'])} | "
                f"{_num(s['alone_p99_ms'])} | "
                f"{_num(t.get('queue_us'), 0)} | {_num(t.get('compute_input_us'), 0)} | "
                f"{_num(t.get('compute_infer_us'), 0)} | {_num(t.get('compute_output_us'), 0)} | "
                f"{_num(t.get('total_us'), 0)} | {_num(s.get('average_batch'), 1)} |"
            )
        parts.append("")
    return "\n".join(parts) if parts else "Not run.\n"


def capacity_section(results: dict[str, Any]) -> str:
    """The capacity search's probes."""
    cap = results.get("capacity") or {}
    if not cap:
        return "Not run.\n"
    lines = [
        f"Search (open loop, {cap['model']}, gRPC; a rate is held when p99 <= {cap['p99_limit_ms']:g} ms, no "
        f"failure and >= 97% of it delivered): capacity {_num(cap['rate'], 0)}/s, "
        f"bracket {cap['bracket']}.\n",
        "| offered /s | delivered /s | p50 ms | p99 ms | failures | generator CPU | server CPU | held |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for p in cap["probes"]:
        lines.append(
            f"| {p['rate']:.0f} | {_num(p['throughput'])} | {_num(p['p50_ms'])} | {_num(p['p99_ms'])} | "
            f"{p['failures']} | {_pct(p['generator_cpu'])} | {_pct(p['server_cpu'])} | "
            f"{'yes' if p['held'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def vnni_note(machine: dict[str, Any]) -> str:
    """What the CPU offers INT8 (target 3 assumes AVX-512 VNNI)."""
    flags = machine.get("cpu_flags", {})
    if flags.get("avx512_vnni") or flags.get("avx_vnni") or flags.get("amx_int8"):
        return "This CPU has an INT8 dot-product extension (VNNI or AMX): ONNX Runtime's INT8 kernels use it."
    return (
        "This CPU has no AVX-512 VNNI, AVX-VNNI or AMX (target 3 assumed AVX-512 VNNI): ONNX Runtime runs "
        "INT8 on AVX2 kernels here, so the INT8 speed-up is smaller than on a VNNI CPU. The ratio is "
        "reported as measured."
    )


def write(results: dict[str, Any], out: Path) -> Path:
    """Writes `results.md` and the plots into `out`; returns the Markdown file."""
    plots = plot(results, out)
    path = out / "results.md"
    path.write_text("\n".join([*_head(results), *_body(results, plots)]))
    return path


def _head(results: dict[str, Any]) -> list[str]:
    """The title, the run's conditions, the targets table, what failed and the notes."""
    machine = results["machine"]
    settings = results["settings"]
    lines = [
        f"# kiln benchmark: {results['date_utc']}, commit {results['commit']}\n",
        f"- Machine: {environment.describe_machine(machine)}",
        f"- INT8: {vnni_note(machine)}",
        f"- Device: {results['device']}; server: {results['server']}",
        f"- Command: `{results['command']}` (total {results['wall_s']:.0f} s)",
        f"- Each cell: {settings['warmup_s']:g} s warm-up, {settings['duration_s']:g} s measured, "
        f"{settings['repeats']} repeats interleaved across the systems compared; figures are medians of the "
        "repeats. One load generator for every system (`benchmarks/loadgen.py`, asyncio, one process; every "
        "answer checked against the in-process reference); its CPU share of the machine is given beside "
        "each figure, and the server's where it runs here (`server CPU`).",
        "",
        "## Targets\n",
        targets_table(results),
        "",
    ]
    if results.get("failed"):
        lines += ["**Comparisons that could not run:**", *[f"- {f}" for f in results["failed"]], ""]
    if results.get("notes"):
        lines += [*[f"- {n}" for n in results["notes"]], ""]
    return lines


def _body(results: dict[str, Any], plots: list[str]) -> list[str]:
    """The sections after the targets: cells per comparison, ensembles, capacity, perf_analyzer,
    plots, request mixes, commands."""
    by_comparison = {n: [c for c in results["cells"] if c["comparison"] == n] for n in range(1, 7)}
    return [
        "## Image classification (targets 1-3)\n",
        cells_table(by_comparison[1] + by_comparison[2] + by_comparison[3]),
        "",
        "## Dynamic batching (target 4)\n",
        cells_table(by_comparison[4]) if by_comparison[4] else "Not run.",
        "",
        "## Ensemble overhead (target 5, perf_analyzer's server-side breakdown)\n",
        ensembles_section(results),
        "## Capacity (target 6)\n",
        capacity_section(results),
        cells_table(by_comparison[6]) if by_comparison[6] else "",
        "",
        "## perf_analyzer against the kiln generator\n",
        perf_table(results),
        "",
        "## Plots\n",
        *[f"![{p}]({p})" for p in plots],
        "",
        "## Request mixes\n",
        *[
            f"- {v['summary']}" + (f" ({'; '.join(v['notes'])})" if v["notes"] else "")
            for v in results["inputs"].values()
        ],
        "",
        "## Commands\n",
        "```",
        results["command"],
        *results["commands"],
        "```",
        "",
    ]


def plot(results: dict[str, Any], out: Path) -> list[str]:
    """The plots; returns their file names (none when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    closed = [c for c in results["cells"] if c["mode"] == "closed" and c.get("median")]
    written = [_throughput_plot(plt, results, closed, out / PLOTS[0])]
    if closed:
        written.append(_latency_plot(plt, closed, out / PLOTS[1]))
    cap = results.get("capacity") or {}
    if cap.get("probes"):
        written.append(_capacity_plot(plt, cap, out / PLOTS[2]))
    return written


def _throughput_plot(plt: Any, results: dict[str, Any], closed: list[dict[str, Any]], path: Path) -> str:
    """Image throughput against concurrency (left), batching on / off (right)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    _image_throughput(left, results, closed)
    batching = [c for c in closed if c["comparison"] == 4]
    if batching:
        names = [c["system"] for c in batching]
        right.bar(range(len(batching)), [c["median"]["throughput"] for c in batching], color="tab:blue")
        right.set_xticks(range(len(batching)), names, rotation=20, ha="right", fontsize=7)
        right.set_ylabel("requests / s (median)")
        right.set_title(f"Dynamic batching on / off (concurrency {batching[0]['level']:g})")
    else:
        right.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _image_throughput(ax: Any, results: dict[str, Any], closed: list[dict[str, Any]]) -> None:
    """One line per image system (median, min-max bars), the in-process reference as a level."""
    series: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    for cell in closed:
        if cell["comparison"] in (1, 2, 3):
            series.setdefault(f"{cell['system']} ({cell['transport']})", []).append(
                (cell["level"], cell["median"])
            )
    for label, points in sorted(series.items()):
        points.sort(key=lambda p: p[0])
        xs = [p[0] for p in points]
        ys = [p[1]["throughput"] for p in points]
        low = [p[1]["throughput"] - p[1]["throughput_min"] for p in points]
        high = [p[1]["throughput_max"] - p[1]["throughput"] for p in points]
        ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3, label=label)
    for cell in results["cells"]:
        if cell["mode"] == "in-process" and cell.get("median"):
            ax.axhline(cell["median"]["throughput"], linestyle="--", color="grey", label=cell["system"])
    ax.set_xscale("log", base=2)
    levels = sorted({p[0] for points in series.values() for p in points})
    if levels:
        ax.set_xticks(levels, [f"{x:g}" for x in levels])
    ax.set_xlabel("concurrency (requests in flight)")
    ax.set_ylabel("images / s (median, min-max)")
    ax.set_title("Image classification: throughput against concurrency")
    if series:
        ax.legend(fontsize=7)


def _latency_plot(plt: Any, closed: list[dict[str, Any]], path: Path) -> str:
    """p50 / p95 / p99 per closed-loop cell."""
    fig, ax = plt.subplots(figsize=(13, 5))
    width = 0.27
    for offset, key in zip((-width, 0, width), ("p50_ms", "p95_ms", "p99_ms"), strict=True):
        ax.bar(
            [i + offset for i in range(len(closed))],
            [c["median"][key] or 0 for c in closed],
            width,
            label=key[:3],
        )
    ax.set_xticks(range(len(closed)), [c["id"] for c in closed], rotation=45, ha="right", fontsize=6)
    ax.set_yscale("log")
    ax.set_ylabel("latency, ms (median of repeats)")
    ax.set_title("Latency percentiles per cell")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _capacity_plot(plt: Any, cap: dict[str, Any], path: Path) -> str:
    """The capacity probes' p99 and p50 against the offered rate, the limit as a level."""
    probes = sorted(cap["probes"], key=lambda p: p["rate"])
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.plot([p["rate"] for p in probes], [p["p99_ms"] for p in probes], marker="o", label="p99")
    ax.plot([p["rate"] for p in probes], [p["p50_ms"] for p in probes], marker=".", label="p50")
    ax.axhline(cap["p99_limit_ms"], color="red", linestyle="--", label=f"{cap['p99_limit_ms']:g} ms")
    ax.set_xlabel("offered requests / s (open loop)")
    ax.set_ylabel("latency, ms")
    ax.set_yscale("log")
    ax.set_title(f"{cap['model']}: latency against offered rate")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


if __name__ == "__main__":
    source = Path(sys.argv[1])
    print(write(json.loads(source.read_text()), source.parent))
