"""Time, peak memory and output size of generating a hypernetwork for GPT-2 small (124M).

Each run is a fresh subprocess that runs the real CLI (``hypernn_gen.cli.main``, what
``hypernn-gen TARGET --mode MODE -o FILE`` runs) on ``benchmarks/targets/gpt124m.py`` and
reports:

* the wall time of the whole process (interpreter start, imports, generation, writing) and of
  ``main()`` alone (after ``import torch`` and the CLI's own imports);
* memory: the process's peak RSS (``getrusage``'s ``ru_maxrss``), and how far its anonymous
  RSS (``RssAnon`` in ``/proc/self/status``, sampled every millisecond: the process's own
  memory) rose above its value after those imports. That increase is the generation's own cost
  (tracing on the ``meta`` device, rendering, formatting; torch's lazy imports included). The
  total RSS also counts the pages of torch's shared libraries mapped in, which vary with what
  other processes have loaded (it read 344 MiB alone and 530 MiB beside other test processes,
  for the same anonymous peak);
* the size of the generated file, its number of lines and of layout lines (``ParamSlice(...)``,
  one per generated tensor).

The target's float32 parameters would take 475 MiB; generation must stay far below that (the
script exits with status 1 when the median increase is not below half of it, or a file is
200 KB or more). About 75 MiB of the increase is torch importing ``torch._dynamo`` on the first
``torch.nn.init`` call on a meta tensor, whatever the target's size. Prints a Markdown table
with every run and the median per mode.

A second table builds the generated static module, again in fresh processes: on the CPU
(``Gpt124mHyperNetwork()``, which builds the whole target and then drops the generated tensors)
and on the ``meta`` device followed by ``to_empty(device="cpu")`` and ``reset_parameters()``
(which never allocates the target): time and anonymous-RSS increase, as above.

    python benchmarks/bench_generate_large.py [--runs 3] [--modes static dynamic]

Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]
TARGET = Path(__file__).resolve().parent / "targets" / "gpt124m.py"
MIB = 2**20
MAX_FILE_BYTES = 200_000

# Both scripts below start with this: anonymous RSS and a sampler for its peak.
SAMPLER = """
import json, resource, sys, threading, time

def anon_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))

class Peak:
    def __enter__(self):
        self.start = self.peak = anon_kib()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while not self.done.is_set():
            self.peak = max(self.peak, anon_kib())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, anon_kib())
"""

# Runs in a fresh subprocess: argv = [output file, mode, target].
DRIVER = (
    SAMPLER
    + """
start = time.perf_counter()
import torch
from hypernn_gen.cli import main
begin = time.perf_counter()
with Peak() as peak:
    code = main([sys.argv[3], "--mode", sys.argv[2], "-o", sys.argv[1], "--force"])
end = time.perf_counter()
print(json.dumps({"code": code, "main_s": end - begin, "imports_s": begin - start,
                  "increase_kib": peak.peak - peak.start,
                  "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""
)


def run_once(mode: str, target: Path, out_dir: Path) -> dict[str, float]:
    """One generation in a fresh process; the figures for the table."""
    output = out_dir / f"gpt124m_torch_{mode}.py"
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, str(output), mode, str(target)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    process_s = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"generation failed:\n{result.stdout}\n{result.stderr}")
    measured = json.loads(result.stdout.splitlines()[-1])
    if measured["code"] != 0:
        raise SystemExit(f"hypernn-gen exited with {measured['code']}:\n{result.stderr}")
    text = output.read_text()
    return {
        "process_s": process_s,
        "main_s": measured["main_s"],
        "peak_mib": measured["peak_rss_kib"] * 1024 / MIB,  # Linux: ru_maxrss is in KiB
        "increase_mib": measured["increase_kib"] * 1024 / MIB,
        "file_kb": output.stat().st_size / 1000,
        "lines": text.count("\n"),
        "layout_lines": sum(line.lstrip().startswith("ParamSlice(") for line in text.splitlines()),
    }


# Runs in a fresh subprocess: argv = [generated file, "cpu" | "meta"].
BUILD = (
    SAMPLER
    + """
import importlib.util
import torch
spec = importlib.util.spec_from_file_location("generated", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules["generated"] = module
spec.loader.exec_module(module)
(cls,) = (v for k, v in vars(module).items() if k.endswith("HyperNetwork"))
begin = time.perf_counter()
with Peak() as peak:
    if sys.argv[2] == "meta":
        with torch.device("meta"):
            hypernetwork = cls()
        hypernetwork.to_empty(device="cpu")
        hypernetwork.reset_parameters()
    else:
        hypernetwork = cls()
seconds = time.perf_counter() - begin
print(json.dumps({"seconds": seconds, "increase_kib": peak.peak - peak.start,
                  "parameters": sum(p.numel() for p in hypernetwork.parameters())}))
"""
)


def build_once(generated: Path, how: str) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, "-c", BUILD, str(generated), how],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"building the generated module failed:\n{result.stderr}")
    return json.loads(result.stdout.splitlines()[-1])


