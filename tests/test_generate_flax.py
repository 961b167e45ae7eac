"""Generated Flax hypernetworks (Linen and NNX) vs their runtime twins vs the plain target.

Each Flax target of generated_examples/targets is generated in static and dynamic mode through
the real CLI (``hypernn_gen.cli.main``) into a temporary directory and imported. The generated
module and its runtime twin (``FlaxHyperNetwork``/``NNXHyperNetwork``) must have the same
variable tree, so the runtime's variables load into the generated module unchanged; then both
must compute the same outputs, state updates and gradients, in training and eval mode, and
evolve identically over three SGD steps. The other references are independent: the plain
target run with its own weights (layout round trip) and a per-sample loop over the plain target
(dynamic mode). The committed examples run as scripts without hypernn_gen.

XLA compiles dominate the run time on CPU, so each comparison of the two hypernetworks is one
jitted function that computes both sides, and XLA's optimisation passes are skipped.
"""

from __future__ import annotations

import ast
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import flax.linen as nn
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from gen_support import MODES, REPO, TARGETS_DIR, import_file
from tolerances import DYNAMIC, GRAD, STATIC, assert_close, for_mode

from hypernn_gen.cli import main
from hypernn_gen.generate import plan_fusion
from hypernn_gen.layout import Chunking
from hypernn_gen.load import load_target
from hypernn_gen.runtime.flax import (
    FlaxHyperNetwork,
    NNXHyperNetwork,
    flatten_params,
    unflatten_params,
)
from hypernn_gen.trace import trace_selected
from hypernn_gen.trace_flax import trace_linen

BATCH = 3


def _normal(shape: tuple[int, ...]) -> jax.Array:
    return jnp.asarray(np.random.default_rng(0).standard_normal(shape, dtype=np.float32))


def _tokens(shape: tuple[int, ...]) -> jax.Array:
    return jnp.asarray(np.random.default_rng(0).integers(0, 64, shape, dtype=np.int32))


#: target file stem -> (the target's name in it, a batch of inputs); the slowest first
FLAX_TARGETS: dict[str, tuple[str, Callable[[int], jax.Array]]] = {
    "linen_transformer": ("make_target", lambda b: _tokens((b, 16))),
    "nnx_transformer": ("make_target", lambda b: _tokens((b, 16))),
    "linen_cnn": ("SmallCNN", lambda b: _normal((b, 8, 8, 1))),
    "nnx_cnn": ("make_target", lambda b: _normal((b, 8, 8, 1))),
    "linen_mlp": ("MLP", lambda b: _normal((b, 8))),
    "nnx_mlp": ("make_target", lambda b: _normal((b, 8))),
}
#: targets with BatchNorm statistics and Dropout: also checked in training mode
STATEFUL = {"linen_cnn", "nnx_cnn"}
SLOW = {"linen_transformer", "nnx_transformer"}
#: both modes of a target are neighbours, so pytest-xdist tends to run them in one process
CASES = [
    pytest.param(t, m, id=f"{t}-{m}", marks=[pytest.mark.slow] if t in SLOW else [])
    for t in FLAX_TARGETS
    for m in MODES
]
EXAMPLES = sorted(
    p
    for p in (REPO / "generated_examples").glob("*.py")
    if re.search(r"_(linen|nnx)_(static|dynamic)\.py$", p.name)
)
EXPECTED_OUTPUT = {"mlp": (1, 4), "cnn": (2, 10), "transformer": (2, 16, 64)}


# -- the committed examples -----------------------------------------------------------------------


