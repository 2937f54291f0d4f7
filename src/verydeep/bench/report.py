"""A benchmark report for people: the table ``verydeep bench`` prints, and the JSON writer the
benchmark scripts share."""

from __future__ import annotations

import json
import os
from typing import Any

from verydeep.core.atomic import write_text
from verydeep.core.tables import format_table

#: The table's columns.
HEADER = [
    "input",
    "engine",
    "img/s",
    "latency ms",
    "GFLOP/s",
    "vs baseline",
    "vs best peer",
    "peak MiB (+call)",
    "rel err",
    "top-1 agree",
    "top-5 overlap",
    "plan",
]


def emit_report(report: dict[str, Any], out: str | os.PathLike[str] | None = None) -> None:
    """Print a benchmark report as JSON, and also write it to ``out`` (atomically) when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        write_text(out, text + "\n")


def _header_lines(report: dict[str, Any]) -> list[str]:
    """The machine, the model, the load, and each plan with its notes."""
    m, mod = report["machine"], report["model"]
    lines = [
        f"{m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads)"
        + (f", {m['gpu']}" if "gpu" in m else "")
        + f"; torch {m['torch']}"
        + "".join(f", {k} {m[k]}" for k in ("torchvision", "onnxruntime", "opencv") if k in m),
        f"VGG config {mod['config']} (width {mod['width']:g}, {mod['parameters']:,} parameters, "
        f"{mod['gflop_per_image_224']:g} GFLOP at 224), weights: {mod['weights']}",
    ]
    load = report.get("load", {})
    if load.get("cpu_busy_before") is not None:
        during = load.get("others_during_timing")
        lines.append(
            f"other processes: {100 * load['cpu_busy_before']:.0f}% of the CPUs busy before, "
            + (f"{100 * during:.0f}% during the timed calls, " if during is not None else "")
            + f"{100 * (load.get('cpu_busy_after') or 0):.0f}% after; loadavg {m.get('loadavg')}"
        )
    for p, plan in report["plans"].items():
        isa = f" ({plan['isa']} CPU class)" if plan.get("isa") else ""
        lines.append(
            f"plan {p}: {plan['dtype']} on {plan['device']}{isa}, conv {conv_kernels(plan)}, fc {plan['linear']}, "
            f"pool {plan['pool']}, cache blocking {plan['cache_bytes'] >> 20} MiB"
            + (", CUDA graphs" if plan["cuda_graphs"] else "")
            + (", torch.compile" if plan["compile"] else "")
            + (f", int8 activations 0..{plan['int8_levels']}" if plan.get("int8_levels") else "")
        )
        lines += [f"  note: {note}" for note in plan["notes"]]
    return lines


def conv_kernels(plan: dict[str, Any]) -> str:
    """The plan's convolution kernels in words: Winograd's tile sizes for the 3x3 layers it takes."""
    if not plan.get("winograd"):
        return plan["conv"]
    tiles = "/".join(f"F({m}x{m},3x3)" for m in plan["winograd"])
    return f"3x3 winograd {tiles}, others {plan['conv']}"


def _row(r: dict[str, Any], mem_key: str) -> list[str]:
    return [
        f"{r['view']} {r['batch']}x{r['height']}x{r['width']}",
        f"{r['engine']} {r['precision']}"
        + (f" ({r['compute_dtype']})" if r["compute_dtype"] != r["precision"] else ""),
        f"{r['images_per_s']:.2f}",
        f"{r['latency_ms']:.1f}",
        f"{r['gflops']:.0f}",
        f"{r['speedup']:.2f}x" if r["speedup"] else "-",
        f"{r['vs_best_peer']:.2f}x ({r['best_peer']})" if r.get("vs_best_peer") else "-",
        f"{r.get(mem_key, 0):.0f} (+{r.get('call_mb', 0):.0f})",
        f"{r['rel_error']:.1e}" if r["rel_error"] is not None else "-",
        f"{100 * r['top1_agreement']:.0f}%" if r["top1_agreement"] is not None else "-",
        f"{100 * r['top5_overlap']:.0f}%" if r.get("top5_overlap") is not None else "-",
        r.get("plan", ""),
    ]


def format_report(report: dict[str, Any]) -> str:
    """The readable summary ``verydeep bench`` prints."""
    mem_key = "peak_gpu_mb" if any("peak_gpu_mb" in r for r in report["results"]) else "peak_rss_mb"
    lines = _header_lines(report)
    lines.append("")
    lines.append(format_table([_row(r, mem_key) for r in report["results"]], HEADER))
    lines += [f"skipped {name}: {why}" for name, why in report["skipped"].items()]
    settings = report["settings"]
    lines.append(
        f"baseline: torchvision's eager fp32 VGG for the classic net (else verydeep's exact eager path), "
        f"verydeep's exact eager dense view for dense; {settings['statistic']} ({settings['repeats']} each)"
    )
    return "\n".join(lines)
