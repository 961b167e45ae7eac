"""Time and memory of tracing a GPT-2-small-sized target the way ``hypernn-gen inspect`` does.

Each run is a fresh subprocess (so the memory figure is clean): it imports torch, takes its RSS
as the baseline, then runs ``load_target`` + ``trace_target`` (the CLI's code path) on
``benchmarks/targets/gpt124m.py`` and reports the wall time and the peak RSS above the baseline
(sampled every millisecond with psutil, cross-checked with ``getrusage``). It then traces again
in the same process ("again"): the first trace also pays torch's one-off lazy imports of its
meta-device machinery, the second shows the cost of tracing itself.

The target is built on the ``meta`` device, so the increase must stay far below the 475 MiB its
float32 weights would take, and below 1 GiB in any case (the script exits with status 1
otherwise). Prints a Markdown table with the median of the runs.

    python benchmarks/bench_trace.py [--runs 3] [--target benchmarks/targets/gpt124m.py]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TARGET = Path(__file__).resolve().parent / "targets" / "gpt124m.py"
LIMIT_MIB = 1024.0
MIB = 2**20


def measure(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """Run ``fn``; return its wall time, its peak RSS above the RSS at the start (MiB), its result.

    RSS is sampled every millisecond; ``getrusage``'s lifetime peak is used too when it grew
    during ``fn`` (it catches spikes shorter than the sampling interval).
    """
    import resource
    import threading
    import time

    import psutil

    process = psutil.Process()
    baseline = process.memory_info().rss
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    sampled = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal sampled
        while not done.is_set():
            sampled = max(sampled, process.memory_info().rss)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = max(sampled, peak_after if peak_after > peak_before else baseline)
    return seconds, (peak - baseline) / MIB, result


def worker(target: str) -> dict[str, float | int | str]:
    """One run in this (fresh) process: a first trace after ``import torch``, then a second."""
    import torch  # noqa: F401 - the baseline includes torch itself

    def load_and_trace() -> Any:
        from hypernn_gen.load import load_target
        from hypernn_gen.trace import trace_target

        return trace_target(load_target(target))

    seconds, memory, layout = measure(load_and_trace)
    again_seconds, again_memory, _ = measure(load_and_trace)
    return {
        "seconds": seconds,
        "peak_increase_mib": memory,
        "again_seconds": again_seconds,
        "again_peak_increase_mib": again_memory,
        "num_generated": layout.num_generated,
        "num_tensors": len(layout.tensors),
        "target_name": layout.target_name,
    }


def run_once(target: str) -> dict[str, float | int | str]:
    result = subprocess.run(
        [sys.executable, __file__, "--worker", "--target", target],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"benchmark run failed:\n{result.stderr}")
    return json.loads(result.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="number of runs (default 3)")
    parser.add_argument("--target", default=str(DEFAULT_TARGET), help="target file[:NAME]")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(worker(args.target)))
        return 0

    runs = [run_once(args.target) for _ in range(args.runs)]
    columns = ("seconds", "peak_increase_mib", "again_seconds", "again_peak_increase_mib")
    median = {c: statistics.median(float(r[c]) for r in runs) for c in columns}
    memory = median["peak_increase_mib"]
    first = runs[0]
    size = int(first["num_generated"])
    print(
        f"Tracing {Path(args.target).name} ({first['target_name']}: {size:,} generated "
        f"parameters, {first['num_tensors']} tensors, {size * 4 / MIB:,.0f} MiB as float32) "
        "with load_target + trace_target; one fresh subprocess per run, RSS baseline taken "
        'after import torch. "again" repeats the trace in the same process.\n'
    )
    print(
        "| run | load + trace (s) | peak RSS increase (MiB) | again (s) "
        "| again: peak RSS increase (MiB) |"
    )
    print("|---:|---:|---:|---:|---:|")
    rows = [(str(i), r) for i, r in enumerate(runs, 1)] + [("**median**", median)]
    for label, r in rows:
        bold = "**" if label.startswith("**") else ""
        cells = [f"{bold}{float(r[c]):.{1 if c.endswith('mib') else 2}f}{bold}" for c in columns]
        print(f"| {label} | " + " | ".join(cells) + " |")
    if memory >= LIMIT_MIB:
        print(f"\nFAIL: the median peak increase is not below {LIMIT_MIB:.0f} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
