"""Dynamic LoRA hypernetworks: forward+backward time and peak memory at batch 64 (issue 17).

Three ways to run a batch of B token sequences through a frozen transformer with one LoRA
adapter set per sample:

* ``base``: the transformer alone, every weight trainable (full fine-tuning's step, the floor);
* ``lora``: the dynamic LoRA hypernetwork (``TorchHyperNetwork(..., generate="lora",
  mode="dynamic")``): ``y_b = W x_b + s B_b (A_b x_b)`` with batched products, no per-sample W;
* ``merged``: the same adapters materialised as per-sample merged weights ``W + s B_b A_b`` and
  the transformer run per sample with ``torch.func.vmap`` over them (the naive way).

Times are medians of interleaved repetitions (round-robin, one step of each candidate per round)
in one process; peak memory is measured per candidate in a fresh process: on CPU the peak RSS
of two steps above the RSS before them (``VmHWM``), on CUDA ``max_memory_allocated`` above
the allocation before the step. ``lora`` and ``merged`` are checked to give the same outputs.

    python benchmarks/bench_lora.py --threads 1                 # CPU, writes a Markdown table
    python benchmarks/bench_lora.py --device cuda --d-model 1024
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hypernn_gen.runtime.torch import TorchHyperNetwork  # noqa: E402

CANDIDATES = ("base", "lora", "merged")


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.o_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, -1).transpose(1, 2)

        q, k, v = split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), -1) @ v
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class LM(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for block in self.layers:
            x = block(x)
        return self.head(x)


def build(args: argparse.Namespace) -> tuple:
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = LM(args.vocab, args.d_model, args.layers, args.heads).to(device)
    hyper = TorchHyperNetwork(
        model, generate="lora", mode="dynamic", condition_shape=(args.tasks,), lora_rank=args.rank
    ).to(device)
    with torch.no_grad():  # adapters that act, as after training
        for head in hyper.generator.heads_b:
            head.weight.normal_(0.0, 0.02)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    condition = F.one_hot(torch.arange(args.batch, device=device) % args.tasks, args.tasks).float()
    return model, hyper, ids, condition


def merged_forward(model: nn.Module, hyper: nn.Module, ids: torch.Tensor, condition: torch.Tensor):
    """Per-sample merged weights W + s B_b A_b for every adapted layer, the model vmapped."""
    adapters = hyper.generate_adapters(condition)
    frozen = {k: v.detach() for k, v in model.named_parameters()}
    merged = {
        f"{a.path}.weight": frozen[f"{a.path}.weight"]
        + hyper.scaling * adapters[f"{a.path}.lora_B"] @ adapters[f"{a.path}.lora_A"]
        for a in hyper.adapters
    }
    shared = {k: v for k, v in frozen.items() if k not in merged}

    def one(weights: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {**shared, **weights}, (x.unsqueeze(0),)).squeeze(0)

    return vmap(one)(merged, ids)


def steps(args: argparse.Namespace) -> dict:
    model, hyper, ids, condition = build(args)
    full = list(model.parameters())
    trainable = [p for p in hyper.parameters() if p.requires_grad]

    def base() -> None:
        model.zero_grad(set_to_none=True)
        model(ids).square().mean().backward()

    def lora() -> None:
        hyper.zero_grad(set_to_none=True)
        hyper(ids, condition=condition)[0].square().mean().backward()

    def merged() -> None:
        hyper.zero_grad(set_to_none=True)
        merged_forward(model, hyper, ids, condition).square().mean().backward()

    return {
        "base": base,
        "lora": lora,
        "merged": merged,
        "sizes": (full, trainable),
        "all": (model, hyper, ids, condition),
    }


def sync(args: argparse.Namespace) -> None:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def timings(args: argparse.Namespace) -> dict[str, float]:
    fns = steps(args)
    for name in CANDIDATES:  # warm up
        fns[name]()
    sync(args)
    times: dict[str, list[float]] = {name: [] for name in CANDIDATES}
    for r in range(args.rounds):
        order = CANDIDATES[r % 3 :] + CANDIDATES[: r % 3]  # rotate the starting candidate
        for name in order:
            start = time.perf_counter()
            fns[name]()
            sync(args)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def check(args: argparse.Namespace) -> float:
    """The largest difference between the LoRA path and the merged per-sample weights."""
    _, hyper, ids, condition = steps(args)["all"]
    model = hyper.target
    with torch.no_grad():
        a = hyper(ids, condition=condition)[0]
        b = merged_forward(model, hyper, ids, condition)
    return ((a - b).abs().max() / b.abs().max().clamp(min=1)).item()


def peak_one(args: argparse.Namespace, name: str) -> float:
    """In this (fresh) process: the peak memory of one step of ``name`` above the level before."""
    fns = steps(args)
    if args.device.startswith("cuda"):
        fns[name]()  # warm-up: allocator caches, autograd buffers
        sync(args)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fns[name]()
        sync(args)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with open("/proc/self/statm") as f:  # resident pages now, before any step
        before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    fns[name]()
    fns[name]()
    return vm_hwm_mib() - before


def vm_hwm_mib() -> float:
    """This process's peak RSS (``VmHWM``; ``ru_maxrss`` would carry the forking parent's)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def peak(args: argparse.Namespace, name: str) -> float:
    argv = [sys.executable, __file__, "--peak-of", name, *sys.argv[1:]]
    proc = subprocess.run(argv, capture_output=True, text=True, check=True)
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None, help="append the table to this file")
    parser.add_argument("--peak-of", choices=CANDIDATES, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.peak_of:
        print(json.dumps({"peak_mib": peak_one(args, args.peak_of)}))
        return 0
    error = check(args)
    if error > 1e-4:
        print(f"MISMATCH: lora vs merged per-sample weights differ by {error:.2e}", file=sys.stderr)
        return 1
    ms = timings(args)
    mib = {name: peak(args, name) for name in CANDIDATES}
    full, trainable = steps(args)["sizes"]
    where = args.device if args.device != "cpu" else f"cpu, {args.threads} thread(s)"
    lines = [
        f"### Dynamic LoRA, forward+backward, batch {args.batch} ({where})",
        "",
        f"Transformer d_model {args.d_model}, {args.layers} blocks, sequence {args.seq}, "
        f"{sum(p.numel() for p in full):,} weights; LoRA rank {args.rank} on every Linear in the "
        f"blocks, {sum(p.numel() for p in trainable):,} trainable generator parameters; one "
        f"adapter set per sample from a one-hot task id ({args.tasks} tasks). Median of "
        f"{args.rounds} interleaved rounds; lora vs merged agree to {error:.1e} (relative).",
        "",
        "| candidate | ms per step | x base | peak MiB above the step's start | x base |",
        "|---|---:|---:|---:|---:|",
    ]
    labels = {
        "base": "base alone (all weights trainable)",
        "lora": "dynamic LoRA hypernetwork (bmm, no per-sample W)",
        "merged": "per-sample merged weights, vmap",
    }
    for name in CANDIDATES:
        lines.append(
            f"| {labels[name]} | {ms[name]:.1f} | {ms[name] / ms['base']:.2f} | {mib[name]:.1f} | "
            f"{mib[name] / max(mib['base'], 1e-9):.2f} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out is not None:
        with args.out.open("a") as f:
            f.write("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
