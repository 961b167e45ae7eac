"""Torch hypernetworks train with the target's own optimizer and learning rate (issue 16).

The plain target and its hypernetworks (generated file and runtime twin, static and dynamic) are
trained the same way: same data, same batches, same optimizer at the learning rate that suits
the plain target. With the default gradient scaling every run must stay finite and end within
1.5x of the plain target's final loss: SGD, SGD with momentum and Adam on a 512-point regression
(an 8-64-64-4 tanh MLP), and Adam on a tiny character-level language model
(generated_examples/transformer_torch_static.py; SGD there is a known gap, marked xfail).
Without gradient scaling, SGD diverges. Flax (Linen and NNX, generated files and runtime, static
and dynamic): the same regression on the same MLP with optax's SGD, SGD + momentum and Adam.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
import pytest
import torch
from flax import nnx
from gen_support import REPO, hypernetwork_class, import_file
from torch import nn

from hypernn_gen.cli import main
from hypernn_gen.errors import HyperNetworkError
from hypernn_gen.runtime.flax import FlaxHyperNetwork, NNXHyperNetwork
from hypernn_gen.runtime.torch import TorchHyperNetwork

RATIO = 1.5  #: a hypernetwork's final loss may be at most this many times the plain target's
STEPS = 300
BATCH = 32

MLP_TARGET = """
import torch
from torch import nn


def make_target() -> nn.Module:
    return nn.Sequential(
        nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4, bias=False)
    )


example_input = torch.zeros(1, 8)
"""

OPTIMIZERS: dict[str, Callable] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=3e-3),
}


def regression() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = torch.sin(x @ torch.randn(8, 4, generator=g)) + 0.1 * torch.randn(512, 4, generator=g)
    return x, y


def output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out[0] if isinstance(out, tuple) else out


def train(
    model: nn.Module, optimizer: str | Callable, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable
) -> float:
    """Train on random batches (the same for every model); the final loss on all the data."""
    opt = (OPTIMIZERS.get(optimizer) or optimizer)(model.parameters())
    g = torch.Generator().manual_seed(2)
    for _ in range(STEPS):
        idx = torch.randint(0, x.shape[0], (BATCH,), generator=g)
        loss = loss_fn(output(model, x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(loss_fn(output(model, x), y))


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y).square().mean()


@pytest.fixture(scope="module")
def mlp_files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("training")
    (root / "mlp.py").write_text(MLP_TARGET)
    files = {}
    for mode in ("static", "dynamic"):
        out = root / f"mlp_{mode}.py"
        assert main([str(root / "mlp.py"), "--mode", mode, "-o", str(out)]) == 0
        files[mode] = import_file(out)
    return files


def build(files: dict, mode: str, kind: str) -> nn.Module:
    """The hypernetwork of the seeded target: the generated file's or the runtime's."""
    target = files[mode].make_target()
    if kind == "runtime":
        return TorchHyperNetwork(target, mode=mode, condition_dim=8 if mode == "dynamic" else None)
    return hypernetwork_class(files[mode])(target)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_regression_trains_like_the_target(mlp_files: dict, mode: str, optimizer: str) -> None:
    x, y = regression()
    torch.manual_seed(1)
    plain = train(mlp_files[mode].make_target(), optimizer, x, y, mse)
    # the dynamic runtime runs every sample alone (vmap): slow on CPU, and its outputs and
    # gradients equal the generated file's (test_equivalence_torch.py)
    for kind in ("generated", "runtime") if mode == "static" else ("generated",):
        torch.manual_seed(1)
        final = train(build(mlp_files, mode, kind), optimizer, x, y, mse)
        print(f"{mode} {optimizer} {kind}: {final:.4f} vs plain {plain:.4f}")
        assert math.isfinite(final), f"{kind} {mode} {optimizer} diverged"
        assert final <= RATIO * plain, f"{kind} {mode} {optimizer}: {final:.4f} vs {plain:.4f}"


def test_without_gradient_scaling_sgd_diverges(mlp_files: dict) -> None:
    """The issue itself: the raw gradients of the decode and the generator blow SGD up."""
    x, y = regression()
    torch.manual_seed(1)
    plain = train(mlp_files["static"].make_target(), "sgd", x, y, mse)
    torch.manual_seed(1)
    raw = TorchHyperNetwork(mlp_files["static"].make_target(), gradient_scaling="off")
    final = train(raw, "sgd", x, y, mse)
    assert not math.isfinite(final) or final > 10 * plain, (final, plain)


TEXT = (
    "the quick brown fox jumps over the lazy dog while the cat sleeps by the fire and the "
    "bird sings in the tree; a hypernetwork makes the weights of another network, and it "
    "should learn as fast as the network it makes when both are trained the same way. "
) * 4


def char_lm_data() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([ord(c) % 64 for c in TEXT])
    starts = torch.arange(0, len(ids) - 17, 3)
    windows = torch.stack([ids[s : s + 17] for s in starts])
    return windows[:, :-1], windows[:, 1:]


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


SGD_LM_GAP = (
    "issue 16, not met yet: plain SGD 0.5 leaves the static hypernetwork of the tiny GPT at "
    "3.1x the target's loss (0.951 vs 0.307). Measured cause: one shared generator moves tensor "
    "t at s_t^2 / s2 times the target's step (s2: the size-weighted mean init variance, here "
    "dominated by the N(0, 1) token embedding): tok_emb 16.5x, the Linear weights 0.03-0.17x, "
    "pos_emb 0.015x, zero-init biases below 0.03x (docs/concepts.md, 'Known gaps')"
)
ADAM_LM_GAP = (
    "issue 16, not met yet: Adam 3e-3 leaves the static hypernetwork of the tiny GPT at 1.57x "
    "the target's loss (1.002 vs 0.637), the bar is 1.5x; with embedding_dim=128 (31,900 own "
    "parameters instead of 8,060) it is 1.34x: capacity, not the multipliers"
)


@pytest.mark.parametrize(
    "optimizer",
    [
        pytest.param(
            lambda p: torch.optim.SGD(p, lr=0.5),
            marks=pytest.mark.xfail(strict=True, reason=SGD_LM_GAP),
            id="sgd-0.5",
        ),
        pytest.param(
            lambda p: torch.optim.Adam(p, lr=3e-3),
            marks=pytest.mark.xfail(strict=True, reason=ADAM_LM_GAP),
            id="adam-3e-3",
        ),
    ],
)
def test_char_language_model_trains_like_the_target(optimizer: Callable) -> None:
    """The generated static hypernetwork of a tiny GPT (tied embedding, attention, LayerNorm)."""
    module = import_file(REPO / "generated_examples" / "transformer_torch_static.py")
    x, y = char_lm_data()
    torch.manual_seed(1)
    plain = train(module.make_target(), optimizer, x, y, cross_entropy)
    torch.manual_seed(1)
    hyper = hypernetwork_class(module)(module.make_target())
    final = train(hyper, optimizer, x, y, cross_entropy)
    print(f"char LM: {final:.4f} vs plain {plain:.4f}")
    assert math.isfinite(final) and final <= RATIO * plain, (final, plain)


# -- Flax: Linen and NNX -------------------------------------------------------------------------
#
# The same regression (the same data, the same batches) on the same MLP written for Flax
# (generated_examples/targets/{linen,nnx}_mlp.py), with the optax optimizers at the same
# learning rates; each run is one compiled scan over the steps.

FLAX_OPTIMIZERS: dict[str, Callable] = {
    "sgd": lambda: optax.sgd(0.1),
    "momentum": lambda: optax.sgd(0.01, momentum=0.9),
    "adam": lambda: optax.adam(3e-3),
}


def flax_data() -> tuple[jax.Array, jax.Array, jax.Array]:
    """The regression as arrays, and the batches' indices ``(STEPS, BATCH)`` of :func:`train`."""
    x, y = regression()
    g = torch.Generator().manual_seed(2)
    idx = torch.stack([torch.randint(0, x.shape[0], (BATCH,), generator=g) for _ in range(STEPS)])
    return jnp.asarray(x.numpy()), jnp.asarray(y.numpy()), jnp.asarray(idx.numpy())


