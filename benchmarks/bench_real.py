"""Dynamic mode on real models: the fused whole-batch path against the materialising vmap path.

    python benchmarks/bench_real.py [--threads 1] [--batches 16,32] [--rounds 3] [--quick]
                                    [--eval]

Targets: a BERT-style encoder (transformers' ``BertModel`` from a tiny config, nothing
downloaded; ``benchmarks/targets/bert_tiny.py``, every batch of ``--batches``) and ResNet-18
(torchvision's structure, ``benchmarks/targets/resnet18.py``, 32x32 inputs, 10 classes; the
first batch only: one vmap step takes about a minute on a loaded 2-core machine). Each is generated with the real
CLI in dynamic mode. Candidates, forward+backward (a fixed random projection of the output, ``loss``), train
mode by default (BatchNorm on batch statistics, the generated file's default conditional
BatchNorm; dropout as the target has it: BERT's 0.1), ``--eval`` for eval mode (running
statistics, no dropout):

* ``target``: the plain target on the batch (one weight set for all: the floor);
* ``fused``: the generated module's default path (the target once on the whole batch, every
  layer in its batched form, no per-sample weights);
* ``vmap``: the generated module with ``return_params=True`` (builds the batch x P weights, then
  ``vmap(functional_call)`` over the whole target).

Before timing, ``fused`` and ``vmap`` are checked to agree (outputs and the gradients of every
hypernetwork parameter; in train mode with every ``nn.Dropout`` at p 0 for the check only, since
the two paths draw different dropout masks). Timing is interleaved (round-robin, rotating start) after a warm-up;
tables give medians and ratios. Peak memory: each candidate in a fresh subprocess, the growth of
the peak RSS over one forward+backward, next to one batch x P float32 buffer.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {
    "BERT-style encoder (2 layers, d 128)": ROOT / "benchmarks" / "targets" / "bert_tiny.py",
    "ResNet-18 (32x32, 10 classes)": ROOT / "benchmarks" / "targets" / "resnet18.py",
}
CANDIDATES = ("target", "fused", "vmap")


def import_file(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def generate(target: Path, out: Path) -> ModuleType:
    cmd = [sys.executable, "-m", "hypernn_gen", str(target), "--mode", "dynamic", "-o", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    return import_file(out, out.stem)


def first(out: Any) -> Any:
    import torch

    return out if isinstance(out, torch.Tensor) else out[0]


def loss(out: Any) -> Any:
    """A fixed random projection of the first output. Not ``out.square().mean()``: on a
    LayerNorm output (BERT's last hidden state) that is nearly constant, so every gradient
    before the last LayerNorm would be rounding noise around zero."""
    import torch

    out = first(out)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
    return (out * probe).mean()


def make_input(target: ModuleType, batch: int) -> Any:
    import torch

    x = target.example_input
    generator = torch.Generator().manual_seed(batch)
    if x.dtype.is_floating_point:
        return torch.randn((batch, *x.shape[1:]), generator=generator)
    return torch.randint(0, 100, (batch, *x.shape[1:]), generator=generator)


def build(generated: ModuleType, target: ModuleType, train: bool) -> tuple[Any, Any]:
    import torch

    torch.manual_seed(0)
    hyper = next(
        v for k, v in vars(generated).items() if k.endswith("HyperNetwork") and isinstance(v, type)
    )().train(train)
    plain = target.make_target().train(train)
    return hyper, plain


def steps(hyper: Any, plain: Any) -> dict[str, Any]:
    def run_target(x: Any) -> None:
        loss(plain(x)).backward()
        plain.zero_grad(set_to_none=True)

    def run_fused(x: Any) -> None:
        loss(hyper(x)[0]).backward()
        hyper.zero_grad(set_to_none=True)

    def run_vmap(x: Any) -> None:
        loss(hyper(x, return_params=True)[0]).backward()
        hyper.zero_grad(set_to_none=True)

    return {"target": run_target, "fused": run_fused, "vmap": run_vmap}


def check(hyper: Any, x: Any) -> str:
    """fused == vmap: outputs and gradients; returns the largest relative difference. Dropout
    is off for the check (each path draws its own masks); BatchNorm keeps the mode."""
    import torch

    dropouts = [m for m in hyper.modules() if isinstance(m, torch.nn.Dropout)]
    saved = [m.p for m in dropouts]
    for m in dropouts:
        m.p = 0.0
    state = {k: v.clone() for k, v in hyper.state_dict().items()}  # running statistics
    worst = 0.0
    outs, grads = [], []
    for kwargs in ({}, {"return_params": True}):
        hyper.load_state_dict(state)
        out = first(hyper(x, **kwargs)[0])
        loss(out).backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in hyper.named_parameters() if p.grad is not None})
        hyper.zero_grad(set_to_none=True)
    pairs = [(outs[0], outs[1])] + [(grads[0][n], grads[1][n]) for n in grads[1]]
    floor = 1e-3 * max(float(b.abs().max()) for _, b in pairs[1:])  # rounding noise on ~0 grads
    for a, b in pairs:
        scale = max(float(b.abs().max()), floor)
        worst = max(worst, float((a - b).abs().max()) / scale)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * scale)
    hyper.load_state_dict(state)
    for m, p in zip(dropouts, saved, strict=True):
        m.p = p
    return f"{worst:.1e}"


def time_interleaved(runs: dict[str, Any], x: Any, rounds: int) -> dict[str, Any]:
    live, times, errors = [], {}, {}
    for name, run in runs.items():
        try:
            run(x)  # warm-up
        except Exception as error:  # noqa: BLE001 - reported in the table
            errors[name] = f"{type(error).__name__}: {error}".splitlines()[0][:140]
            continue
        live.append(name)
        times[name] = []
    for r in range(rounds):
        for name in live[r % len(live) :] + live[: r % len(live)]:
            start = time.perf_counter()
            runs[name](x)
            times[name].append(time.perf_counter() - start)
    return {"ms": {n: statistics.median(t) * 1e3 for n, t in times.items()}, "errors": errors}


def memory_worker(spec: dict[str, Any]) -> None:
    """One candidate in this fresh process: peak RSS growth (MiB) over one forward+backward,
    after a batch-1 step (allocator, lazy initialisation)."""
    import torch

    torch.set_num_threads(spec["threads"])
    generated = import_file(Path(spec["generated"]), "generated")
    target = import_file(Path(spec["target"]), "target")
    hyper, plain = build(generated, target, spec["train"])
    x = make_input(target, spec["batch"])
    run = steps(hyper, plain)[spec["candidate"]]
    small = x[:1]
    run(small)  # allocator and lazy initialisation outside the measurement
    before = peak_rss_kib()
    run(x)
    print(json.dumps({"mib": (peak_rss_kib() - before) / 1024}))


def peak_rss_kib() -> int:
    """This process's peak RSS (VmHWM; unlike ru_maxrss, not inherited from the parent across
    fork and exec, which would hide the growth behind the benchmark process's own peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure_memory(spec: dict[str, Any]) -> str:
    proc = subprocess.run(
        [sys.executable, __file__, "--memory-worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        return "fails: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:100]
    return f"{json.loads(proc.stdout.strip().splitlines()[-1])['mib']:,.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", default="16,32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="batch 4, 2 rounds, no memory")
    parser.add_argument("--memory-only", action="store_true", help="the memory table only")
    parser.add_argument("--eval", action="store_true", help="eval mode (default: train mode)")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_worker:
        memory_worker(json.loads(args.memory_worker))
        return 0
    import torch

    torch.set_num_threads(args.threads)
    batches = [4] if args.quick else [int(b) for b in args.batches.split(",")]
    rounds = 2 if args.quick else args.rounds
    lines = [
        f"- {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, torch "
        f"{torch.__version__}, {args.threads} thread(s), {'eval' if args.eval else 'train'} mode; "
        "load average at the start: " + " / ".join(f"{v:.1f}" for v in os.getloadavg()),
        f"- command: `python benchmarks/bench_real.py {' '.join(argv or sys.argv[1:])}`",
        "",
        "| target | P (generated) | batch | target alone | fused | vmap | vmap / fused | "
        "fused / target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    memory_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, path in TARGETS.items():
            generated = generate(path, Path(tmp) / f"{path.stem}_dynamic.py")
            target = import_file(path, path.stem)
            hyper, plain = build(generated, target, not args.eval)
            flat = generated.FLAT_SIZE
            per_sample = getattr(generated, "PER_SAMPLE", ())
            print(f"{label}: {flat:,} values, per sample: {per_sample or 'none'}", flush=True)
            diff = check(hyper, make_input(target, 3))
            print(f"  fused == vmap (max relative difference {diff})", flush=True)
            timed = [] if args.memory_only else batches if "BERT" in label else batches[:1]
            for batch in timed:
                x = make_input(target, batch)
                result = time_interleaved(steps(hyper, plain), x, rounds)
                ms, errors = result["ms"], result["errors"]

                def cell(name: str, ms: dict = ms, errors: dict = errors) -> str:
                    return f"{ms[name]:,.1f} ms" if name in ms else f"fails ({errors[name]})"

                ratio = (
                    f"{ms['vmap'] / ms['fused']:.1f}x" if "vmap" in ms and "fused" in ms else "-"
                )
                floor = f"{ms['fused'] / ms['target']:.1f}x" if "fused" in ms else "-"
                row = (
                    f"| {label} | {flat:,} | {batch} | {cell('target')} | {cell('fused')} | "
                    f"{cell('vmap')} | {ratio} | {floor} |"
                )
                print(row, flush=True)
                lines.append(row)
            if not args.quick:
                batch = batches[0]
                spec = {
                    "threads": args.threads,
                    "train": not args.eval,
                    "generated": str(Path(tmp) / f"{path.stem}_dynamic.py"),
                    "target": str(path),
                    "batch": batch,
                }
                mib = {c: measure_memory({**spec, "candidate": c}) for c in CANDIDATES}
                buffer = batch * flat * 4 / 2**20
                row = (
                    f"| {label} | {batch} | {mib['target']} | {mib['fused']} | {mib['vmap']} | "
                    f"{buffer:,.0f} |"
                )
                print(row, flush=True)
                memory_rows.append(row)
    if memory_rows:
        lines += [
            "",
            "Peak memory growth over one forward+backward (MiB, fresh process per candidate, "
            "peak RSS), next to one batch x P float32 buffer:",
            "",
            "| target | batch | target alone | fused | vmap | batch x P x 4 bytes |",
            "|---|---|---|---|---|---|",
            *memory_rows,
        ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
