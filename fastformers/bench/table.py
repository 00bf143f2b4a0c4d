"""The benchmark's printed table: every row's speed beside its accuracy, all measured in one run, the
machine named, the reference and the pick marked."""

from __future__ import annotations

import os
import platform

from fastformers.bench import paper
from fastformers.bench.analysis import row_named
from fastformers.bench.gate import margin_label
from fastformers.bench.instances import usable_cores
from fastformers.bench.options import BenchOptions
from fastformers.bench.roofline import family_of, this_cpu
from fastformers.engines.libraries import library_versions


def machine() -> dict:
    """The CPU model, its features (AVX2, AVX-512, VNNI, AMX, bf16), its nominal-peak family and library
    versions: a timing holds only beside others taken on the same machine."""
    cpu = this_cpu()
    family = family_of(cpu)
    versions = library_versions()  # from package metadata: nothing imported just to read a version
    return {
        "cpu": cpu.model if cpu.flags else platform.processor() or platform.machine(),
        "cpu_features": cpu.features,
        "cpu_feature_label": cpu.feature_label(),
        "peak_family": family.name if family else None,
        "logical_cpus": os.cpu_count(),
        "usable_physical_cores": len(usable_cores()),
        "python": platform.python_version(),
    } | versions


def peak_line(family: str | None) -> str:
    return (
        f"nominal peak: {family} (vector width x FMA ports x nominal clock; a VM hides the real clock); "
        "GMAC/ex: the multiply-adds each example ran (the model's real shape, the row's token counts, padding "
        "included); %peak = their least time at the nominal peak of the row's cores / measured time"
        if family
        else "nominal peak: n/a (a CPU family the peak table does not know); GMAC/ex: multiply-adds run per example"
    )


def padding_label(row: dict) -> str:
    return f"b{row['bucket']}" if row.get("bucket") else row["padding"]


def format_table(report: dict, opts: BenchOptions) -> str:
    rows = report["rows"]
    scored: list[str] = next((row["task_metrics"] for row in rows if not row["skipped"]), [])
    task_keys = [k for k in scored if k != "score"] + (["score"] if len(scored) > 2 else [])
    estimate = " (ESTIMATE: hardware.tdp_watts x time)" if report["energy_estimated"] else ""
    lines = [
        f"{report['task']} {report['split']}: {report['examples']} examples, batch {opts.batch_size}, median of "
        f"{opts.repeats} timed passes in interleaved rounds (seeded shuffled order, every row warmed on every shape "
        f"first); latency at batch 1 over {min(opts.latency_examples, report['examples'])} examples in every round; "
        f"max_seq_length {opts.max_length}",
        f"machine: {report['machine']['cpu']} ({report['machine']['cpu_feature_label']}), "
        f"{report['machine']['usable_physical_cores']} usable cores; energy: {report['energy_method']}{estimate}",
        peak_line(report["machine"].get("peak_family")),
    ]
    if report.get("peaks"):
        lines.append(
            f"measured-GEMM bound: sustained {report['peaks']['fp32_gflops']:.0f} GFLOP/s fp32, "
            f"{report['peaks']['int8_gops']:.0f} GOP/s int8 (onnxruntime's kernels, all cores); %bound = least "
            "time of the useful multiply-adds (real tokens) at those rates / measured time (bf16 rows held to the "
            "fp32 rate; an engine with faster kernels than onnxruntime's exceeds 100%)"
        )
    has_ref = bool(report.get("reference"))
    reference = f"{'vs ref':>7} " if has_ref else ""
    header = (
        f"{'setting':<26} {'model':<7} {'engine/precision':<22} {'padding':<8} {'layout':<6} {'ex/s':>8} "
        f"{'ex/s range':>15} "
        f"{'speed-up':>8} {reference}{'e2e ex/s':>8} {'spread':>6} {'GMAC/ex':>8} {'%peak':>6} {'%bound':>6} "
        f"{'p50 ms':>7} {'p99 ms':>7} "
        f"{'peak MB':>8} {'J/ex':>6} {'$/100M':>8} " + " ".join(f"{k:>9}" for k in task_keys) + f" {'agree':>6}"
    )
    lines += [header, "-" * len(header)]
    for row in rows:
        head = (
            f"{row['name']:<26} {row['model']:<7} {row['engine'] + '/' + row['precision']:<22} "
            f"{padding_label(row):<8} {row['layout']:<6} "
        )
        if row["skipped"]:
            lines.append(head + f"skipped: {row['skipped']}")
            continue
        m = row["metrics"]
        spread = (m["wall_seconds_max"] - m["wall_seconds_min"]) / m["wall_seconds"]
        flags = [f"<- {row['label']}"] if row.get("label") else []
        if row["name"] == report.get("reference"):
            flags.append("<- reference")
        if row["name"] == report.get("pick"):
            flags.append("<- PICK")
        if m.get("gate_passed") == 0.0:
            flags.append("gate failed")
        if m.get("within_memory") == 0.0 and row["candidate"]:
            flags.append("over memory budget")
        lines.append(
            head
            + f"{m['throughput']:>8.2f} {m['throughput_lo']:>7.2f}-{m['throughput_hi']:<7.2f} {m['speedup']:>7.2f}x "
            + (f"{m['vs_reference']:>6.2f}x " if has_ref else "")
            + f"{_fmt(m.get('e2e_throughput'), 8, 2)} {spread:>6.0%} {_fmt(m.get('gmacs_per_example'), 8, 3)} "
            f"{_fmt(m.get('pct_of_peak'), 6, 1)} {_fmt(m.get('pct_of_bound'), 6, 1)} "
            f"{_fmt(m.get('latency_p50_ms'), 7, 1)} "
            f"{_fmt(m.get('latency_p99_ms'), 7, 1)} {m['peak_pss_mb']:>8.0f} {_fmt(m.get('joules_per_example'), 6, 2)} "
            f"{_fmt(m.get('usd_per_100m_queries'), 8, 2)} "
            + " ".join(_fmt(m.get(k), 9, 4) for k in task_keys)
            + (f" {m['agreement']:>6.1%}" if "agreement" in m else f" {'-':>6}")
            + ("  " + ", ".join(flags) if flags else "")
        )
    agree = report.get("agreement_reference") or rows[0]["name"]
    lines.append(
        f"speed-up: median wall time of {rows[0]['name']} / this row's; e2e: each instance tokenizes its share "
        "from text and runs it, timed like the pass (median); peak MB: the largest sum of the "
        "instances' PSS sampled during the passes (shared pages counted once); "
        f"spread: (slowest - fastest pass) / median; ex/s range: slowest to fastest pass (rows whose ranges "
        f"overlap are not measurably different); agree: predictions equal to {agree}'s"
    )
    if has_ref:
        lines.append(f"vs ref: throughput / {report['reference']}'s (the stock reference at its best layout tried)")
    lines += stock_lines(rows, report.get("reference"))
    pick = row_named(rows, report.get("pick"))
    if pick:
        gate = f" that passed the accuracy gate vs {opts.gate.reference}" if report.get("gate_rows") else ""
        memory = f" and {report['memory_budget_mb']:.0f} MB peak memory" if report.get("memory_budget_mb") else ""
        lines.append(
            f"pick: {pick['name']} = {pick['engine']} {pick['precision']}, {padding_label(pick)}, "
            f"{pick['layout']}: " + (report.get("pick_note") or f"the fastest candidate{gate}{memory}")
        )
    elif report.get("candidates"):
        lines.append("pick: none (no candidate passed the accuracy gate within the memory budget)")
    lines += paper.summary_lines(report, opts.paper)
    lines += gate_lines(report, opts)
    lines += profile_lines(rows)
    return "\n".join(lines)