def flax_train(loss_fn: Callable, params: Any, optimizer: str) -> float:
    """``STEPS`` steps of ``optimizer`` on ``loss_fn(params, x, y)``; the final loss on all data."""
    x, y, idx = flax_data()
    tx = FLAX_OPTIMIZERS[optimizer]()

    @jax.jit
    def run(params: Any) -> jax.Array:
        def step(carry: tuple, batch: jax.Array) -> tuple:
            p, state = carry
            grads = jax.grad(loss_fn)(p, x[batch], y[batch])
            updates, state = tx.update(grads, state, p)
            return (optax.apply_updates(p, updates), state), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), idx)
        return loss_fn(params, x, y)

    return float(run(params))


def flax_mse(out: Any, y: jax.Array) -> jax.Array:
    out = out[0] if isinstance(out, tuple) else out
    return jnp.mean((out - y) ** 2)


def flax_file(framework: str, mode: str) -> Any:
    module = import_file(REPO / "generated_examples" / f"{framework}_mlp_{framework}_{mode}.py")
    (cls,) = [v for k, v in vars(module).items() if k.endswith("HyperNetwork")]
    return module, cls


def linen_loss(kind: str, mode: str, scaling: str = "on") -> tuple[Callable, Any]:
    """``(loss_fn, params)`` of the plain Linen target (``"plain"``) or a hypernetwork."""
    module, cls = flax_file("linen", mode)
    x0 = jnp.zeros((BATCH, 8))
    if kind == "plain":
        model = module.MLP()
    elif kind == "generated":
        model = cls()
    else:
        model = FlaxHyperNetwork(module.MLP(), mode=mode, gradient_scaling=scaling)
    params = model.init(jax.random.key(1), x0)["params"]
    return lambda p, x, y: flax_mse(model.apply({"params": p}, x), y), params


