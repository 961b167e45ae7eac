"""--generate lora for Flax Linen and NNX (issue 17): LoRA adapters on a frozen base.

Generated files against their runtime twins (same parameters, outputs and gradients), dynamic
batches against one-sample calls and against per-sample merged kernels run through the plain
target (an independent computation), the exact start at the base model, a base the optimizer
never sees, few trainable parameters, a short training run, --base msgpack checkpoints, inspect
and the command line's refusals.
"""

from __future__ import annotations

import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, serialization
from gen_support import TARGETS_DIR, import_file

from hypernn_gen.cli import main
from hypernn_gen.errors import HyperNetworkError
from hypernn_gen.runtime.flax.lora import (
    FlaxLoRAHyperNetwork,
    FrozenBase,
    NNXLoRAHyperNetwork,
    merge_adapters,
)

FRAMEWORKS = ("linen", "nnx")
TASKS = 4
BATCH = 3
#: the adapted layers of the transformer targets (attention projections and the MLP), by default
LINEN_ADAPTED = [
    *(f"Block_0.MultiHeadDotProductAttention_0.{p}" for p in ("query", "key", "value", "out")),
    "Block_0.Dense_1",
    "Block_0.Dense_0",
]
NNX_ADAPTED = [f"block.attn.{p}" for p in ("key", "out", "query", "value")] + [
    "block.fc",
    "block.proj",
]


def close(actual, expected, atol: float = 1e-5, msg: str = "") -> None:  # noqa: ANN001
    expected = np.asarray(expected)
    scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    np.testing.assert_allclose(
        np.asarray(actual), expected, rtol=1e-5, atol=atol * scale, err_msg=msg
    )


def target_module(framework: str):  # noqa: ANN201
    return import_file(TARGETS_DIR / f"{framework}_transformer.py", f"_lora_flax_{framework}")


def tokens(batch: int = BATCH) -> jax.Array:
    return jax.random.randint(jax.random.key(2), (batch, 16), 0, 64)


def conditions(batch: int = BATCH) -> jax.Array:
    return jax.random.normal(jax.random.key(3), (batch, TASKS))


def generate(tmp_path: Path, framework: str, *flags: str):  # noqa: ANN201
    out = tmp_path / f"{framework}_{abs(hash(flags))}.py"
    target = TARGETS_DIR / f"{framework}_transformer.py"
    assert main([str(target), "--generate", "lora", *flags, "-o", str(out)]) == 0
    return import_file(out)


def hypernetwork_class(generated, framework: str) -> type:  # noqa: ANN001
    """The generated file's hypernetwork (the file also holds the kernel's base class)."""
    return getattr(generated, f"{framework.capitalize()}TransformerHyperNetwork")


def perturb_b_tree(params: dict) -> dict:
    """Give the B heads values (they start at zero), so that the adapters change the output."""
    keys = iter(jax.random.split(jax.random.key(4), 64))

    def leaf(path, x):  # noqa: ANN001, ANN202
        names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        if any(n.startswith("head_b") or n == "heads_b" for n in names):
            return 0.05 * jax.random.normal(next(keys), x.shape)
        return x

    return jax.tree_util.tree_map_with_path(leaf, params)


def merged_reference(framework: str, module, base, adapters: dict, scaling: float, x, sample=None):  # noqa: ANN001, ANN201
    """The plain target with each adapted kernel ``W + scaling * (B A)^T`` (one sample's)."""

    def merge(kernel, path):  # noqa: ANN001, ANN202
        a, b = adapters[f"{path}.lora_A"], adapters[f"{path}.lora_B"]
        if sample is not None:
            a, b = a[sample], b[sample]
        return kernel + (scaling * (b @ a)).T.reshape(kernel.shape)

    if framework == "linen":
        params = jax.tree.map(lambda v: v, base["params"])
        for path in LINEN_ADAPTED:
            node = params
            for key in path.split("."):
                node = node[key]
            node["kernel"] = merge(node["kernel"], path)
        return module.TinyGPT().apply({"params": params}, x)
    plain = base
    graphdef, state = nnx.split(plain)
    flat = dict(nnx.to_flat_state(state))
    for path in NNX_ADAPTED:
        keys = (*path.split("."), "kernel")
        flat[keys] = flat[keys].replace(merge(flat[keys].get_value(), path))
    return nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())))(x)