def test_examples_run_as_scripts_without_hypernn_gen() -> None:
    """Every committed Flax example runs as ``__main__`` (exit 0) with hypernn_gen unimportable
    and imports nothing of it."""
    assert len(EXAMPLES) == 2 * len(FLAX_TARGETS), EXAMPLES
    for path in EXAMPLES:
        assert not re.search(r"^\s*(import|from)\s+hypernn_gen", path.read_text(), re.M), path
    script = (
        "import runpy, sys\n"
        "sys.modules['hypernn_gen'] = None  # any import of hypernn_gen now fails\n"
        "for path in sys.argv[1:]:\n"
        "    print('==', path, flush=True)\n"
        "    runpy.run_path(path, run_name='__main__')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, *map(str, EXAMPLES)],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    blocks = proc.stdout.split("== ")[1:]
    for path, block in zip(EXAMPLES, blocks, strict=True):
        kind = path.stem.split("_")[1]
        assert f"output: {EXPECTED_OUTPUT[kind]}" in block, block
        flat = int(re.search(r"^FLAT_SIZE = ([\d_]+)$", path.read_text(), re.M).group(1))
        batch = EXPECTED_OUTPUT[kind][0]
        shape = (flat,) if path.stem.endswith("static") else (batch, flat)
        assert f"generated_params: {shape}" in block, block


def top_level_names(source: str) -> set[str]:
    """Names a module binds at top level with ``def``, ``class`` or an assignment."""
    bound: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            bound |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return bound


def example(name: str) -> ModuleType:
    return import_file(REPO / "generated_examples" / f"{name}.py")


def test_examples_refuse_other_targets_and_bad_inputs() -> None:
    linen = example("linen_mlp_linen_static")

    class Narrower(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            x = nn.Dense(32)(x)
            return nn.Dense(4)(x)

    with pytest.raises(ValueError, match=r"Dense_0.bias: \(64,\) expected, found \(32,\)"):
        jax.eval_shape(
            hypernetwork_class(linen)(Narrower()).init, jax.random.key(0), _normal((1, 8))
        )
    with pytest.raises(ValueError, match=r"generated_params has shape \(3,\), expected \(4992,\)"):
        linen.check_flat(jnp.zeros(3), linen.FLAT_SIZE, dynamic=False)

    dynamic = example("nnx_mlp_nnx_dynamic")
    with pytest.raises(ValueError, match=r"hidden1.bias: \(64,\) expected, found nothing"):
        hypernetwork_class(dynamic)(nnx.Linear(8, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0))
    hn = hypernetwork_class(dynamic)(rngs=nnx.Rngs(0))
    with pytest.raises(
        ValueError, match=r"made 2 weight sets \(condition batch 2\) but input 1 has batch size 3"
    ):
        hn(jnp.zeros((2, 8)), jnp.zeros((3, 8)))
    with pytest.raises(ValueError, match=r"the condition has 4 values per sample"):
        hn(jnp.zeros((2, 8)), condition=jnp.zeros((2, 4)))


# -- helpers --------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _quick_compiles() -> Iterator[None]:
    """Skip most XLA optimisation passes: compiling, not running, is what takes time here, and
    both sides of every comparison are compiled the same way."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], ModuleType]:
    """``generated(target, mode, *flags)``: the module generated by the CLI (once per case)."""
    directory = tmp_path_factory.mktemp("generated")
    cache: dict[tuple[str, ...], ModuleType] = {}

    def get(target: str, mode: str, *flags: str) -> ModuleType:
        key = (target, mode, *flags)
        if key not in cache:
            out = directory / f"{target}_{mode}_{len(cache)}.py"
            args = [str(TARGETS_DIR / f"{target}.py"), "--backend", "flax", "--mode", mode]
            assert main([*args, *flags, "-o", str(out)]) == 0
            cache[key] = import_file(out)
        return cache[key]

    return get


def hypernetwork_class(module: ModuleType) -> type:
    found = [
        v
        for k, v in vars(module).items()
        if k.endswith("HyperNetwork")
        and isinstance(v, type)
        and issubclass(v, nn.Module | nnx.Module)
    ]
    assert len(found) == 1, found
    return found[0]


def plain_target(name: str) -> Any:
    """A fresh target built from the original file in generated_examples/targets."""
    attr, _ = FLAX_TARGETS[name]
    module = sys.modules.get(f"_plain_flax_{name}") or import_file(
        TARGETS_DIR / f"{name}.py", f"_plain_flax_{name}"
    )
    return getattr(module, attr)()


def close(actual: Any, expected: Any, tol: dict[str, float], what: str) -> None:
    """Every float leaf of two trees with the same structure agrees within ``tol``."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected), what
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected), strict=True
    ):
        a, b = np.asarray(a), np.asarray(b)
        where = f"{what} {jax.tree_util.keystr(path)}"
        assert a.shape == b.shape and a.dtype == b.dtype, where
        if np.issubdtype(b.dtype, np.floating):
            assert_close(torch.from_numpy(a.copy()), torch.from_numpy(b.copy()), tol, where)
        else:
            np.testing.assert_array_equal(a, b, err_msg=where)


def shapes(tree: Any) -> Any:
    return jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), tree)


def random_like(tree: Any, seed: int) -> Any:
    """Random values shaped like ``tree`` (positive where a leaf is a variance)."""
    rng = np.random.default_rng(seed)

    def fill(path: tuple, leaf: Any) -> jax.Array:
        x = rng.standard_normal(leaf.shape).astype(np.float32) * 0.3
        return jnp.asarray(np.abs(x) + 0.5 if "var" in jax.tree_util.keystr(path) else x)

    return jax.tree_util.tree_map_with_path(fill, tree)


# -- Linen ----------------------------------------------------------------------------------------


def linen_both(runtime: nn.Module, gen: nn.Module, stateful: bool) -> Callable:
    """One compiled function: for each hypernetwork, eval (and, for a stateful target, train)
    outputs, generated params, state updates and gradients of the params."""

    def results(hn: nn.Module, variables: dict, x: jax.Array, key: jax.Array) -> dict:
        def loss(params: dict, train: bool) -> tuple:
            v = {**variables, "params": params}
            kwargs = {"train": True, "rngs": {"dropout": key}} if train else {}
            mutable = {"mutable": ["batch_stats"]} if train else {}
            (out, flat), updates = (
                hn.apply(v, x, **kwargs, **mutable) if train else (hn.apply(v, x), {})
            )
            if flat is None:  # the fused path; the weight sets come from the materialising one
                flat = hn.apply(v, x, return_params=True, **kwargs, **mutable)
                flat = (flat[0] if train else flat)[1]
            return jnp.mean(out**2), (out, flat, updates)

        grad = jax.value_and_grad(loss, has_aux=True)
        return {
            phase: dict(zip(("aux", "grads"), (r[0][1], r[1]), strict=True))
            for phase, train in (("eval", False), ("train", True))
            if stateful or not train
            for r in [grad(variables["params"], train)]
        }

    return jax.jit(lambda v, x, key: [results(hn, v, x, key) for hn in (runtime, gen)])


def linen_training(runtime: nn.Module, gen: nn.Module, variables: dict, x: jax.Array) -> None:
    """Three SGD steps in training mode: params and batch_stats evolve identically."""
    y = jnp.linspace(-1.0, 1.0, x.shape[0] * 10).reshape(x.shape[0], 10)
    tx = optax.sgd(0.01)

    def step(hn: nn.Module, variables: dict, opt: Any, key: jax.Array) -> tuple:
        def loss(params: dict) -> tuple:
            kwargs = {"train": True, "rngs": {"dropout": key}, "mutable": ["batch_stats"]}
            (out, _), updates = hn.apply({**variables, "params": params}, x, **kwargs)
            return jnp.mean((out - y) ** 2), updates

        (_, updates), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        changes, opt = tx.update(grads, opt)
        return {"params": optax.apply_updates(variables["params"], changes), **updates}, opt

    both = jax.jit(
        lambda s, k: [step(hn, *si, k) for hn, si in zip((runtime, gen), s, strict=True)]
    )
    states = [(variables, tx.init(variables["params"]))] * 2
    for i in range(3):
        states = both(states, jax.random.key(10 + i))
        close(states[1][0], states[0][0], GRAD, f"training step {i}")
    means = [
        v[0]["batch_stats"]["target"]["BatchNorm_0"]["mean"] for v in (states[1], (variables,))
    ]
    assert not jnp.allclose(*means)