def nnx_loss(kind: str, mode: str, scaling: str = "on") -> tuple[Callable, Any]:
    """``(loss_fn, params)`` of the plain NNX target (``"plain"``) or a hypernetwork."""
    module, cls = flax_file("nnx", mode)
    target = module.MLP(rngs=nnx.Rngs(1))
    if kind == "plain":
        model = target
    elif kind == "generated":
        model = cls(target, rngs=nnx.Rngs(1))
    else:
        dim = 8 if mode == "dynamic" else None
        model = NNXHyperNetwork(
            target, mode=mode, condition_dim=dim, gradient_scaling=scaling, rngs=nnx.Rngs(1)
        )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return lambda p, x, y: flax_mse(nnx.merge(graphdef, p, rest)(x), y), params


@pytest.mark.parametrize("optimizer", sorted(FLAX_OPTIMIZERS))
@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_flax_regression_trains_like_the_target(framework: str, mode: str, optimizer: str) -> None:
    loss = linen_loss if framework == "linen" else nnx_loss
    plain = flax_train(*loss("plain", mode), optimizer)
    for kind in ("generated", "runtime"):
        final = flax_train(*loss(kind, mode), optimizer)
        print(f"{framework} {mode} {optimizer} {kind}: {final:.4f} vs plain {plain:.4f}")
        assert math.isfinite(final), f"{framework} {kind} {mode} {optimizer} diverged"
        assert final <= RATIO * plain, f"{framework} {kind} {mode} {optimizer}: {final} vs {plain}"


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_flax_without_gradient_scaling_sgd_diverges(framework: str) -> None:
    loss = linen_loss if framework == "linen" else nnx_loss
    plain = flax_train(*loss("plain", "static"), "sgd")
    raw = flax_train(*loss("runtime", "static", "off"), "sgd")
    assert not math.isfinite(raw) or raw > 10 * plain, (raw, plain)


def test_flax_gradient_scaling_must_be_on_or_off() -> None:
    module, _ = flax_file("nnx", "static")
    with pytest.raises(
        HyperNetworkError, match="gradient_scaling must be 'on' or 'off', got 'yes'"
    ):
        NNXHyperNetwork(module.MLP(rngs=nnx.Rngs(0)), gradient_scaling="yes", rngs=nnx.Rngs(0))
    linen, _ = flax_file("linen", "static")
    hn = FlaxHyperNetwork(linen.MLP(), gradient_scaling="yes")
    with pytest.raises(HyperNetworkError, match="gradient_scaling must be 'on' or 'off'"):
        hn.init(jax.random.key(0), jnp.zeros((2, 8)))


# -- the grouped generator's design (hypernn_gen.design) -----------------------------------------


def test_std_groups_by_log2_std_and_zero_apart() -> None:
    from hypernn_gen.design import std_groups

    # 0.02 and 0.025: 2^-5.6 and 2^-5.3 round to -6 and -5; 1.0 and 1.2 to 0; the zeros together
    assert std_groups([1.0, 0.02, 0.0, 1.2, 0.025, 0.0, 0.021]) == (0, 1, 2, 0, 3, 2, 1)


def test_group_rows_cover_each_chunk_once_by_its_owner() -> None:
    """Every chunk of a tensor-aligned layout lands in the group of the tensor whose values it
    holds (checked against the offsets directly), and each group's multipliers are those of its
    own tensors and rows over the three generator blocks."""
    from hypernn_gen.design import (
        ZERO_VARIANCE,
        design_layout,
        gradient_multipliers,
        group_gradient_multipliers,
        group_rows,
        std_groups,
    )
    from hypernn_gen.trace_torch import trace_module

    module = import_file(REPO / "generated_examples" / "transformer_torch_static.py")
    layout, chunking = design_layout(trace_module(module.make_target()), chunking="tensor")
    generated = layout.generated
    groups = std_groups([t.init_std for t in generated])
    rows = group_rows(layout, chunking)
    assert len(rows) == max(groups) + 1 >= 3
    assert sorted(k for r in rows for k in r) == list(range(chunking.num_embeddings))
    c = chunking.chunk_dim
    for g, r in enumerate(rows):
        for k in r:
            holders = [i for i, t in enumerate(generated) if t_overlaps(t, k, c)]
            assert {groups[i] for i in holders} <= {g}, (k, holders)
    mult = group_gradient_multipliers(layout, chunking, 32)
    for g, r in enumerate(rows):
        members = [t for t, h in zip(generated, groups, strict=True) if h == g]
        stds = [t.init_std or math.sqrt(ZERO_VARIANCE) for t in members]
        expected = gradient_multipliers([t.size for t in members], stds, len(r), c, 32)
        assert mult[g] == pytest.approx(tuple(m / 3 for m in expected), rel=1e-5)


def t_overlaps(t: Any, k: int, c: int) -> bool:
    return t.offset < (k + 1) * c and k * c < t.offset + t.size