class Twins:
    """A generated hypernetwork and its runtime twin with the same parameters (B perturbed)."""

    def __init__(self, tmp_path: Path, framework: str, flags: tuple, options: dict) -> None:
        self.framework, self.module = framework, target_module(framework)
        generated = generate(tmp_path, framework, *flags)
        cls = hypernetwork_class(generated, framework)
        self.dynamic = options.get("mode") == "dynamic"
        self.scaling = options.get("lora_alpha", options.get("lora_rank", 8)) / options.get(
            "lora_rank", 8
        )
        x = tokens()
        call = {"condition": conditions()} if self.dynamic else {}
        if framework == "linen":
            self.gen = cls()
            self.runtime = FlaxLoRAHyperNetwork(self.module.TinyGPT(), **options)
            variables = self.runtime.init(jax.random.key(0), x, **call)
            gen_variables = self.gen.init(jax.random.key(0), x, **call)
            assert jax.tree.structure(gen_variables) == jax.tree.structure(variables)
            self.variables = {**variables, "params": perturb_b_tree(variables["params"])}
            self.base = self.variables["base"]["target"]
        else:
            self.base = self.module.make_target()
            self.gen = cls(self.base, rngs=nnx.Rngs(0))
            self.runtime = NNXLoRAHyperNetwork(self.base, **options, rngs=nnx.Rngs(0))
            state = nnx.state(self.runtime, nnx.Param)
            assert jax.tree.structure(nnx.state(self.gen, nnx.Param)) == jax.tree.structure(state)
            nnx.update(self.runtime, perturb_b_tree(state))
            nnx.update(self.gen, nnx.state(self.runtime, nnx.Param))
            self.gen.eval()
            self.runtime.eval()

    def run(self, which: str, x, **call):  # noqa: ANN001, ANN201
        hyper = self.gen if which == "gen" else self.runtime
        if self.framework == "linen":
            return hyper.apply(self.variables, x, **call)
        return hyper(x, **call)

    def grads(self, which: str, x, **call) -> dict:  # noqa: ANN001
        hyper = self.gen if which == "gen" else self.runtime
        if self.framework == "linen":

            def loss(params):  # noqa: ANN001, ANN202
                out, _ = hyper.apply({**self.variables, "params": params}, x, **call)
                return jnp.square(out).mean()

            return jax.grad(loss)(self.variables["params"])
        return nnx.grad(lambda h: jnp.square(h(x, **call)[0]).mean())(hyper)

    def reference(self, adapters: dict, x, sample=None):  # noqa: ANN001, ANN201
        return merged_reference(
            self.framework, self.module, self.base, adapters, self.scaling, x, sample
        )


RANK_ALPHA = (("--lora-rank", "4", "--lora-alpha", "8"), {"lora_rank": 4, "lora_alpha": 8.0})
PER_LAYER_TRUNK = (
    ("--lora-generator", "per-layer", "--generator-hidden", "16", "--lora-dropout", "0.1"),
    {"lora_generator": "per-layer", "generator_hidden": (16,), "lora_dropout": 0.1},
)


@pytest.mark.parametrize(
    ("framework", "flags", "options"),
    [("linen", *RANK_ALPHA), ("nnx", *RANK_ALPHA), ("nnx", *PER_LAYER_TRUNK)],
)
def test_static_flax_lora_matches_runtime_and_merged_kernels(
    tmp_path: Path, framework: str, flags, options
) -> None:  # noqa: ANN001
    twins = Twins(tmp_path, framework, flags, options)
    x = tokens()
    out_g, adapters_g = twins.run("gen", x)
    out_r, adapters_r = twins.run("runtime", x)
    np.testing.assert_array_equal(out_g, out_r)  # the same kernel code on the same values
    adapted = LINEN_ADAPTED if framework == "linen" else NNX_ADAPTED
    assert sorted(adapters_g) == sorted(f"{p}.lora_{w}" for p in adapted for w in "AB")
    rank = options.get("lora_rank", 8)
    up = "Block_0.Dense_1" if framework == "linen" else "block.fc"
    assert adapters_g[f"{up}.lora_A"].shape == (rank, 32)
    assert adapters_g[f"{up}.lora_B"].shape == (128, rank)
    close(out_r, twins.reference(adapters_r, x), msg="merged kernels")
    base_out = twins.reference({k: jnp.zeros_like(v) for k, v in adapters_r.items()}, x)
    assert float(jnp.abs(out_r - base_out).max()) > 1e-3  # the adapters change the output
    jax.tree.map(close, twins.grads("gen", x), twins.grads("runtime", x))


