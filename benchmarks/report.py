"""The benchmark's report: `results.md` (tables, verdicts) and the plots, from `results.json`.

`write(results, out)` renders everything from the one results dict `benchmarks.run` saves, so a
report can be re-rendered from an old `results.json`:

    python -m benchmarks.report results/bench-<...>/results.json
"""

from __future__ import annotations

import json
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any

from loadtests import environment

PLOTS = ("throughput_vs_concurrency.png", "latency_percentiles.png", "capacity.png")


def parse_only(text: str, targets: Collection[int]) -> set[int]:
    """`--only`'s comma-separated target numbers (every one of `targets` when empty).

    Raises:
        SystemExit: a number that is not one of `targets`, naming their range and the text given.
    """
    only = {int(x) for x in text.split(",") if x.strip()} or set(targets)
    if not only <= set(targets):
        raise SystemExit(f"--only: targets are {min(targets)}-{max(targets)}, got {text!r}")
    return only


def _num(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:.0%}"


def _x(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}x"


def vs_floor(ratios: dict[str, Any] | None) -> str:
    """A figure's ratios to the floor's: "throughput / p50 / p99" (see `benchmarks.run.add_floor_ratios`)."""
    if not ratios:
        return "-"
    return " / ".join(_x(ratios.get(k)) for k in ("throughput", "p50_ms", "p99_ms"))


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
        "| # | comparison | target | measured | ratio | vs floor | verdict | generator CPU share |",
        "| ---: | --- | --- | --- | ---: | ---: | --- | ---: |",
    ]
    for t in results["targets"]:
        generator = t.get("generator", "kiln load generator")
        lines.append(
            f"| {t['number']} | {t['title']} | {t['target']} | {t['measured']} | "
            f"{_num(t.get('ratio'), 2)} | {_x(t.get('floor_ratio'))} | {verdict(t)} | "
            f"{_pct(t.get('generator_cpu'))} ({generator}) |"
        )
        extra = t.get("extra") or {}
        if t["number"] == 2 and extra.get("fp32_ratio") is not None:
            p99s = f"kiln FP32 p99 {_num(extra.get('p99_kiln_fp32_ms'))} ms, baseline p99 "
            p99s += f"{_num(extra.get('p99_baseline_ms'))} ms"
            lines.append(
                f"| 2' | FP32 against FP32 (the serving gain alone) | reported | {p99s} | "
                f"{_num(extra['fp32_ratio'], 2)} | - | REPORTED | "
                f"{_pct(t.get('generator_cpu'))} ({generator}) |"
            )
    return "\n".join(lines)


def cells_table(cells: list[dict[str, Any]]) -> str:
    """Every measured cell: medians over the repeats, throughput range, CPU shares."""
    lines = [
        "| cell | system | transport | load | throughput /s (median [min-max]) | p50 ms | p95 ms | p99 ms | "
        "vs floor (throughput / p50 / p99) | requests | failures | generator CPU | server CPU |",
        "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
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
            f"{vs_floor(cell.get('vs_floor'))} | {m.get('requests', '-')} | {m.get('failures', '-')} | "
            f"{_pct(m.get('generator_cpu'))} | "
            f"{_pct(m.get('server_cpu'))} |"
        )
    return "\n".join(lines)