def stock_lines(rows: list[dict], reference: str | None) -> list[str]:
    """The rows that run an engine's stock int8 recipe (its `stock: true` variant), named by recipe: the pick is
    never measurably slower than one of them that passes the gate; the reference is the onnxruntime one."""
    recipes: dict[str, list[str]] = {}
    for row in rows:
        if row.get("stock"):
            recipes.setdefault(f"{row['engine']}/{row['precision']}", []).append(row["name"])
    if not recipes:
        return []
    named = "; ".join(f"{recipe}: {', '.join(names)}" for recipe, names in recipes.items())
    ref = f" ({reference} is the reference)" if reference else ""
    return [f'stock int8 rows, each engine\'s stock recipe (docs/engines.md, "int8 variants"){ref}: {named}']


def gate_lines(report: dict, options: BenchOptions) -> list[str]:
    """The gate's evidence for every row it judged: pool agreement with its interval, the labelled units that
    differ, the score delta with its interval, p, the verdict and how many flips would change it."""
    judged = [row for row in report["rows"] if row.get("gate")]
    if not judged:
        return []
    opts = options.gate
    lines = [
        f"accuracy gate vs {opts.reference}: fails when the pool disagreement's 95% lower bound > "
        f"{opts.max_disagreement:.1%} or the score test's p < {opts.alpha} (one-sided, paired randomization over "
        "the labelled units); margin: the fewest moved predictions that would change the verdict",
        f"  {'setting':<26} {'|P|':>5} {'D/|P|':>6} {'95% CI':>13} {'k':>4} {'d score':>8} {'95% CI':>15} "
        f"{'p':>6} {'verdict':<8} {'margin':>6}",
    ]
    for row in judged:
        g = row["gate"]
        held = row["gated"]
        verdict = ("pass" if g["gate_passed"] else "FAIL") if held else "(shown)"
        lines.append(
            f"  {row['name']:<26} {g['pool_examples']:>5} {g['disagreement']:>6.1%} "
            f"{g['disagreement_lo']:>6.1%}-{g['disagreement_hi']:<6.1%} {g['differing_units']:>4} "
            f"{g['score_delta_points']:>+8.2f} "
            f"{g['score_delta_lo_points']:>+7.2f}..{g['score_delta_hi_points']:<+6.2f} "
            f"{g['score_p']:>6.3f} {verdict:<8} {margin_label(g['gate_margin']):>6}"
        )
    return lines


def profile_lines(rows: list[dict]) -> list[str]:
    """One line per profiled setting: the operator types that take most of its time."""
    profiled = [row for row in rows if row.get("profile")]
    if not profiled:
        return []
    lines = [
        f"profile (the engine's own profiler, first {profiled[0]['profile']['examples']} examples, one "
        "instance): share of wall time per operator type"
    ]
    for row in profiled:
        prof = row["profile"]
        shares = [f"{op} {100 * ms / prof['wall_ms']:.1f}%" for op, ms in list(prof["kernel_ms"].items())[:6]]
        outside = max(0.0, 100 * (1 - sum(prof["kernel_ms"].values()) / prof["wall_ms"]))
        lines.append(
            f"  {row['name']:<26} {prof['wall_ms'] / prof['examples']:.2f} ms/ex: "
            + ", ".join(shares)
            + f", outside kernels {outside:.1f}%"
        )
    return lines


def _fmt(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"