@pytest.mark.parametrize(("framework", "generator"), [("linen", "per-layer"), ("nnx", "shared")])
def test_dynamic_flax_lora_per_sample_equals_one_sample_calls_and_merged_kernels(
    tmp_path: Path, framework: str, generator: str
) -> None:
    flags = ("--mode", "dynamic", "--condition-shape", str(TASKS), "--lora-generator", generator)
    options = {"mode": "dynamic", "condition_shape": (TASKS,), "lora_generator": generator}
    twins = Twins(tmp_path, framework, flags, options)
    x, c = tokens(), conditions()
    out_g, adapters = twins.run("gen", x, condition=c)
    out_r, _ = twins.run("runtime", x, condition=c)
    np.testing.assert_array_equal(out_g, out_r)
    proj = "Block_0.Dense_0" if framework == "linen" else "block.proj"
    assert adapters[f"{proj}.lora_A"].shape == (BATCH, 8, 128)
    for b in range(BATCH):
        one, _ = twins.run("gen", x[b : b + 1], condition=c[b : b + 1])
        close(out_g[b : b + 1], one, msg=f"sample {b}")
        expected = twins.reference(adapters, x[b : b + 1], sample=b)
        close(out_g[b : b + 1], expected, msg=f"sample {b} merged")
    assert float(jnp.abs(out_g[0] - out_g[1]).max()) > 1e-4  # samples get different adapters
    jax.tree.map(close, twins.grads("gen", x, condition=c), twins.grads("runtime", x, condition=c))


def value_shapes(jaxpr) -> set:  # noqa: ANN001
    """The shape of every value a jaxpr (and every jaxpr inside it) computes."""
    shapes = set()
    for eqn in jaxpr.eqns:
        shapes |= {tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")}
        for param in eqn.params.values():
            for inner in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(inner, "jaxpr", inner)  # a ClosedJaxpr's own jaxpr
                if hasattr(inner, "eqns"):
                    shapes |= value_shapes(inner)
    return shapes


def test_dynamic_flax_lora_never_forms_per_sample_kernels() -> None:
    """The forward and backward of a batch of 5 (Linen runtime, traced to a jaxpr from abstract
    variables) compute no ``(5, *kernel)`` value of an adapted layer; the dynamic delta
    hypernetwork of the same model (per-sample kernels by design) does: the check can fail."""
    from hypernn_gen.runtime.flax import FlaxHyperNetwork

    model, x, c = target_module("linen").TinyGPT(), tokens(5), conditions(5)

    def shapes(hn) -> tuple[set, dict]:  # noqa: ANN001
        variables = jax.eval_shape(hn.init, jax.random.key(0), x, condition=c)
        rest = {k: v for k, v in variables.items() if k != "params"}

        def loss(params, rest):  # noqa: ANN001, ANN202
            return jnp.square(hn.apply({**rest, "params": params}, x, condition=c)[0]).mean()

        jaxpr = jax.make_jaxpr(jax.grad(loss))(variables["params"], rest).jaxpr
        return value_shapes(jaxpr), variables

    lora_shapes, variables = shapes(
        FlaxLoRAHyperNetwork(model, mode="dynamic", condition_shape=(TASKS,), lora_rank=4)
    )
    kernels = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables["base"]["target"]["params"])[
        0
    ]:
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        if name.endswith(".kernel") and any(name.startswith(f"{p}.") for p in LINEN_ADAPTED):
            kernels.add((5, *leaf.shape))
    assert len(kernels) >= 2, kernels
    assert lora_shapes & kernels == set()
    assert shapes(FlaxHyperNetwork(model, mode="dynamic", generate="delta"))[0] & kernels