def check_linen(module: ModuleType, name: str, mode: str, **options: Any) -> None:
    gen = hypernetwork_class(module)()
    target = plain_target(name)
    runtime = FlaxHyperNetwork(target, mode=mode, **options)
    x, key = FLAX_TARGETS[name][1](BATCH), jax.random.key(3)
    tol, stateful = for_mode(mode), name in STATEFUL

    # The same variable tree: the runtime's variables are the generated module's.
    variables = jax.jit(runtime.init)(jax.random.key(0), x)
    assert shapes(jax.eval_shape(gen.init, jax.random.key(0), x)) == shapes(variables)

    rt, ours = linen_both(runtime, gen, stateful)(variables, x, key)
    for phase in rt:
        close(ours[phase]["aux"], rt[phase]["aux"], tol, f"{phase}: output, params, updates")
        close(ours[phase]["grads"], rt[phase]["grads"], GRAD, f"{phase}: grads")
    out, flat, _ = ours["eval"]["aux"]
    if stateful:
        linen_training(runtime, gen, variables, x)

    # Eager and jitted apply agree; dynamic: the fused path returns no weights, and the
    # materialising path (return_params=True) computes the same output.
    if mode == "dynamic":
        fused_flat = None if getattr(module, "FUSED", ()) else flat  # nothing fused: weights
        close(gen.apply(variables, x), (out, fused_flat), tol, "eager vs jit")
        close(gen.apply(variables, x, return_params=True), (out, flat), tol, "materialised")
    else:  # static: LOW_RANK layers at rank D and no flat vector unless asked for
        fast = bool(getattr(module, "LOW_RANK", ()))
        close(gen.apply(variables, x), (out, None if fast else flat), tol, "eager vs jit")
        if fast:
            close(gen.apply(variables, x, return_params=True), (out, flat), tol, "materialised")

    # Layout round trip: the target's own params as generated_params reproduce the plain target.
    layout, _ = runtime.design(trace_linen(target, (x,), measure=False))
    own = random_like(jax.eval_shape(target.init, jax.random.key(0), x), seed=7)
    own_flat = module.flatten_params(own["params"])
    np.testing.assert_array_equal(own_flat, flatten_params(layout, own["params"]))
    close(module.unflatten_params(own_flat), own["params"], STATIC, "unflatten")
    hn_vars = {**variables, **{col: {"target": v} for col, v in own.items() if col != "params"}}
    if mode == "dynamic":
        own_flat = jnp.broadcast_to(own_flat, (BATCH, *own_flat.shape))
    (round_trip, returned), plain = jax.jit(
        lambda v, own, flat: (gen.apply(v, x, generated_params=flat), target.apply(own, x))
    )(hn_vars, own, own_flat)
    np.testing.assert_array_equal(returned, own_flat)
    close(round_trip, plain, tol, "round trip")

    if mode == "dynamic":  # sample b alone through the plain target with weight set b
        assert flat.shape == (BATCH, module.FLAT_SIZE) and not jnp.allclose(flat[0], flat[1])
        apply = jax.jit(target.apply)
        stats = {c: v["target"] for c, v in variables.items() if c not in ("params", "layout")}
        for b in range(BATCH):
            ref = apply({"params": unflatten_params(layout, flat[b]), **stats}, x[b : b + 1])
            close(out[b], ref[0], DYNAMIC, f"sample {b}")
    else:
        assert flat.shape == (module.FLAT_SIZE,)


# -- NNX ------------------------------------------------------------------------------------------


def split_states(*modules: nnx.Module) -> list:
    """``(params, rest)`` of each module."""
    return [nnx.split(m, nnx.Param, ...)[1:] for m in modules]


def nnx_both(runtime: nnx.Module, gen: nnx.Module) -> Callable:
    """One compiled function: outputs, generated params, new state and param gradients of both
    hypernetworks, from ``split_states(runtime, gen)``."""
    graphdefs = [nnx.graphdef(hn) for hn in (runtime, gen)]

    def results(graphdef: Any, params: nnx.State, rest: nnx.State, x: jax.Array) -> tuple:
        def loss(params: nnx.State) -> tuple:
            model = nnx.merge(graphdef, params, rest, copy=True)
            out, flat = model(x)
            if flat is None:  # the fused path; the weight sets come from the materialising one
                flat = nnx.merge(graphdef, params, rest, copy=True)(x, return_params=True)[1]
            return jnp.mean(out**2), (out, flat, nnx.state(model, nnx.Not(nnx.Param)))

        (_, aux), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return aux, grads

    return jax.jit(
        lambda states, x: [results(g, *s, x) for g, s in zip(graphdefs, states, strict=True)]
    )


def pure(tree: Any) -> Any:
    """States as pure dicts, rng keys as their raw data: a tree of comparable arrays."""
    tree = jax.tree.map(
        lambda s: nnx.to_pure_dict(s) if isinstance(s, nnx.State) else s,
        tree,
        is_leaf=lambda s: isinstance(s, nnx.State),
    )
    return jax.tree.map(
        lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x,
        tree,
    )


def flat_listing(module: nnx.Module) -> list:
    """``(path, variable type, shape, dtype)`` of every variable."""
    return [
        (tuple(p), type(v).__name__, v.get_value().shape, str(v.get_value().dtype))
        for p, v in nnx.to_flat_state(nnx.state(module))
    ]


def transfer(source: nnx.Module, dest: nnx.Module) -> None:
    """Load every variable of ``source`` into ``dest`` (same paths)."""
    state = nnx.state(dest)
    nnx.replace_by_pure_dict(state, nnx.to_pure_dict(nnx.state(source)))
    nnx.update(dest, state)


