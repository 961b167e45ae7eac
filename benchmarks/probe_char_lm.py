"""Probe for issue 16's open gap: the tiny GPT's static hypernetwork under SGD 0.5 / Adam 3e-3.

Not the shipped decode: this script rebuilds the generated hypernetwork
(generated_examples/transformer_torch_static.py) with two forward-side changes and reports the
final loss over the plain target's, per seed, with the data, batches and steps of
tests/test_training_sgd.py (300 steps of 32 windows of 16 characters):

* ``shared``: the generated file as it is (one generator for every tensor);
* ``shared-norm``: the same, each tensor's raw chunk normalised to unit RMS before the decode;
* ``per-tensor``: every generated tensor its own embedding rows and linear head, with the
  gradient multipliers of docs/concepts.md computed from that tensor's own init variance
  (``s_t²``; tensors whose init std is 0 use ``--zero-var``), raw chunk normalised to unit RMS;
* ``grouped:BASE:CHUNK:DIM[:ZERO_VAR[:BOOST]]``: the tensors grouped by init std on a log-BASE
  scale (``round(log_BASE s_t)``; zero-std tensors one group; BASE 0: one group per tensor),
  each group its own embedding table (``DIM`` wide) and linear head (``CHUNK`` values per row),
  the multipliers set from the group's size-weighted mean init variance and times ``BOOST``,
  every tensor's raw chunk normalised to unit RMS before the decode.

``--task regression`` runs the same variants on the seed MLP regression of that test file
(SGD 0.1, SGD + momentum 0.01, Adam 3e-3). Parameter counts exclude the unused shared generator.

Run: ``python benchmarks/probe_char_lm.py --seeds 0 1 2 3 --threads 1 --variants shared
grouped:2:124:32:1e-2:0.35``.
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

from test_training_sgd import (  # noqa: E402
    MLP_TARGET,
    char_lm_data,
    cross_entropy,
    mse,
    regression,
    train,
)
from test_training_sgd import OPTIMIZERS as REGRESSION_OPTIMIZERS  # noqa: E402

from hypernn_gen.kernel.torch import scale_grad  # noqa: E402


def load(path: Path) -> object:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = load(REPO / "generated_examples" / "transformer_torch_static.py")


def unit_rms(raw: Tensor) -> Tensor:
    return raw / raw.square().mean().add(1e-12).sqrt()


def assemble(raws: list[Tensor], gen: object) -> Tensor:
    """The per-tensor raw pieces at their layout offsets (zero padding between tensors)."""
    pieces, end = [], 0
    for p, raw in zip(gen.GENERATED, raws, strict=True):
        if p.offset > end:
            pieces.append(raw.new_zeros(p.offset - end))
        pieces.append(raw)
        end = p.offset + p.size
    if gen.FLAT_SIZE > end:
        pieces.append(raws[0].new_zeros(gen.FLAT_SIZE - end))
    return torch.cat(pieces)


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
        return self.base(x, generated_params=self.base.decode(assemble(raws, GEN)))


def std_groups(base: float, gen: object = None) -> list[list[int]]:
    """Tensors grouped by init std on a log scale (``base``); zero-std tensors form one group."""
    keys: dict[object, list[int]] = {}
    for i, p in enumerate((gen or GEN).GENERATED):
        key = "zero" if p.init_std == 0 else math.floor(math.log(p.init_std, base) + 0.5)
        keys.setdefault(key, []).append(i)
    return list(keys.values())


class Grouped(nn.Module):
    """One embedding table and linear head per group of tensors (``chunk`` x ``dim``), the
    multipliers set from the group's size-weighted mean init variance; normalised decode."""

    def __init__(
        self,
        target: nn.Module,
        groups: list[list[int]],
        zero_var: float,
        chunk: int,
        dim: int,
        norm: bool = True,
        boost: float = 1.0,
        gen: object = None,
    ) -> None:
        super().__init__()
        self.gen = gen = gen or GEN
        (cls,) = [v for k, v in vars(gen).items() if k.endswith("HyperNetwork")]
        self.base = cls(target)
        self.groups, self.norm = groups, norm
        self.tables = nn.ParameterList()
        self.heads = nn.ModuleList()
        self.multipliers = []
        for group in groups:
            tensors = [gen.GENERATED[i] for i in group]
            size = sum(p.size for p in tensors)
            n = -(-size // chunk)
            self.tables.append(nn.Parameter(torch.randn(n, dim)))
            head = nn.Linear(dim, chunk)
            with torch.no_grad():
                head.weight.normal_(0.0, dim**-0.5)
                head.bias.zero_()
            self.heads.append(head)
            s2 = sum(p.size * (p.init_std**2 if p.init_std > 0 else zero_var) for p in tensors)
            s2 /= size
            self.multipliers.append(
                tuple(
                    boost * m
                    for m in (
                        math.sqrt(dim / chunk) / s2,
                        1 / (s2 * math.sqrt(n * dim)),
                        1 / (s2 * math.sqrt(n)),
                    )
                )
            )

    def forward(self, x: Tensor) -> Tensor:
        gen = self.gen
        raws: list[Tensor | None] = [None] * len(gen.GENERATED)
        for group, table, head, (mt, mw, mb) in zip(
            self.groups, self.tables, self.heads, self.multipliers, strict=True
        ):
            w, b = scale_grad(head.weight, mw), scale_grad(head.bias, mb)
            raw = nn.functional.linear(scale_grad(table, mt), w, b).reshape(-1)
            sizes = [gen.GENERATED[i].size for i in group]
            pieces = raw[: sum(sizes)].split(sizes)
            for i, piece in zip(group, pieces, strict=True):
                raws[i] = unit_rms(piece) if self.norm else piece
        return self.base(x, generated_params=self.base.decode(assemble(raws, gen)))


class Aligned(nn.Module):
    """The design of hypernn_gen.design: the generated file's own tensor-aligned chunks, one
    head per :func:`~hypernn_gen.design.std_groups` group on that group's embedding rows, the
    multipliers of :func:`~hypernn_gen.design.group_gradient_multipliers` (times ``boost``
    over their derived value), each tensor's raw chunk normalised to unit RMS (``norm``)."""

    def __init__(
        self,
        target: nn.Module,
        gen: object,
        norm: bool = True,
        boost: float = 1.0,
        trace: bool = False,
        zero: str = "",
    ) -> None:
        super().__init__()
        self.zero = zero
        from types import SimpleNamespace

        from hypernn_gen import design
        from hypernn_gen.layout import Chunking

        self.gen = gen
        (cls,) = [v for k, v in vars(gen).items() if k.endswith("HyperNetwork")]
        self.base = cls(target)
        self.norm = norm
        layout = SimpleNamespace(generated=gen.GENERATED)
        chunking = Chunking(gen.NUM_EMBEDDINGS, gen.CHUNK_DIM)
        self.rows = design.group_rows(layout, chunking)
        mult = design.group_gradient_multipliers(layout, chunking, gen.EMBEDDING_DIM)
        if trace:  # the blocks' mean eigenvalue (trace over size) 1/3 each, not their middle
            c, d = gen.CHUNK_DIM, gen.EMBEDDING_DIM
            mult = [
                (mt * math.sqrt(c / d), mw * math.sqrt(len(r) / d), mb * math.sqrt(len(r)))
                for (mt, mw, mb), r in zip(mult, self.rows, strict=True)
            ]
        self.multipliers = [tuple(boost * m for m in ms) for ms in mult]
        c, d = gen.CHUNK_DIM, gen.EMBEDDING_DIM
        self.table = nn.Parameter(torch.randn(gen.NUM_EMBEDDINGS, d))
        self.heads = nn.ModuleList()
        for _ in self.rows:
            head = nn.Linear(d, c)
            with torch.no_grad():
                head.weight.normal_(0.0, d**-0.5)
                head.bias.zero_()
            self.heads.append(head)
        # zero-std tensors (``zero``): "direct" adds a per-value parameter (a diagnosis: the
        # upper bound of mending them); "head" zero-initialises their group's head, leaves their
        # raw values unnormalised and adds them to the decode (value = shift + raw at the start)
        mask = torch.zeros(gen.FLAT_SIZE)
        for p in gen.GENERATED:
            if p.init_std == 0:
                mask[p.offset : p.offset + p.size] = 1
        self.register_buffer("zero_mask", mask)
        self.zero_group = [
            g
            for g, r in enumerate(self.rows)
            if all(mask[k * c : (k + 1) * c].sum() > 0 for k in r)
        ]
        if zero == "direct":
            self.direct = nn.Parameter(torch.zeros(gen.FLAT_SIZE))
        if zero == "head":
            for g in self.zero_group:
                with torch.no_grad():
                    self.heads[g].weight.zero_()
                mt, _, _ = self.multipliers[g]
                self.multipliers[g] = (mt, 1.0 / d, 1.0 / len(self.rows[g]))

    def forward(self, x: Tensor) -> Tensor:
        gen = self.gen
        c = gen.CHUNK_DIM
        out = self.table.new_zeros(gen.NUM_EMBEDDINGS, c)
        chunks = []
        for rows, head, (mt, mw, mb) in zip(self.rows, self.heads, self.multipliers, strict=True):
            idx = torch.tensor(rows)
            table = scale_grad(self.table[idx], mt)
            w, b = scale_grad(head.weight, mw), scale_grad(head.bias, mb)
            chunks.append((idx, nn.functional.linear(table, w, b)))
        for idx, val in chunks:
            out = out.index_copy(0, idx, val)
        flat = out.reshape(-1)
        raws = []
        for p in gen.GENERATED:
            piece = flat[p.offset : p.offset + p.size]
            keep = not self.norm or (self.zero == "head" and p.init_std == 0)
            raws.append(piece if keep else unit_rms(piece))
        raw = assemble(raws, gen)
        decoded = self.base.decode(raw)
        if self.zero == "direct":
            decoded = decoded + self.direct * self.zero_mask
        if self.zero == "head":
            decoded = decoded + raw * self.zero_mask
        return self.base(x, generated_params=decoded)


OPTIMIZERS = {
    "sgd-0.5": lambda p: torch.optim.SGD(p, lr=0.5),
    "adam-3e-3": lambda p: torch.optim.Adam(p, lr=3e-3),
}


def build(variant: str, target: nn.Module, zero_var: float, gen: object = None) -> nn.Module:
    # grouped:BASE:CHUNK:DIM[:ZERO_VAR[:BOOST[:raw]]]  (BASE 0: one group per tensor)
    # aligned[-trace|-direct|-head][:BOOST[:raw]]  (the design of hypernn_gen.design on the
    # file's chunks; -trace: multipliers from each block's mean eigenvalue; -direct / -head:
    # zero-std tensors with a per-value parameter of their own / a zero-initialised head)
    if variant.startswith("aligned"):
        name, *rest = variant.split(":")
        boost = float(rest[0]) if rest else 1.0
        trace = name.endswith("-trace")
        zero = name.split("-")[1] if name.startswith("aligned-") and not trace else ""
        return Aligned(target, gen or GEN, norm=len(rest) < 2, boost=boost, trace=trace, zero=zero)
    if variant.startswith("grouped"):
        _, base, chunk, dim, *rest = variant.split(":")
        n = len((gen or GEN).GENERATED)
        groups = std_groups(float(base), gen) if float(base) > 0 else [[i] for i in range(n)]
        zv = float(rest[0]) if rest else zero_var
        boost = float(rest[1]) if len(rest) > 1 else 1.0
        norm = len(rest) < 3
        return Grouped(target, groups, zv, int(chunk), int(dim), norm=norm, boost=boost, gen=gen)
    if variant == "plain":
        return target
    if variant == "shared":
        (cls,) = [v for k, v in vars(gen or GEN).items() if k.endswith("HyperNetwork")]
        return cls(target)
    if variant == "shared-norm":
        return SharedNorm(target)
    return PerTensor(target, zero_var)


def regression_file() -> object:
    """The seed MLP of tests/test_training_sgd.py, generated in static mode."""
    import tempfile

    from hypernn_gen.cli import main as cli

    root = Path(tempfile.mkdtemp())
    (root / "mlp.py").write_text(MLP_TARGET)
    assert cli([str(root / "mlp.py"), "--mode", "static", "-o", str(root / "mlp_static.py")]) == 0
    return load(root / "mlp_static.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--zero-var", type=float, default=1e-2)
    parser.add_argument("--variants", nargs="+", default=["shared", "shared-norm", "per-tensor"])
    parser.add_argument("--optimizers", nargs="+", default=None)
    parser.add_argument("--task", choices=["char-lm", "regression"], default="char-lm")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.task == "regression":
        gen, (x, y), loss_fn, table = regression_file(), regression(), mse, REGRESSION_OPTIMIZERS
    else:
        gen, (x, y), loss_fn, table = GEN, char_lm_data(), cross_entropy, OPTIMIZERS
    args.optimizers = args.optimizers or list(table)
    for name in args.optimizers:
        optimizer = table[name]
        for seed in args.seeds:
            losses = {}
            for variant in ["plain", *args.variants]:
                torch.manual_seed(seed)
                model = build(variant, gen.make_target(), args.zero_var, gen)
                losses[variant] = train(model, optimizer, x, y, loss_fn)
            ratios = " ".join(
                f"{v}={loss:.3f} ({loss / losses['plain']:.2f}x)" for v, loss in losses.items()
            )
            print(f"{name} seed {seed}: {ratios}", flush=True)
    for variant in args.variants:
        torch.manual_seed(0)
        model = build(variant, gen.make_target(), args.zero_var, gen)
        unused = (
            []
            if variant == "shared"
            else [model.base.embedding_module]
            if variant.startswith("aligned")
            else [model.base.embedding_module, model.base.weight_generator]
        )
        count = sum(p.numel() for p in model.parameters()) - sum(
            p.numel() for m in unused for p in m.parameters()
        )
        print(f"{variant}: {count:,} parameters (incl. the target's non-generated ones)")


if __name__ == "__main__":
    main()