# -- the start, the frozen base, the parameter count, training -----------------------------------


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_flax_lora_starts_exactly_at_the_base_and_the_optimizer_never_sees_it(
    framework: str, mode: str
) -> None:
    module = target_module(framework)
    x, c = tokens(), conditions()
    options = {"mode": mode, "condition_shape": (TASKS,) if mode == "dynamic" else None}
    call = {"condition": c} if mode == "dynamic" else {}
    tx = optax.sgd(0.1)
    if framework == "linen":
        hyper = FlaxLoRAHyperNetwork(module.TinyGPT(), **options)
        variables = hyper.init(jax.random.key(0), x, **call)
        base = variables["base"]["target"]
        assert set(variables["params"]) == {"generator"}
        out, adapters = hyper.apply(variables, x, **call)
        np.testing.assert_array_equal(out, module.TinyGPT().apply(base, x))  # exactly: B = 0

        def loss(variables):  # noqa: ANN001, ANN202
            return jnp.square(hyper.apply(variables, x, **call)[0]).mean()

        grads = jax.grad(loss)(variables)  # even asked for, the base gets no gradient
        assert all(not g.any() for g in jax.tree.leaves(grads["base"]))
        params = variables["params"]
        updates, _ = tx.update(grads["params"], tx.init(params), params)
        after = {**variables, "params": optax.apply_updates(params, updates)}
        jax.tree.map(np.testing.assert_array_equal, after["base"], variables["base"])
        moved, _ = hyper.apply(after, x, **call)
        head_b = [
            g for p, g in jax.tree_util.tree_leaves_with_path(grads["params"]) if "head_b" in str(p)
        ]
    else:
        plain = module.make_target()
        before = jax.tree.map(jnp.copy, nnx.state(plain, nnx.Param))
        hyper = NNXLoRAHyperNetwork(plain, **options, rngs=nnx.Rngs(0))
        out, adapters = hyper(x, **call)
        np.testing.assert_array_equal(out, plain(x))  # exactly: B = 0
        paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(hyper, nnx.Param))}
        assert paths and all(p.startswith("generator.") for p in paths)
        frozen = nnx.state(hyper.target, FrozenBase)
        assert len(jax.tree.leaves(frozen)) == len(jax.tree.leaves(before))
        optimizer = nnx.Optimizer(hyper, tx, wrt=nnx.Param)
        grads = nnx.grad(lambda h: jnp.square(h(x, **call)[0]).mean())(hyper)
        optimizer.update(hyper, grads)
        jax.tree.map(np.testing.assert_array_equal, nnx.state(hyper.target, FrozenBase), frozen)
        jax.tree.map(np.testing.assert_array_equal, nnx.state(plain, nnx.Param), before)
        moved, _ = hyper(x, **call)
        head_b = [v for p, v in nnx.to_flat_state(grads) if "heads_b" in map(str, p)]
    assert all(not v.any() for k, v in adapters.items() if "lora_B" in k)
    a = adapters[("Block_0.Dense_1" if framework == "linen" else "block.fc") + ".lora_A"]
    assert 0.5 < float(a.std()) * math.sqrt(3 * 32) < 1.5  # PEFT's A scale, std 1/sqrt(3 in)
    assert head_b and all(float(jnp.abs(jnp.asarray(g)).sum()) > 0 for g in head_b)
    assert float(jnp.abs(moved - out).max()) > 0  # one step moves it away from the base


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_flax_lora_dropout_acts_in_training_only(framework: str) -> None:
    """The adapters' input dropout: Linen with an rng named lora_dropout, NNX in train() mode;
    without it the output is the deterministic one."""
    module = target_module(framework)
    x = tokens()
    if framework == "linen":
        hyper = FlaxLoRAHyperNetwork(module.TinyGPT(), lora_dropout=0.5)
        variables = hyper.init(jax.random.key(0), x)
        variables = {**variables, "params": perturb_b_tree(variables["params"])}
        plain, _ = hyper.apply(variables, x)
        again, _ = hyper.apply(variables, x)
        one, _ = hyper.apply(variables, x, rngs={"lora_dropout": jax.random.key(1)})
        two, _ = hyper.apply(variables, x, rngs={"lora_dropout": jax.random.key(2)})
    else:
        hyper = NNXLoRAHyperNetwork(module.make_target(), lora_dropout=0.5, rngs=nnx.Rngs(0))
        nnx.update(hyper, perturb_b_tree(nnx.state(hyper, nnx.Param)))
        one, _ = hyper(x)  # train() mode: the default
        two, _ = hyper(x)
        hyper.eval()
        plain, _ = hyper(x)
        again, _ = hyper(x)
    np.testing.assert_array_equal(plain, again)
    assert float(jnp.abs(one - plain).max()) > 1e-4 and float(jnp.abs(one - two).max()) > 1e-4


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_flax_merged_params_run_the_plain_target_as_the_hypernetwork(framework: str) -> None:
    """One condition's adapters merged into the kernels (``merge_adapters``, NNX's
    ``merged_params``): the plain target loaded with them gives the hypernetwork's output."""
    module = target_module(framework)
    x, c = tokens(), conditions()
    options = {"mode": "dynamic", "condition_shape": (TASKS,)}
    if framework == "linen":
        hyper = FlaxLoRAHyperNetwork(module.TinyGPT(), lora_alpha=16.0, **options)
        variables = hyper.init(jax.random.key(0), x, condition=c)
        variables = {**variables, "params": perturb_b_tree(variables["params"])}
        out, lora = hyper.apply(variables, x, condition=c)
        one = {k: v[1] for k, v in lora.items()}
        base = variables["base"]["target"]
        layers = hyper.adapted_layers((x,), {})
        merged = merge_adapters(base["params"], layers, one, 16.0 / 8)
        plain_out = module.TinyGPT().apply({**base, "params": merged}, x[1:2])
        untouched = module.TinyGPT().apply(base, x[1:2])
    else:
        plain = module.make_target()
        hyper = NNXLoRAHyperNetwork(plain, lora_alpha=16.0, **options, rngs=nnx.Rngs(0))
        nnx.update(hyper, perturb_b_tree(nnx.state(hyper, nnx.Param)))
        out, _ = hyper(x, condition=c)
        untouched = plain(x[1:2])
        state = nnx.state(plain, nnx.Param)
        nnx.replace_by_pure_dict(state, hyper.merged_params(c[1:2]))
        nnx.update(plain, state)
        plain_out = plain(x[1:2])
        with pytest.raises(HyperNetworkError, match="the condition of one sample"):
            hyper.merged_params(c)
    close(plain_out, out[1:2], msg="merged")
    assert float(jnp.abs(plain_out - untouched).max()) > 1e-3