def with_params(target: nnx.Module, tree: dict) -> nnx.Module:
    """A copy of an NNX target with its Params replaced by ``tree``."""
    graphdef, params, rest = nnx.split(nnx.clone(target), nnx.Param, ...)
    flat = []
    for path, var in nnx.to_flat_state(params):
        value = tree
        for k in path:
            value = value[k]
        flat.append((path, var.copy(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


def nnx_training(runtime: nnx.Module, gen: nnx.Module, x: jax.Array) -> None:
    """Three SGD steps in training mode: params, batch stats and rng counts evolve identically."""
    y = jnp.linspace(-1.0, 1.0, x.shape[0] * 10).reshape(x.shape[0], 10)
    tx = optax.sgd(0.01)
    graphdefs = [nnx.graphdef(hn) for hn in (runtime, gen)]

    def step(graphdef: Any, params: nnx.State, rest: nnx.State, opt: Any) -> tuple:
        def loss(params: nnx.State) -> tuple:
            model = nnx.merge(graphdef, params, rest, copy=True)
            out, _ = model(x)
            return jnp.mean((out - y) ** 2), nnx.state(model, nnx.Not(nnx.Param))

        (_, rest), grads = jax.value_and_grad(loss, has_aux=True)(params)
        changes, opt = tx.update(grads, opt)
        return optax.apply_updates(params, changes), rest, opt

    both = jax.jit(lambda s: [step(g, *si) for g, si in zip(graphdefs, s, strict=True)])
    states = [(*split, tx.init(split[0])) for split in split_states(runtime, gen)]
    before = pure(states[0][1])
    for i in range(3):
        states = both(states)
        close(pure(states[1][:2]), pure(states[0][:2]), GRAD, f"training step {i}")
    after = pure(states[1][1])
    assert not np.allclose(after["target"]["bn"]["mean"], before["target"]["bn"]["mean"])
    assert int(after["target"]["dropout"]["rngs"]["count"]) == 3


def check_nnx(module: ModuleType, name: str, mode: str, **options: Any) -> None:
    target = plain_target(name)
    x = FLAX_TARGETS[name][1](BATCH)
    tol = for_mode(mode)
    condition_dim = math.prod(x.shape[1:]) if mode == "dynamic" else None
    runtime = NNXHyperNetwork(
        target, mode=mode, condition_dim=condition_dim, rngs=nnx.Rngs(0), **options
    )
    gen = hypernetwork_class(module)(rngs=nnx.Rngs(0))

    # The same variables (paths, types, shapes), and the same initial values from the same rngs.
    assert flat_listing(gen) == flat_listing(runtime)
    close(pure(nnx.state(gen)), pure(nnx.state(runtime)), STATIC, "init")
    transfer(runtime, gen)

    if name in STATEFUL:  # training mode first: BatchNorm statistics and Dropout
        (rt, rt_grads), (ours, our_grads) = nnx_both(runtime, gen)(split_states(runtime, gen), x)
        close(pure(ours), pure(rt), tol, "train: output, generated_params, state")
        close(pure(our_grads), pure(rt_grads), GRAD, "train: grads")
        nnx_training(runtime, gen, x)
    for hn in (runtime, gen):
        hn.eval()
    (rt, rt_grads), (ours, our_grads) = nnx_both(runtime, gen)(split_states(runtime, gen), x)
    close(pure(ours), pure(rt), tol, "eval: output, generated_params, state")
    close(pure(our_grads), pure(rt_grads), GRAD, "eval: grads")
    out, flat, _ = ours

    # Eager and nnx.jit calls agree with the compiled pure function (eval: no state changes);
    # dynamic: the fused path returns no weights, the materialising one the same output.
    # static: the LOW_RANK layers at rank D and no flat vector, unless asked for.
    fast = getattr(module, "FUSED" if mode == "dynamic" else "LOW_RANK", ())
    fused_flat = None if fast else flat
    close(gen(x), (out, fused_flat), tol, "eager vs jit")
    close(nnx.jit(lambda hn, x: hn(x))(gen, x), (out, fused_flat), tol, "nnx.jit")
    if mode == "dynamic" or fast:
        close(gen(x, return_params=True), (out, flat), tol, "materialised")

    # Layout round trip: the target's own params as generated_params reproduce the plain target.
    target.eval()
    own_flat = gen.flatten_params(target)
    np.testing.assert_array_equal(own_flat, runtime.flatten_params(target))
    own = nnx.to_pure_dict(nnx.state(target, nnx.Param))
    close(gen.unflatten_params(own_flat), own, STATIC, "unflatten")
    fresh = hypernetwork_class(module)(target, rngs=nnx.Rngs(1))
    fresh.eval()
    if mode == "dynamic":
        own_flat = jnp.broadcast_to(own_flat, (BATCH, *own_flat.shape))
    round_trip, returned = fresh(x, generated_params=own_flat)
    assert returned is own_flat
    close(round_trip, target(x), tol, "round trip")

    if mode == "dynamic":  # sample b alone through the plain target with weight set b
        assert flat.shape == (BATCH, module.FLAT_SIZE) and not jnp.allclose(flat[0], flat[1])
        apply = nnx.jit(lambda m, x: m(x))
        for b in range(BATCH):
            ref = apply(with_params(target, runtime.unflatten_params(flat[b])), x[b : b + 1])
            close(out[b], ref[0], DYNAMIC, f"sample {b}")
    else:
        assert flat.shape == (module.FLAT_SIZE,)


@pytest.mark.parametrize(("name", "mode"), CASES)
def test_generated_matches_runtime_and_target(
    generated: Callable[[str, str], ModuleType], name: str, mode: str
) -> None:
    """Same variables, outputs, state updates, gradients (train and eval), jit and eager, as the
    runtime twin; the layout round trip; per-sample loops (dynamic); training steps (stateful)."""
    check = check_linen if name.startswith("linen") else check_nnx
    check(generated(name, mode), name, mode)


OPTION_FLAGS = ("--chunking", "tensor", "--init-scheme", "hyperfan-in")
OPTIONS = {"chunking": "tensor", "init_scheme": "hyperfan-in"}


@pytest.mark.parametrize(
    ("name", "mode", "hidden"),
    [("linen_cnn", "dynamic", False), ("nnx_cnn", "static", True), ("nnx_mlp", "dynamic", True)],
)
def test_options_match_runtime_with_the_same_options(
    generated: Callable[[str, str], ModuleType], name: str, mode: str, hidden: bool
) -> None:
    """--chunking tensor (padding between tensors), --init-scheme hyperfan-in (other scales) and
    --generator-hidden (an MLP generator; dynamic files then have nothing fused): the generated
    file is still the runtime twin built with the same keyword arguments, in every check of
    the zoo test; the embedding network's widths too (dynamic)."""
    flags, options = OPTION_FLAGS, dict(OPTIONS)
    if hidden:
        flags, options = (
            (*flags, "--generator-hidden", "16,8"),
            {**options, "generator_hidden": (16, 8)},
        )
    if mode == "dynamic":
        flags, options = (
            (*flags, "--embedding-hidden", "24,12"),
            {**options, "embedding_hidden": (24, 12)},
        )
    module = generated(name, mode, *flags)
    # every tensor from a chunk boundary (padding between tensors wherever a chunk is not full)
    chunks = sum(-(-p.size // module.CHUNK_DIM) for p in module.GENERATED)
    assert module.FLAT_SIZE == chunks * module.CHUNK_DIM
    if mode == "dynamic":  # fused unless the generator has hidden layers
        assert bool(getattr(module, "FUSED", ())) is not hidden
    assert all(p.offset % module.CHUNK_DIM == 0 for p in module.GENERATED)
    check = check_linen if name.startswith("linen") else check_nnx
    check(module, name, mode, **options)


@pytest.mark.parametrize("name", ["linen_mlp", "nnx_mlp"])
def test_excluded_params_stay_trainable_params_of_the_target(tmp_path: Path, name: str) -> None:
    """``--exclude``: those parameters are ordinary parameters (Linen: ``params["target"]``,
    NNX: Params of ``hn.target``), as in the runtime with the same ``include`` predicate."""
    pattern, prefix = ("Dense_2.*", "Dense_2") if name == "linen_mlp" else ("out.*", "out")
    out = tmp_path / f"{name}_excluded.py"
    args = [str(TARGETS_DIR / f"{name}.py"), "--backend", "flax", "--mode", "dynamic"]
    assert main([*args, "--exclude", pattern, "-o", str(out)]) == 0
    module = import_file(out)
    assert len(module.EXCLUDED) == 1 and all(
        p.path[: len(prefix)] != prefix for p in module.GENERATED
    )
    x = _normal((BATCH, 8))
    include = lambda path: not path.startswith(prefix)  # noqa: E731
    if name == "linen_mlp":
        gen = hypernetwork_class(module)()
        runtime = FlaxHyperNetwork(plain_target(name), mode="dynamic", include=include)
        variables = jax.jit(runtime.init)(jax.random.key(0), x)
        assert variables["params"]["target"][prefix]["kernel"].shape == (64, 4)
        assert shapes(jax.eval_shape(gen.init, jax.random.key(0), x)) == shapes(variables)
        grads = jax.jit(
            lambda v: [
                jax.grad(lambda p, hn=hn: hn.apply({"params": p}, x)[0].sum())(v["params"])
                for hn in (runtime, gen)
            ]
        )(variables)
        assert jnp.abs(grads[1]["target"][prefix]["kernel"]).sum() > 0
    else:
        gen = hypernetwork_class(module)(rngs=nnx.Rngs(0))
        runtime = NNXHyperNetwork(
            plain_target(name), mode="dynamic", condition_dim=8, include=include, rngs=nnx.Rngs(0)
        )
        assert flat_listing(gen) == flat_listing(runtime)
        assert isinstance(gen.target.out.kernel, nnx.Param)
        grads = nnx_both(runtime, gen)(split_states(runtime, gen), x)
        grads = [pure(g) for _, g in grads]
        assert np.abs(grads[1]["target"][prefix]["kernel"]).sum() > 0
    close(grads[1], grads[0], GRAD, "grads")


@pytest.mark.parametrize("api", ["nnx", "linen"])
def test_committed_digits_files_match_runtime(api: str) -> None:
    """examples/digits' committed Flax files (what train_flax.py trains) are their runtime twins
    with ``embedding_dim=16``: same variables, outputs and gradients; the target's own weights
    through ``generated_params`` give the plain target's output."""
    digits = REPO / "examples" / "digits"
    module = import_file(digits / f"digits_{api}_static.py")
    plain = import_file(digits / f"target_{api}.py")
    x, key = _normal((BATCH, 8, 8, 1)), jax.random.key(3)
    if api == "nnx":
        target = plain.target  # the instance the file was generated from (its init statistics)
        runtime = NNXHyperNetwork(target, embedding_dim=16, chunking="flat", rngs=nnx.Rngs(0))
        gen = module.DigitsCNNHyperNetwork(target, rngs=nnx.Rngs(0))
        assert flat_listing(gen) == flat_listing(runtime)
        close(pure(nnx.state(gen)), pure(nnx.state(runtime)), STATIC, "init")
        transfer(runtime, gen)
        (rt, rt_grads), (ours, our_grads) = nnx_both(runtime, gen)(split_states(runtime, gen), x)
        close(pure(ours), pure(rt), STATIC, "output, generated_params, state")
        close(pure(our_grads), pure(rt_grads), GRAD, "grads")
        round_trip, _ = gen(x, generated_params=gen.flatten_params(target))
        close(round_trip, target(x), STATIC, "round trip")
    else:
        target = plain.DigitsCNN()
        runtime = FlaxHyperNetwork(target, embedding_dim=16, chunking="flat")
        gen = module.DigitsCNNHyperNetwork()
        variables = jax.jit(runtime.init)(jax.random.key(0), x)
        assert shapes(jax.eval_shape(gen.init, jax.random.key(0), x)) == shapes(variables)
        rt, ours = linen_both(runtime, gen, False)(variables, x, key)
        close(ours["eval"]["aux"], rt["eval"]["aux"], STATIC, "output, generated_params")
        close(ours["eval"]["grads"], rt["eval"]["grads"], GRAD, "grads")
        own = target.init(jax.random.key(5), x)
        round_trip, _ = gen.apply(
            variables, x, generated_params=module.flatten_params(own["params"])
        )
        close(round_trip, target.apply(own, x), STATIC, "round trip")


# -- the fused dynamic path -----------------------------------------------------------------------

ZOO = Path(__file__).resolve().parent / "zoo" / "flax_convs.py"


def generate_file(tmp_path: Path, target: str, *options: str) -> ModuleType:
    file, _, name = target.partition(":")
    out = tmp_path / f"{Path(file).stem}_{name}_dynamic.py"
    args = [target, "--backend", "flax", "--mode", "dynamic", *options, "-o", str(out)]
    assert main(args) == 0
    return import_file(out)


def linen_matches_runtime(
    module: ModuleType, target: nn.Module, x: jax.Array, **options: Any
) -> None:
    """Outputs and gradients of the generated (fused) module equal the runtime's (eval)."""
    runtime = FlaxHyperNetwork(target, mode="dynamic", **options)
    gen = hypernetwork_class(module)()
    variables = jax.jit(runtime.init)(jax.random.key(0), x)
    rt, ours = linen_both(runtime, gen, False)(variables, x, jax.random.key(1))
    close(ours["eval"]["aux"], rt["eval"]["aux"], DYNAMIC, "output, params")
    close(ours["eval"]["grads"], rt["eval"]["grads"], GRAD, "grads")


def test_fused_convolutions_and_fallbacks(tmp_path: Path) -> None:
    """Strided, padded, dilated and 1-D convolutions are fused; grouped and circular ones and
    DenseGeneral/LinearGeneral are materialised per sample; outputs and gradients equal the
    runtime's either way (Linen and NNX)."""
    x = _normal((BATCH, 9, 9, 2))
    linen = generate_file(tmp_path, f"{ZOO}:LinenConvs")
    assert [f[0] for f in linen.FUSED] == [
        ("Conv_0",),
        ("Conv_1",),
        ("Conv_4",),
        ("Dense_0",),
    ]
    assert dict(linen.PER_SAMPLE) == {
        "Conv_2": "grouped convolution",
        "Conv_3": "padding='CIRCULAR'",
        "DenseGeneral_0": "DenseGeneral has no fused form",
    }
    linen_matches_runtime(linen, import_file(ZOO).LinenConvs(), x)

    module = generate_file(tmp_path, f"{ZOO}:make_nnx")
    fused = {f[0][0] for f in module.FUSED}
    assert fused == {"strided", "dilated", "conv1d", "out"}
    assert dict(module.PER_SAMPLE)["grouped"] == "grouped convolution"
    runtime = NNXHyperNetwork(
        import_file(ZOO).make_nnx(),
        mode="dynamic",
        condition_dim=9 * 9 * 2,
        rngs=nnx.Rngs(0),
    )
    gen = hypernetwork_class(module)(rngs=nnx.Rngs(0))
    assert {type(gen.target.strided).__name__, type(gen.target.out).__name__} == {
        "FusedConv",
        "FusedLinear",
    }
    transfer(runtime, gen)
    (rt, rt_grads), (ours, our_grads) = nnx_both(runtime, gen)(split_states(runtime, gen), x)
    close(pure(ours), pure(rt), DYNAMIC, "output, generated_params, state")
    close(pure(our_grads), pure(rt_grads), GRAD, "grads")


def test_rows_spanning_too_many_chunks_are_materialised(tmp_path: Path) -> None:
    """With 3-value chunks a kernel row of 64 spans 22 chunks: more than MAX_SEGMENTS, so those
    layers run per sample; the 4-wide output layer's rows (2 chunks) stay fused."""
    module = generate_file(tmp_path, str(TARGETS_DIR / "linen_mlp.py"), "--chunk-dim", "3")
    assert [f[0] for f in module.FUSED] == [("Dense_2",)]
    assert dict(module.PER_SAMPLE)["Dense_1"] == "a kernel row spans 22 chunks (more than 16)"
    linen_matches_runtime(module, plain_target("linen_mlp"), _normal((BATCH, 8)), chunk_dim=3)


def test_nothing_fused_without_generated_kernels_or_a_linear_generator(
    tmp_path: Path,
) -> None:
    """Kernels kept as parameters (--exclude) leave nothing to fuse: the file has no fused path
    and returns its weight sets; a non-linear generator would fuse nothing either."""
    module = generate_file(tmp_path, str(TARGETS_DIR / "linen_mlp.py"), "--exclude", "*.kernel")
    assert (
        not hasattr(module, "FUSED")
        and "fusion:   no layer fused" in Path(module.__file__).read_text()
    )
    x = _normal((BATCH, 8))
    gen = hypernetwork_class(module)()
    runtime = FlaxHyperNetwork(
        plain_target("linen_mlp"), mode="dynamic", include=lambda p: "kernel" not in p
    )
    variables = jax.jit(runtime.init)(jax.random.key(0), x)
    out, flat = jax.jit(gen.apply)(variables, x)
    close((out, flat), jax.jit(runtime.apply)(variables, x), DYNAMIC, "output, params")

    loaded = load_target(str(TARGETS_DIR / "linen_mlp.py"))
    layout = trace_selected(loaded)
    plan = plan_fusion(loaded, layout, Chunking.resolve(layout.flat_size), linear_generator=False)
    assert plan.fused == () and set(plan.reasons) == {
        (f"Dense_{i}", "the weight generator has hidden layers (not linear)") for i in range(3)
    }


@pytest.mark.parametrize("name", ["linen_mlp", "nnx_mlp"])
def test_fused_path_builds_no_per_sample_weights(name: str) -> None:
    """Every layer of the MLPs is fused: no value of the compiled forward+backward holds a
    weight set per sample (``(batch, *kernel shape)`` or ``(batch, FLAT_SIZE)``)."""
    module = example(f"{name}_{name.split('_')[0]}_dynamic")
    assert len(module.FUSED) == 3 and module.PER_SAMPLE == ()
    x = _normal((BATCH, 8))
    if name == "linen_mlp":
        gen = hypernetwork_class(module)()
        variables = gen.init(jax.random.key(0), x)
        loss = lambda p: gen.apply({"params": p}, x)[0].sum()  # noqa: E731
        jaxpr = jax.make_jaxpr(jax.grad(loss))(variables["params"])
    else:
        gen = hypernetwork_class(module)(rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(gen, nnx.Param, ...)
        loss = lambda p: nnx.merge(graphdef, p, rest)(x)[0].sum()  # noqa: E731
        jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
    forbidden = {(BATCH, module.FLAT_SIZE)} | {(BATCH, *p.shape) for p in module.GENERATED}
    forbidden = {s for s in forbidden if math.prod(s) >= BATCH * 64 * 4}  # the kernels

    def shapes_in(jaxpr: Any) -> Iterator[tuple[int, ...]]:
        for eqn in jaxpr.eqns:
            yield from (tuple(v.aval.shape) for v in eqn.outvars)
            for param in eqn.params.values():
                inner = getattr(param, "jaxpr", None)
                if inner is not None:
                    yield from shapes_in(getattr(inner, "jaxpr", inner))

    seen = set(shapes_in(jaxpr.jaxpr))
    # the fused path ran: the shared stack of Dense_0 (8 rows, S = 1: (S + 1) x 8 rows); Dense_1
    # (one 64-value row to a 64-value chunk) in the rank-D form, (batch, positions, 1, D), no stack
    assert (2 * 8, 64) in seen and (2 * 64, 64) not in seen, repr(sorted(seen))
    assert (BATCH, 1, 1, module.EMBEDDING_DIM) in seen, repr(sorted(seen))
    assert not seen & forbidden, seen & forbidden


# -- a template with its own weight generator -------------------------------------------------

OWN_GENERATOR = {
    "linen": (
        "    model_axis: str | None = None\n\n"
        "    @nn.compact\n"
        "    def __call__(self, embedding: jax.Array) -> jax.Array:\n"
        '        return 3.0 * jax.numpy.tanh(nn.Dense(CHUNK_DIM, name="linear")(embedding))\n\n'
        "{% block helpers %}{{ super() }}{% endblock helpers %}\n"
    ),
    "nnx": (
        "    def __init__(self, *, model_axis: str | None = None, rngs: nnx.Rngs) -> None:\n"
        "        self.model_axis = model_axis\n"
        "        self.linear = nnx.Linear(EMBEDDING_DIM, CHUNK_DIM, rngs=rngs)\n\n"
        "    def __call__(self, embedding: jax.Array) -> jax.Array:\n"
        "        return 3.0 * jax.numpy.tanh(self.linear(embedding))\n"
    ),
}


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_a_template_with_its_own_generator_takes_the_per_sample_path(tmp_path, framework) -> None:
    """The fused path reads the built-in generator's parameters directly and would drop the
    template's ``tanh``: the file runs every sample through the target with its own weights,
    and each output is the plain target's with that sample's weight set."""
    templates = tmp_path / "tpl" / framework
    templates.mkdir(parents=True)
    (templates / "hypernetwork.py.jinja").write_text(
        f'{{% extends "builtin/{framework}/hypernetwork.py.jinja" %}}\n'
        "{% block weight_generator %}\n"
        "class {{ ctx.names.weight_generator }}("
        + ("nn.Module" if framework == "linen" else "nnx.Module")
        + "):\n"
        '    """A non-linear generator: the fused path cannot read it."""\n\n'
        + OWN_GENERATOR[framework]
        + "{% endblock weight_generator %}\n"
    )
    out = tmp_path / "dyn.py"
    name = f"{framework}_mlp"
    target = str(TARGETS_DIR / f"{name}.py") + ("" if framework == "nnx" else ":MLP")
    cmd = [target, "--mode", "dynamic", "--template-dir", str(tmp_path / "tpl"), "-o", str(out)]
    assert main(cmd) == 0
    text = out.read_text()
    assert "fusion:   none (the template writes its own weight_generator class)" in text
    assert "fused_path(" not in text
    module = import_file(out)
    x = _normal((BATCH, 8))
    if framework == "linen":
        hn = hypernetwork_class(module)()
        variables = hn.init(jax.random.key(0), x)
        output, _ = hn.apply(variables, x)
        _, flat = hn.apply(variables, x, return_params=True)
        for b in range(BATCH):
            ref = module.MLP().apply({"params": module.unflatten_params(flat[b])}, x[b : b + 1])
            close(output[b], ref[0], DYNAMIC, f"sample {b}")
    else:
        hn = hypernetwork_class(module)(rngs=nnx.Rngs(0))
        output, _ = hn(x)
        _, flat = hn(x, return_params=True)
        for b in range(BATCH):
            plain = with_params(module.make_target(), hn.unflatten_params(flat[b]))
            close(output[b], plain(x[b : b + 1])[0], DYNAMIC, f"sample {b}")
    assert flat.shape == (BATCH, module.FLAT_SIZE)


# -- the static Linen fast path: Dense layers at rank D -------------------------------------------

WIDE_MLP = """import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(256)(x))
        x = nn.tanh(nn.Dense(256)(x))
        return nn.Dense(4)(x)


example_input = jnp.zeros((2, 8))
"""


def shapes_made(fn: Callable, *args: Any) -> set[tuple[int, ...]]:
    """The shapes of every value the jaxpr of ``fn(*args)`` computes (inner jaxprs included)."""
    found: set[tuple[int, ...]] = set()

    def walk(jaxpr: Any) -> None:
        for eqn in jaxpr.eqns:
            found.update(tuple(v.aval.shape) for v in eqn.outvars)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


WIDE_NNX = """import jax.numpy as jnp
from flax import nnx


class MLP(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs) -> None:
        self.a = nnx.Linear(8, 256, rngs=rngs)
        self.b = nnx.Linear(256, 256, rngs=rngs)
        self.c = nnx.Linear(256, 4, rngs=rngs)

    def __call__(self, x):
        return self.c(nnx.tanh(self.b(nnx.tanh(self.a(x)))))


def make_target() -> MLP:
    return MLP(rngs=nnx.Rngs(0))


example_input = jnp.zeros((2, 8))
"""


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_static_fast_path_equals_the_flat_vector_path_and_the_plain_target(
    tmp_path, framework
) -> None:
    """A static Linen/NNX file computes the 256 x 256 layer (rows filling 256-value chunks) at
    rank 32, its kernel never built: outputs and every gradient as the flat-vector path's
    (``return_params=True``) and the plain target's with the generated params."""
    (tmp_path / "wide.py").write_text(WIDE_MLP if framework == "linen" else WIDE_NNX)
    out = tmp_path / "static.py"
    target = str(tmp_path / "wide.py") + (":MLP" if framework == "linen" else "")
    assert main([target, "--mode", "static", "-o", str(out)]) == 0
    module = import_file(out)
    layer = "Dense_1" if framework == "linen" else "b"
    assert [row[0] for row in module.LOW_RANK] == [(layer,)]
    assert f"# rank-D:   {layer}\n" in out.read_text()
    x = _normal((16, 8))
    if framework == "linen":
        hn = hypernetwork_class(module)()
        variables = hn.init(jax.random.key(0), x)

        def run(return_params: bool, params: Any = None) -> tuple:
            v = {**variables, "params": variables["params"] if params is None else params}
            return hn.apply(v, x, return_params=return_params)

        def grads(return_params: bool) -> Any:
            loss = lambda p: jnp.mean(run(return_params, p)[0] ** 2)  # noqa: E731
            return jax.grad(loss)(variables["params"])
    else:
        hn = hypernetwork_class(module)(rngs=nnx.Rngs(0))

        def run(return_params: bool, m: Any = None) -> tuple:
            return (hn if m is None else m)(x, return_params=return_params)

        def grads(return_params: bool) -> Any:
            loss = lambda m: jnp.mean(run(return_params, m)[0] ** 2)  # noqa: E731
            return nnx.grad(loss)(hn)

    (fast, none), (slow, flat) = run(False), run(True)
    assert none is None and flat.shape == (module.FLAT_SIZE,)
    close(fast, slow, STATIC, "fast vs flat vector")
    if framework == "linen":
        plain = module.MLP().apply({"params": module.unflatten_params(flat)}, x)
    else:
        plain = with_params(module.make_target(), hn.unflatten_params(flat))(x)
    close(fast, plain, STATIC, "fast vs the plain target")

    close(grads(False), grads(True), GRAD, "gradients, fast vs flat vector")
    # the rank-D kernel (256, 256) is never made on the fast path, and is on the other
    if framework == "linen":
        made = [shapes_made(lambda rp=rp: grads(rp)) for rp in (False, True)]
    else:  # a traced function may not close over NNX variables: pass the state in
        graphdef, state = nnx.split(hn)
        copy = lambda s: nnx.merge(graphdef, s, copy=True)  # noqa: E731
        loss = lambda m, rp: jnp.mean(run(rp, m)[0] ** 2)  # noqa: E731
        made = [
            shapes_made(lambda s, rp=rp: nnx.grad(lambda m: loss(m, rp))(copy(s)), state)
            for rp in (False, True)
        ]
    assert (256, 256) not in made[0] and (256, 256) in made[1]


def test_linen_static_with_its_own_generator_keeps_the_flat_vector(tmp_path) -> None:
    templates = tmp_path / "tpl" / "linen"
    templates.mkdir(parents=True)
    (templates / "hypernetwork.py.jinja").write_text(
        '{% extends "builtin/linen/hypernetwork.py.jinja" %}\n'
        "{% block weight_generator %}\n"
        "class {{ ctx.names.weight_generator }}(nn.Module):\n"
        '    """A non-linear generator: the rank-D form cannot read it."""\n\n'
        + OWN_GENERATOR["linen"]
        + "{% endblock weight_generator %}\n"
    )
    (tmp_path / "wide.py").write_text(WIDE_MLP)
    out = tmp_path / "static.py"
    cmd = [str(tmp_path / "wide.py") + ":MLP", "--mode", "static", "-o", str(out)]
    assert main([*cmd, "--template-dir", str(tmp_path / "tpl")]) == 0
    module = import_file(out)
    assert not hasattr(module, "LOW_RANK")
    hn, x = hypernetwork_class(module)(), _normal((4, 8))
    variables = hn.init(jax.random.key(0), x)
    output, flat = hn.apply(variables, x)
    assert flat.shape == (module.FLAT_SIZE,)
    plain = module.MLP().apply({"params": module.unflatten_params(flat)}, x)
    close(output, plain, STATIC, "its own generator's weights")
