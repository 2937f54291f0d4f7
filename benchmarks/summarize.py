"""Markdown tables from ``verydeep bench --json`` / ``inference_cpu.py --out`` reports.

python benchmarks/summarize.py benchmarks/results/cpu_*.json
"""

from __future__ import annotations

import argparse
import json
import sys


def table(report: dict) -> str:
    m, load = report["machine"], report.get("load", {})
    during = load.get("others_during_timing")
    head = (
        f"{m['date']}, {m['torch_threads']} threads, torch {m['torch']}"
        + (f", environment {report['environment']}" if report.get("environment") else "")
        + f"; other processes' CPU share before/during/after: {load.get('cpu_busy_before')}/"
        + f"{during if during is not None else 'n/a'}/{load.get('cpu_busy_after')}"
    )
    rows = [
        "| input | engine | img/s | latency ms | GFLOP/s | vs baseline | RSS growth per call MB | rel. error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        rows.append(
            f"| {r['view']} {r['batch']}x{r['height']}x{r['width']} | {r['engine']} {r['precision']} | "
            f"{r['images_per_s']:.2f} | {r['latency_ms']:.1f} | {r['gflops']:.0f} | "
            f"{r['speedup']:.2f}x | {r.get('call_mb', 0):.0f} | {r['rel_error']:.1e} |"
        )
    return head + "\n\n" + "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+", metavar="REPORT.json", help="verydeep bench --json reports")
    for path in ap.parse_args().reports:
        print(f"### {path}\n")
        with open(path) as f:
            print(table(json.load(f)))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