class Blocks(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.blocks = nnx.List(
            [
                nnx.List([nnx.Linear(256, 1024, rngs=rngs), nnx.Linear(1024, 256, rngs=rngs)])
                for _ in range(4)
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for up, down in self.blocks:
            x = down(up(x))
        return x


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(256, name="down")(nn.Dense(1024, name="up")(x))


class LinenBlocks(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(4):
            x = LinenBlock(name=f"block_{i}")(x)
        return x


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_flax_lora_has_few_trainable_parameters(framework: str) -> None:
    d, r = 16, 4
    if framework == "nnx":
        big = nnx.eval_shape(lambda: Blocks(nnx.Rngs(0)))
        hyper = nnx.eval_shape(lambda: NNXLoRAHyperNetwork(big, d, lora_rank=r, rngs=nnx.Rngs(0)))
        trainable = sum(x.size for x in jax.tree.leaves(nnx.state(hyper, nnx.Param)))
        frozen = sum(x.size for x in jax.tree.leaves(nnx.state(hyper, FrozenBase)))
        assert [a.depth for a in hyper.adapters] == [0, 0, 1, 1, 2, 2, 3, 3]
    else:  # the depth is the number ending a Linen name (block_3)
        hyper = FlaxLoRAHyperNetwork(LinenBlocks(), embedding_dim=d, lora_rank=r)
        shapes = jax.eval_shape(lambda: hyper.init(jax.random.key(0), jnp.zeros((1, 256))))
        depth = shapes["params"]["generator"]["depth"]
        assert depth.shape == (4, d)
        trainable = sum(x.size for x in jax.tree.leaves(shapes["params"]))
        frozen = sum(x.size for x in jax.tree.leaves(shapes["base"]))
    # one pair of heads per module type, shared by the 4 blocks: (D + 1) * r * (in + out) each,
    # plus the condition vector and the depth (4) and kind (2) embeddings
    assert trainable == 2 * (d + 1) * r * (256 + 1024) + d * (1 + 4 + 2)
    assert trainable < frozen / 10


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_flax_lora_training_run_fits_a_shifted_target(framework: str) -> None:
    """Static LoRA learns to reproduce a target whose adapted kernels moved by a low-rank step."""
    module = target_module(framework)
    x = jax.random.randint(jax.random.key(5), (8, 16), 0, 64)
    keys = iter(jax.random.split(jax.random.key(6), 64))

    def shift(path, w):  # noqa: ANN001, ANN202
        if not any("kernel" in str(k) for k in path[-2:]) or w.ndim < 2:
            return w
        rows, cols = math.prod(w.shape[:-1]), w.shape[-1]
        step = jax.random.normal(next(keys), (rows, 2)) @ jax.random.normal(next(keys), (2, cols))
        return w + (0.3 * step / math.sqrt(rows)).reshape(w.shape)

    tx = optax.adam(3e-3)
    if framework == "linen":
        hyper = FlaxLoRAHyperNetwork(module.TinyGPT(), lora_rank=4)
        variables = hyper.init(jax.random.key(0), x)
        teacher = jax.tree_util.tree_map_with_path(shift, variables["base"]["target"])
        target = module.TinyGPT().apply(teacher, x)

        @jax.jit
        def step(params, state):  # noqa: ANN001, ANN202
            def loss(p):  # noqa: ANN001, ANN202
                return jnp.square(hyper.apply({**variables, "params": p}, x)[0] - target).mean()

            value, grads = jax.value_and_grad(loss)(params)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, value

        params, state = variables["params"], tx.init(variables["params"])
        losses = []
        for _ in range(120):
            params, state, value = step(params, state)
            losses.append(float(value))
    else:
        plain = module.make_target()
        teacher = module.make_target()
        nnx.update(teacher, jax.tree_util.tree_map_with_path(shift, nnx.state(teacher, nnx.Param)))
        target = teacher(x)
        hyper = NNXLoRAHyperNetwork(plain, lora_rank=4, rngs=nnx.Rngs(0))
        optimizer = nnx.Optimizer(hyper, tx, wrt=nnx.Param)

        @nnx.jit
        def step(hyper, optimizer):  # noqa: ANN001, ANN202
            def loss(h):  # noqa: ANN001, ANN202
                return jnp.square(h(x)[0] - target).mean()

            value, grads = nnx.value_and_grad(loss)(hyper)
            optimizer.update(hyper, grads)
            return value

        losses = [float(step(hyper, optimizer)) for _ in range(120)]
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])


# -- --base checkpoints -----------------------------------------------------------------------------


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_flax_base_checkpoint_is_the_frozen_base(tmp_path: Path, framework: str) -> None:
    module = target_module(framework)
    x = tokens()
    path = tmp_path / "base.msgpack"
    if framework == "linen":
        own = module.TinyGPT().init(jax.random.key(7), x)
        pretrained = jax.tree.map(lambda v: v + 0.1, own)
        path.write_bytes(serialization.msgpack_serialize(pretrained))
        expected = module.TinyGPT().apply(pretrained, x)
    else:
        pretrained = module.make_target()
        nnx.update(pretrained, jax.tree.map(lambda v: v + 0.1, nnx.state(pretrained, nnx.Param)))
        path.write_bytes(serialization.msgpack_serialize(nnx.to_pure_dict(nnx.state(pretrained))))
        expected = pretrained(x)
    generated = generate(tmp_path, framework, "--base", str(path))
    text = Path(generated.__file__).read_text()
    base_line = next(line for line in text.splitlines() if line.startswith("# base:"))
    assert base_line.startswith("# base:     checkpoint ") and base_line.endswith(path.name)
    cls = hypernetwork_class(generated, framework)
    if framework == "linen":
        variables = cls().init(jax.random.key(0), x)
        close(cls().apply(variables, x)[0], expected, msg="generated")
        runtime = FlaxLoRAHyperNetwork(module.TinyGPT(), base=str(path))
        close(runtime.apply(runtime.init(jax.random.key(0), x), x)[0], expected, msg="runtime")
        bad = {"params": {k: v for k, v in pretrained["params"].items() if k != "Block_0"}}
        with pytest.raises(HyperNetworkError, match="base checkpoint has no 'Block_0"):
            FlaxLoRAHyperNetwork(module.TinyGPT(), base=bad).init(jax.random.key(0), x)
    else:
        close(cls(rngs=nnx.Rngs(0))(x)[0], expected, msg="generated")
        runtime = NNXLoRAHyperNetwork(module.make_target(), base=path, rngs=nnx.Rngs(0))
        close(runtime(x)[0], expected, msg="runtime")
        bad = nnx.to_pure_dict(nnx.state(pretrained))
        del bad["block"]["fc"]
        with pytest.raises(HyperNetworkError, match="base checkpoint has no 'block.fc.bias'"):
            NNXLoRAHyperNetwork(module.make_target(), base=bad, rngs=nnx.Rngs(0))


# -- the command line -----------------------------------------------------------------------------


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ("--generate", "lora", "--base", "missing.msgpack"),
            "--base missing.msgpack: no such file",
        ),
        (
            ("--generate", "lora", "--include", "*.embedding"),
            "--generate lora found nothing to adapt",
        ),
    ],
)
def test_bad_flax_lora_options_are_refused_in_one_line(
    tmp_path: Path, capsys, framework: str, flags, message
) -> None:  # noqa: ANN001
    target = TARGETS_DIR / f"{framework}_transformer.py"
    code = main([str(target), *flags, "-o", str(tmp_path / "x.py")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_inspect_shows_the_flax_adapted_layers_and_the_generator_size(
    capsys,
) -> None:  # noqa: ANN001
    import json

    target = TARGETS_DIR / "nnx_transformer.py"
    assert main(["inspect", str(target), "--generate", "lora", "--lora-rank", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [layer["path"] for layer in report["layers"]] == NNX_ADAPTED
    fc = report["layers"][NNX_ADAPTED.index("block.fc")]
    assert fc["base_shape"] == [128, 32] and fc["adapter_values"] == 4 * (128 + 32)
    hyper = NNXLoRAHyperNetwork(target_module("nnx").make_target(), lora_rank=4, rngs=nnx.Rngs(0))
    own = sum(x.size for x in jax.tree.leaves(nnx.state(hyper, nnx.Param)))
    assert report["generator_params"] == own
    assert report["base"] == "the target's own weights (make_target())"


@pytest.mark.parametrize(
    "name", ["linen_transformer_lora_dynamic.py", "nnx_transformer_lora_dynamic.py"]
)
def test_committed_flax_lora_files_carry_the_kernel_verbatim(name: str) -> None:
    import ast

    from hypernn_gen.extract import KERNEL_BEGIN, KERNEL_END

    text = (TARGETS_DIR.parent / name).read_text()
    begin = text.index(KERNEL_BEGIN + "\n")
    section = text[begin : text.index(KERNEL_END + "\n", begin)]
    kernel = TARGETS_DIR.parents[1] / "hypernn_gen" / "kernel"
    names = ("flax.py", "lora_flax.py", "lora_linen.py", "lora_nnx.py")
    source = "".join((kernel / k).read_text() for k in names)
    tree = ast.parse(section)
    assert tree.body
    for stmt in tree.body:
        assert ast.get_source_segment(section, stmt) in source
    assert "hypernn_gen" not in text.replace("hypernn_gen/kernel", "")
    assert "# base:     the target's own weights (make_target())" in text


def test_committed_flax_lora_files_run_as_scripts_without_hypernn_gen() -> None:
    import os
    import subprocess
    import sys

    files = [TARGETS_DIR.parent / f"{k}_transformer_lora_dynamic.py" for k in FRAMEWORKS]
    script = (
        "import runpy, sys\n"
        "sys.modules['hypernn_gen'] = None  # any import of hypernn_gen now fails\n"
        "for path in sys.argv[1:]:\n"
        "    print('==', path, flush=True)\n"
        "    runpy.run_path(path, run_name='__main__')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, *map(str, files)],
        cwd=TARGETS_DIR.parents[1],
        env={**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    blocks = proc.stdout.split("== ")[1:]
    assert len(blocks) == 2
    for block in blocks:
        assert "output: (2, 16, 64)" in block and "adapters: 12 tensors" in block, block
        assert "trainable parameters, a frozen target of 15,328" in block, block