def perf_table(results: dict[str, Any]) -> str:
    """perf_analyzer's figures beside the kiln generator's for the same system and load."""
    cells = {c["id"]: c for c in results["cells"]}
    lines = [
        "| run | model | load | perf_analyzer /s | p50 ms | p99 ms | vs floor (throughput / p50 / p99) | "
        "kiln generator /s (same cell) | perf_analyzer / kiln | perf_analyzer CPU |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for entry in results["perf_analyzer"]:
        load = f"c={entry['level']:g}" if entry["mode"] == "concurrency" else f"{entry['level']:.0f}/s"
        mine = (cells.get(entry.get("cell") or "") or {}).get("median", {}).get("throughput")
        ratio = entry["throughput"] / mine if entry.get("throughput") and mine else None
        shown = (
            _num(entry.get("throughput")) if not entry.get("error") else f"no figure: {entry['error'][:120]}"
        )
        lines.append(
            f"| `{entry['id']}` | {entry['model']} | {load} | {shown} | {_num(entry.get('p50_ms'), 2)} | "
            f"{_num(entry.get('p99_ms'), 2)} | {vs_floor(entry.get('vs_floor'))} | "
            f"{_num(mine)} | {_num(ratio, 2)} | {_pct(entry.get('generator_cpu'))} |"
        )
    return "\n".join(lines)


def ensembles_section(results: dict[str, Any]) -> str:
    """Per ensemble: throughput against its slowest step alone; per step: server-side time."""
    parts = []
    runs = {p["id"]: p for p in results.get("perf_analyzer", [])}
    for e in results["ensembles"]:
        floor_ratios = vs_floor((runs.get(e.get("perf_id") or "") or {}).get("vs_floor"))
        parts.append(
            f"**{e['ensemble']}** ({e.get('form', 'ensemble')} form) at concurrency {e['concurrency']}: "
            f"{_num(e['throughput'])}/s, p99 "
            f"{_num(e['p99_ms'])} ms (vs floor, throughput / p50 / p99: {floor_ratios}); slowest step alone: "
            f"{e['slowest_step']} at "
            f"{_num(e['slowest_throughput'])}/s; ratio {_num(e['ratio'], 2)}. Server-side time per request: "
            + (
                f"ensemble {_num(e['server_total_us'], 0)} us, "
                f"sum of its steps {_num(e['steps_total_us'], 0)} us.\n"
                if e.get("form", "ensemble") == "ensemble"
                else f"the fused model {_num(e['server_total_us'], 0)} us (it runs its steps inside one "
                "execute: Triton has no per-step split of it; the kiln_step_* metrics with the label "
                "`pipeline` have each step's time).\n"
            )
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
    """The capacity searches: perf_analyzer's of the floor and of the model, the Python
    generator's ceiling (against the floor) and its cross-check of the model; every probe."""
    cap = results.get("capacity") or {}
    if not cap:
        return "Not run.\n"
    searches = [
        ("perf_analyzer", "the floor", (cap.get("perf_analyzer") or {}).get("floor")),
        ("perf_analyzer", cap["model"], (cap.get("perf_analyzer") or {}).get("model")),
        ("Python generator (its ceiling)", "the floor", cap.get("python_ceiling")),
        ("Python generator (cross-check)", cap["model"], cap.get("python")),
    ]
    lines = [
        f"Open loop, gRPC; a rate is held when p99 <= {cap['p99_limit_ms']:g} ms, nothing fails, >= "
        f"{cap.get('min_delivered', 0.97):.0%} of it is delivered and the generator kept up with it "
        "(perf_analyzer sent <= 1% of the requests late). Doubling from the start rate, then bisection.\n",
    ]
    for generator, what, found in searches:
        if not found:
            continue
        lines += [
            f"**{generator}, {what}**: {_num(found.get('rate'), 0)}/s: {found.get('note', '')}\n",
            *_probes(found),
        ]
    return "\n".join(lines) + "\n"


def _probes(found: dict[str, Any]) -> list[str]:
    """One search's probes as a table."""
    lines = [
        "| offered /s | delivered /s | p50 ms | p99 ms | generator CPU | generator late | held |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for p in found.get("probes", []):
        held = "yes" if p["held"] else ("no (the generator)" if p.get("generator_limited") else "no")
        if p.get("error"):
            held += f": {str(p['error'])[:80]}"
        lines.append(
            f"| {p['rate']:.0f} | {_num(p.get('throughput'))} | {_num(p.get('p50_ms'), 2)} | "
            f"{_num(p.get('p99_ms'), 2)} | {_pct(p.get('generator_cpu'))} | {_pct(p.get('delayed_share'))} | "
            f"{held} |"
        )
    return [*lines, ""]


def forms_section(results: dict[str, Any]) -> str:
    """Each pipeline in both forms against the floor (perf_analyzer): which form is faster."""
    rows = results.get("forms") or []
    if not rows:
        return "Not run.\n"
    lines = [
        "| pipeline | form | served as | p50 ms (c=1) | p99 ms (c=1) | p50 / floor | p99 / floor | "
        "throughput /s | at c | throughput / floor | faster form (p50; throughput) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        form = f"{r['form']}{' (default)' if r['default'] else ''}"
        lines.append(
            f"| {r['pipeline']} | {form} | `{r['model']}` | {_num(r['p50_ms'], 2)} | "
            f"{_num(r['p99_ms'], 2)} | {_x(r['p50_vs_floor'])} | {_x(r['p99_vs_floor'])} | "
            f"{_num(r['throughput'])} | {r['concurrency']} | "
            f"{_x(r['throughput_vs_floor'])} | {r['faster_p50']}; {r['faster_throughput']} |"
        )
    return "\n".join(lines) + "\n"


def text_section(results: dict[str, Any]) -> str:
    """Targets 8 and 9's figures."""
    t = results.get("text") or {}
    if not t:
        return "Not run.\n"
    return (
        f"Mixed lengths: {_num(t['mixed']['throughput'])}/s, p50 {_num(t['mixed']['p50_ms'], 2)} ms, p99 "
        f"{_num(t['mixed']['p99_ms'], 2)} ms; one text ({t['single_text']}): "
        f"{_num(t['single']['throughput'])}/s, "
        f"p50 {_num(t['single']['p50_ms'], 2)} ms, p99 {_num(t['single']['p99_ms'], 2)} ms. "
        f"{t['batch_model']}: {t['inferences']} inferences in {t['executions']} executions over the "
        "mixed runs "
        f"(average batch {_num(t['average_batch'])}).\n"
    )


def generation_section(results: dict[str, Any]) -> str:
    """Targets 10-13's figures (`benchmarks.generation.section`)."""
    from benchmarks import generation

    return generation.section(results.get("generation") or {})


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
    by_comparison = {n: [c for c in results["cells"] if c["comparison"] == n] for n in range(0, 10)}
    return [
        "## Image classification (targets 1-3)\n",
        cells_table(by_comparison[1] + by_comparison[2] + by_comparison[3]),
        "",
        "## Dynamic batching (target 4)\n",
        cells_table(by_comparison[4]) if by_comparison[4] else "Not run.",
        "",
        "## Each pipeline against its steps alone (target 5, perf_analyzer's server-side breakdown)\n",
        ensembles_section(results),
        "## Capacity against the floor (target 6)\n",
        capacity_section(results),
        cells_table(by_comparison[6]) if by_comparison[6] else "",
        "",
        "## Pipeline forms against the floor (target 7; the project sets each default to the faster form)\n",
        forms_section(results),
        "## Text lengths (targets 8 and 9)\n",
        text_section(results),
        "## Generation (targets 10-13, `benchmarks.generation`)\n",
        generation_section(results),
        "## The floor (`identity`, the Python generator's cells)\n",
        cells_table(by_comparison[0]) if by_comparison[0] else "Not run.",
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
    if cap.get("perf_analyzer") or cap.get("python"):
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
    """Each search's probes: p99 against the offered rate, the limit as a level."""
    series = [
        ("floor, perf_analyzer", (cap.get("perf_analyzer") or {}).get("floor")),
        (f"{cap['model']}, perf_analyzer", (cap.get("perf_analyzer") or {}).get("model")),
        ("floor, Python generator", cap.get("python_ceiling")),
        (f"{cap['model']}, Python generator", cap.get("python")),
    ]
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, found in series:
        probes = sorted(
            (p for p in (found or {}).get("probes", []) if p.get("p99_ms")), key=lambda p: p["rate"]
        )
        if probes:
            ax.plot(
                [p["rate"] for p in probes], [p["p99_ms"] for p in probes], marker="o", label=f"{label}: p99"
            )
    ax.axhline(cap["p99_limit_ms"], color="red", linestyle="--", label=f"{cap['p99_limit_ms']:g} ms")
    ax.set_xlabel("offered requests / s (open loop)")
    ax.set_ylabel("p99 latency, ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title(f"{cap['model']} and the floor: p99 against offered rate")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


if __name__ == "__main__":
    source = Path(sys.argv[1])
    print(write(json.loads(source.read_text()), source.parent))