def target_size(target: Path) -> tuple[int, int]:
    """Generated values and tensors of the target, traced on the meta device."""
    sys.path.insert(0, str(ROOT))
    from hypernn_gen.load import load_target
    from hypernn_gen.trace import trace_target

    layout = trace_target(load_target(str(target)))
    return layout.num_generated, len(layout.generated)


COLUMNS = (
    ("process_s", "whole CLI process (s)", 2),
    ("main_s", "generation after imports (s)", 2),
    ("peak_mib", "peak RSS, total (MiB)", 0),
    ("increase_mib", "own memory: peak rise after imports (MiB)", 0),
    ("file_kb", "file size (KB)", 1),
    ("lines", "lines", 0),
    ("layout_lines", "layout lines", 0),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per mode (default 3)")
    parser.add_argument("--modes", nargs="+", default=["static", "dynamic"])
    parser.add_argument("--target", default=str(TARGET), help="target file[:NAME]")
    args = parser.parse_args(argv)
    target = Path(args.target).resolve()

    values, tensors = target_size(target)
    float32_mib = values * 4 / MIB
    rows: list[tuple[str, dict[str, float]]] = []
    medians: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            runs = [run_once(mode, target, Path(tmp)) for _ in range(args.runs)]
            rows += [(f"{mode} {i}", r) for i, r in enumerate(runs, 1)]
            medians[mode] = {k: statistics.median(r[k] for r in runs) for k, _, _ in COLUMNS}
            rows.append((f"**{mode} median**", medians[mode]))
        builds: dict[str, dict[str, float]] = {}
        if "static" in args.modes:
            generated = Path(tmp) / "gpt124m_torch_static.py"
            for how in ("cpu", "meta"):
                runs = [build_once(generated, how) for _ in range(args.runs)]
                builds[how] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}

    print(
        f"Generating `{target.name}` ({values:,} generated values in {tensors} tensors, "
        f"{float32_mib:,.0f} MiB as float32) with the CLI, one fresh process per run "
        f"(Python {sys.version.split()[0]}).\n"
    )
    print("| run | " + " | ".join(title for _, title, _ in COLUMNS) + " |")
    print("|---|" + "---:|" * len(COLUMNS))
    for label, r in rows:
        bold = "**" if label.startswith("**") else ""
        cells = [f"{bold}{r[k]:,.{digits}f}{bold}" for k, _, digits in COLUMNS]
        print(f"| {label} | " + " | ".join(cells) + " |")

    if builds:
        print(
            "\nBuilding the generated static module (median of the runs; own memory: peak "
            "rise of the anonymous RSS):\n"
        )
        print("| construction | time (s) | own memory: peak rise (MiB) | hypernetwork parameters |")
        print("|---|---:|---:|---:|")
        labels = {
            "cpu": "`Gpt124mHyperNetwork()` on the CPU",
            "meta": 'on `meta`, then `to_empty(device="cpu")` + `reset_parameters()`',
        }
        for how, r in builds.items():
            print(
                f"| {labels[how]} | {r['seconds']:.2f} | {r['increase_kib'] / 1024:,.0f} "
                f"| {int(r['parameters']):,} |"
            )

    failures = [
        f"{mode}: memory rose by {m['increase_mib']:.0f} MiB, not below half of "
        f"the target's {float32_mib:.0f} MiB"
        for mode, m in medians.items()
        if m["increase_mib"] >= float32_mib / 2
    ] + [
        f"{mode}: the file is {m['file_kb']:.0f} KB (limit {MAX_FILE_BYTES // 1000} KB)"
        for mode, m in medians.items()
        if m["file_kb"] * 1000 >= MAX_FILE_BYTES
    ]
    for failure in failures:
        print(f"\nFAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
