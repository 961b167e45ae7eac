"""Probe for issue 16's open gap: the tiny GPT's static hypernetwork under SGD 0.5 / Adam 3e-3.

Not the shipped decode: this script rebuilds the generated hypernetwork
(generated_examples/transformer_torch_static.py) with two forward-side changes and reports the
final loss over the plain target's, per seed, with the data, batches and steps of
tests/test_training_sgd.py (300 steps of 32 windows of 16 characters):

* ``shared``: the generated file as it is (one generator for every tensor);
* ``shared-norm``: the same, each tensor's raw chunk normalised to unit RMS before the decode;
* ``per-tensor``: every generated tensor its own embedding rows and linear head, with the
  gradient multipliers of docs/concepts.md computed from that tensor's own init variance
  (``s_t²``; tensors whose init std is 0 use ``--zero-var``), raw chunk normalised to unit RMS.

Run: ``python benchmarks/probe_char_lm.py --seeds 1 2 3 --threads 1``.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_training_sgd import char_lm_data, cross_entropy, train  # noqa: E402

from hypernn_gen.kernel.torch import scale_grad  # noqa: E402


def load(path: Path) -> object:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = load(REPO / "generated_examples" / "transformer_torch_static.py")


def unit_rms(raw: Tensor) -> Tensor:
    return raw / raw.square().mean().add(1e-12).sqrt()


class SharedNorm(nn.Module):
    """The generated hypernetwork, each tensor's raw chunk normalised before the decode."""

    def __init__(self, target: nn.Module) -> None:
        super().__init__()
        self.base = GEN.TransformerHyperNetwork(target)

    def forward(self, x: Tensor) -> Tensor:
        b = self.base
        raw = b.weight_generator(b.embedding_module()).reshape(-1)
        pieces = [unit_rms(raw[p.offset : p.offset + p.size]) for p in GEN.GENERATED]
        return b(x, generated_params=b.decode(torch.cat(pieces)))


class PerTensor(nn.Module):
    """One embedding table and one linear head per generated tensor, normalised decode."""

    def __init__(self, target: nn.Module, zero_var: float) -> None:
        super().__init__()
        self.base = GEN.TransformerHyperNetwork(target)
        c, d = GEN.CHUNK_DIM, GEN.EMBEDDING_DIM
        self.tables = nn.ParameterList()
        self.heads = nn.ModuleList()
        self.multipliers = []
        for p in GEN.GENERATED:
            n = -(-p.size // c)
            self.tables.append(nn.Parameter(torch.randn(n, d)))
            head = nn.Linear(d, c)
            with torch.no_grad():
                head.weight.normal_(0.0, d**-0.5)
                head.bias.zero_()
            self.heads.append(head)
            s2 = p.init_std**2 if p.init_std > 0 else zero_var
            self.multipliers.append(
                (math.sqrt(d / c) / s2, 1 / (s2 * math.sqrt(n * d)), 1 / (s2 * math.sqrt(n)))
            )

    def forward(self, x: Tensor) -> Tensor:
        raws = []
        for p, table, head, (mt, mw, mb) in zip(
            GEN.GENERATED, self.tables, self.heads, self.multipliers, strict=True
        ):
            w, b = scale_grad(head.weight, mw), scale_grad(head.bias, mb)
            raw = nn.functional.linear(scale_grad(table, mt), w, b).reshape(-1)[: p.size]
            raws.append(unit_rms(raw))
        return self.base(x, generated_params=self.base.decode(torch.cat(raws)))


OPTIMIZERS = {
    "sgd-0.5": lambda p: torch.optim.SGD(p, lr=0.5),
    "adam-3e-3": lambda p: torch.optim.Adam(p, lr=3e-3),
}


def build(variant: str, target: nn.Module, zero_var: float) -> nn.Module:
    if variant == "plain":
        return target
    if variant == "shared":
        return GEN.TransformerHyperNetwork(target)
    if variant == "shared-norm":
        return SharedNorm(target)
    return PerTensor(target, zero_var)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--zero-var", type=float, default=1e-2)
    parser.add_argument("--variants", nargs="+", default=["shared", "shared-norm", "per-tensor"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, y = char_lm_data()
    for name, optimizer in OPTIMIZERS.items():
        for seed in args.seeds:
            losses = {}
            for variant in ["plain", *args.variants]:
                torch.manual_seed(seed)
                model = build(variant, GEN.make_target(), args.zero_var)
                losses[variant] = train(model, optimizer, x, y, cross_entropy)
            ratios = " ".join(
                f"{v}={loss:.3f} ({loss / losses['plain']:.2f}x)" for v, loss in losses.items()
            )
            print(f"{name} seed {seed}: {ratios}", flush=True)


if __name__ == "__main__":
    main()
