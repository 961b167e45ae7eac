"""--generate delta for Flax Linen and NNX (issue 17): each generated tensor is a frozen base plus
a generated delta that starts at exactly 0.

Generated files (static and dynamic) against the plain target run with the base weights (an
independent computation): the exact start at the base, a dynamic batch equal to one-sample calls
and to the plain target run with each sample's weights, a base the optimizer never sees (not a
param, unchanged by training), a short training run, and --base msgpack checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, serialization
from gen_support import TARGETS_DIR, import_file

from hypernn_gen.cli import main

FRAMEWORKS = ("linen", "nnx")
MODES = ("static", "dynamic")
BATCH = 3


def close(actual, expected, atol: float = 1e-5, msg: str = "") -> None:  # noqa: ANN001
    np.testing.assert_allclose(
        np.asarray(actual), np.asarray(expected), rtol=1e-5, atol=atol, err_msg=msg
    )


def generate(tmp_path: Path, framework: str, mode: str, *flags: str):  # noqa: ANN201
    target = TARGETS_DIR / f"{framework}_mlp.py"
    out = tmp_path / f"{framework}_{mode}_delta.py"
    assert main([str(target), "--generate", "delta", "--mode", mode, *flags, "-o", str(out)]) == 0
    return import_file(out, f"_delta_{framework}_{mode}_{abs(hash(str(out)))}")


def inputs(batch: int = BATCH) -> jax.Array:
    return jax.random.normal(jax.random.key(2), (batch, 8))


def pretrained(tmp_path: Path, framework: str):  # noqa: ANN201
    """A 'pretrained' target (its own init, shifted), its msgpack checkpoint and a forward."""
    module = import_file(TARGETS_DIR / f"{framework}_mlp.py", f"_delta_target_{framework}")
    path = tmp_path / "base.msgpack"
    if framework == "linen":
        variables = jax.tree.map(lambda v: v + 0.1, module.MLP().init(jax.random.key(7), inputs()))
        path.write_bytes(serialization.msgpack_serialize(variables))
        return module, path, lambda params, x: module.MLP().apply({"params": params}, x), variables
    model = module.make_target()
    nnx.update(model, jax.tree.map(lambda v: v + 0.1, nnx.state(model, nnx.Param)))
    path.write_bytes(serialization.msgpack_serialize(nnx.to_pure_dict(nnx.state(model))))
    graphdef, state = nnx.split(model)

    def forward(params, x):  # noqa: ANN001, ANN202
        fresh = nnx.merge(graphdef, state)
        nnx.update(fresh, params)
        return fresh(x)

    return module, path, forward, model


class Built:
    """A generated delta hypernetwork with a functional forward over its trainable params."""

    def __init__(self, generated, framework: str, mode: str, base) -> None:  # noqa: ANN001
        self.framework, self.dynamic = framework, mode == "dynamic"
        cls = getattr(
            generated, "MLPHyperNetwork" if framework == "linen" else "NnxMlpHyperNetwork"
        )
        self.generated = generated
        if framework == "linen":
            self.hn = cls(base=base)
            variables = self.hn.init(jax.random.key(0), inputs())
            self.params = variables["params"]
            self.frozen = {k: v for k, v in variables.items() if k != "params"}
        else:
            self.hn = cls(rngs=nnx.Rngs(0), base=base)
            self.graphdef, self.params, self.frozen = nnx.split(self.hn, nnx.Param, ...)

    def __call__(self, params, x):  # noqa: ANN001, ANN204
        extra = {"return_params": True} if self.dynamic else {}
        if self.framework == "linen":
            return self.hn.apply({"params": params, **self.frozen}, x, **extra)
        return nnx.merge(self.graphdef, params, self.frozen)(x, **extra)

    def base(self) -> jax.Array:
        if self.framework == "linen":
            return self.frozen["base"]["flat"]
        return (
            self.frozen["base"].get_value()
            if hasattr(self.frozen["base"], "get_value")
            else self.frozen["base"]
        )

    def tree(self, flat):  # noqa: ANN001, ANN201
        return (
            self.generated.unflatten_params(flat)
            if self.framework == "linen"
            else self.hn.unflatten_params(flat)
        )


def perturbed(params):  # noqa: ANN001, ANN201
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    return jax.tree.unflatten(
        tree, [v + 0.05 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys, strict=True)]
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_flax_delta_starts_exactly_at_the_base_and_keeps_it_frozen(
    tmp_path: Path, framework: str, mode: str
) -> None:
    module, path, forward, base = pretrained(tmp_path, framework)
    generated = generate(tmp_path, framework, mode, "--base", str(path))
    text = Path(generated.__file__).read_text()
    assert next(line for line in text.splitlines() if line.startswith("# base:")).endswith(
        path.name
    )
    built = Built(generated, framework, mode, str(path))
    x = inputs()
    expected = base["params"] if framework == "linen" else nnx.state(base, nnx.Param)
    out, flat = built(built.params, x)
    want = forward(expected, x) if framework == "linen" else base(x)
    flat_base = (
        generated.flatten_params(expected)
        if framework == "linen"
        else built.hn.flatten_params(expected)
    )
    np.testing.assert_array_equal(np.asarray(built.base()), np.asarray(flat_base))
    # every generated weight is exactly the base's (dynamic: every sample's); the output is the
    # base model's (dynamic: up to the last bit, as vmapped one-sample products round)
    np.testing.assert_array_equal(
        np.asarray(flat), np.asarray(jnp.broadcast_to(flat_base, flat.shape))
    )
    if mode == "static":
        np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
    else:
        close(out, want, atol=1e-6)
    # the base is no trainable parameter: not in params, so no gradient or optimizer reaches it
    names = [
        ".".join(map(str, p)) for p, _ in jax.tree_util.tree_flatten_with_path(built.params)[0]
    ]
    assert not any("base" in n for n in names), names
    assert sum(v.size for v in jax.tree.leaves(built.params)) < flat_base.size * 3

    def loss(params):  # noqa: ANN001, ANN202
        return jnp.mean((built(params, x)[0] - 1.0) ** 2)

    optimizer = optax.adam(1e-2)
    params, opt_state = built.params, optimizer.init(built.params)
    first = float(loss(params))
    for _ in range(20):  # a training run: the delta learns, the base stays
        grads = jax.grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    assert float(loss(params)) < 0.7 * first
    np.testing.assert_array_equal(np.asarray(built.base()), np.asarray(flat_base))
    assert float(jnp.abs(built(params, x)[1] - flat_base).max()) > 1e-3  # a nonzero delta now


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_flax_dynamic_delta_per_sample_equals_one_sample_calls_and_the_plain_target(
    tmp_path: Path, framework: str
) -> None:
    module, path, forward, base = pretrained(tmp_path, framework)
    built = Built(generate(tmp_path, framework, "dynamic"), framework, "dynamic", None)
    params = perturbed(built.params)  # a nonzero delta per sample
    x = inputs()
    out, flat = built(params, x)
    assert flat.shape[0] == BATCH
    assert float(jnp.abs(flat[0] - flat[1]).max()) > 1e-4  # the samples' weights differ
    for b in range(BATCH):
        one, one_flat = built(params, x[b : b + 1])
        close(one[0], out[b], msg=f"sample {b} alone")
        close(one_flat[0], flat[b], msg=f"sample {b} weights")
        plain = forward(built.tree(flat[b]), x[b : b + 1])  # the plain target with those weights
        close(plain[0], out[b], msg=f"sample {b} plain target")
    assert built.base().shape == (flat.shape[1],)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_flax_delta_base_from_the_target_itself(tmp_path: Path, framework: str) -> None:
    generated = generate(tmp_path, framework, "static")
    x = inputs()
    module, _, forward, base = pretrained(tmp_path, framework)
    if framework == "linen":
        hn = generated.MLPHyperNetwork()
        variables = hn.init(jax.random.key(0), x)
        own = generated.unflatten_params(variables["base"]["flat"])
        np.testing.assert_array_equal(
            np.asarray(hn.apply(variables, x)[0]), np.asarray(forward(own, x))
        )
    else:
        hn = generated.NnxMlpHyperNetwork(base, rngs=nnx.Rngs(0))  # a live, pretrained instance
        np.testing.assert_array_equal(np.asarray(hn(x)[0]), np.asarray(base(x)))


# -- the runtime twins: FlaxHyperNetwork / NNXHyperNetwork(generate="delta") ---------------------


def runtime_twin(framework: str, mode: str, base, target=None):  # noqa: ANN001, ANN201
    """The runtime delta hypernetwork for the MLP target (NNX: ``target``, a live instance)."""
    from hypernn_gen.runtime.flax import FlaxHyperNetwork, NNXHyperNetwork

    if framework == "linen":
        module = import_file(TARGETS_DIR / "linen_mlp.py", "_delta_target_linen")
        return FlaxHyperNetwork(module.MLP(), mode=mode, generate="delta", base=base)
    dim = {"condition_dim": 8} if mode == "dynamic" else {}
    return NNXHyperNetwork(target, mode=mode, generate="delta", base=base, rngs=nnx.Rngs(0), **dim)


class Runtime(Built):
    """:class:`Built` for a runtime hypernetwork (no ``return_params``: nothing is fused)."""

    def __init__(self, hn, framework: str, mode: str) -> None:  # noqa: ANN001
        self.framework, self.dynamic, self.hn = framework, mode == "dynamic", hn
        if framework == "linen":
            variables = hn.init(jax.random.key(0), inputs())
            self.params = variables["params"]
            self.frozen = {k: v for k, v in variables.items() if k != "params"}
        else:
            self.graphdef, self.params, self.frozen = nnx.split(hn, nnx.Param, ...)

    def __call__(self, params, x):  # noqa: ANN001, ANN204
        if self.framework == "linen":
            return self.hn.apply({"params": params, **self.frozen}, x)
        return nnx.merge(self.graphdef, params, self.frozen)(x)

    def tree(self, flat):  # noqa: ANN001, ANN201
        if self.framework == "linen":
            from hypernn_gen.runtime.flax import unflatten_params

            return unflatten_params(self.hn.layout(inputs()), flat)
        return self.hn.unflatten_params(flat)


def equal(actual, expected, msg: str = "") -> None:  # noqa: ANN001
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e), err_msg=msg)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_flax_runtime_delta_equals_the_generated_file_starts_at_the_base_and_freezes_it(
    tmp_path: Path, framework: str, mode: str
) -> None:
    module, path, forward, base = pretrained(tmp_path, framework)
    generated = Built(
        generate(tmp_path, framework, mode, "--base", str(path)), framework, mode, str(path)
    )
    fresh = None if framework == "linen" else module.make_target()  # the file's own factory
    runtime = Runtime(runtime_twin(framework, mode, str(path), fresh), framework, mode)
    # the same variables from the same key / rngs, the base included
    assert jax.tree.structure(runtime.params) == jax.tree.structure(generated.params)
    equal(runtime.params, generated.params, "params")
    equal(runtime.base(), generated.base(), "base")
    x = inputs()
    expected = base["params"] if framework == "linen" else nnx.state(base, nnx.Param)
    flat_base = generated.base()

    # exact start at the base: every weight (every sample's) is the base's; static: its output
    out, flat = runtime(runtime.params, x)
    equal(flat, jnp.broadcast_to(flat_base, flat.shape), "start")
    want = forward(expected, x) if framework == "linen" else base(x)
    if mode == "static":
        equal(out, want, "start: the base model's output")
    else:
        close(out, want, atol=1e-6)

    # a nonzero delta: one compiled function, outputs, weights and gradients equal to the bit
    params = perturbed(runtime.params)

    def results(built):  # noqa: ANN001, ANN202
        def loss(p):  # noqa: ANN001, ANN202
            out, flat = built(p, x)
            return jnp.mean((out - 1.0) ** 2), (out, flat)

        return jax.value_and_grad(loss, has_aux=True)(params)

    ours, theirs = jax.jit(lambda: (results(runtime), results(generated)))()
    equal(ours, theirs, "runtime vs generated: loss, output, weights, gradients")
    assert float(jnp.abs(ours[0][1][1] - flat_base).max()) > 1e-3  # the delta is nonzero

    # the base is no parameter: no gradient, no optimizer state; training leaves it unchanged
    names = [".".join(map(str, p)) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    assert not any("base" in n for n in names), names
    trainable = sum(v.size for v in jax.tree.leaves(runtime.params))
    assert trainable == sum(v.size for v in jax.tree.leaves(generated.params))

    def loss(p):  # noqa: ANN001, ANN202
        return jnp.mean((runtime(p, x)[0] - 1.0) ** 2)

    optimizer = optax.adam(1e-2)
    step = jax.jit(lambda p, s: optimizer.update(jax.grad(loss)(p), s, p))
    first, trained, state = float(loss(runtime.params)), runtime.params, optimizer.init(params)
    for _ in range(10):  # a training run: the delta learns
        updates, state = step(trained, state)
        trained = optax.apply_updates(trained, updates)
    assert float(loss(trained)) < 0.8 * first
    equal(runtime.base(), flat_base, "the base after training")

    if mode == "dynamic":  # the batch equals one-sample calls and the plain target per sample
        out, flat = jax.jit(runtime)(params, x)
        assert float(jnp.abs(flat[0] - flat[1]).max()) > 1e-4
        for b in range(BATCH):
            one, one_flat = runtime(params, x[b : b + 1])
            close(one[0], out[b], msg=f"sample {b} alone")
            close(one_flat[0], flat[b], msg=f"sample {b} weights")
            close(forward(runtime.tree(flat[b]), x[b : b + 1])[0], out[b], msg=f"plain {b}")


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_flax_runtime_delta_base_from_the_target_itself(tmp_path: Path, framework: str) -> None:
    module, _, forward, base = pretrained(tmp_path, framework)
    runtime = Runtime(runtime_twin(framework, "static", None, base), framework, "static")
    out, flat = runtime(runtime.params, inputs())
    if framework == "linen":  # the target's own init, as the generated file's from the same key
        generated = Built(generate(tmp_path, framework, "static"), framework, "static", None)
        # two inits from the same key, one traced in each module: XLA's rounding of the scaled
        # normal draw can differ by 1 ulp between them (seen under pytest -n 2), not more
        close(runtime.base(), generated.base(), atol=1e-6, msg="the own base")
        equal(out, forward(runtime.tree(runtime.base()), inputs()), "start")
    else:  # the live (pretrained) instance's current values
        equal(runtime.base(), runtime.hn.flatten_params(base), "the own base")
        equal(out, base(inputs()), "start")


def test_flax_runtime_delta_refuses_bad_keywords(tmp_path: Path) -> None:
    """Each bad keyword: a HyperNetworkError naming it and the fix (Linen: at init)."""
    from hypernn_gen.errors import HyperNetworkError
    from hypernn_gen.runtime.flax import FlaxHyperNetwork, NNXHyperNetwork

    _, path, _, model = pretrained(tmp_path, "nnx")
    linen = import_file(TARGETS_DIR / "linen_mlp.py", "_delta_target_linen").MLP()
    bad = tmp_path / "other.msgpack"
    bad.write_bytes(serialization.msgpack_serialize({"hidden1": {"bias": np.zeros(3)}}))
    cases = [
        ({"generate": "lora"}, r'generate="lora" has its own classes.*NNXLoRAHyperNetwork'),
        ({"generate": "both"}, r"generate must be 'weights' or 'delta', got 'both'"),
        ({"base": str(path)}, r'base= applies to generate="delta" only'),
        ({"generate": "delta", "base": str(tmp_path / "no.msgpack")}, r"is not a file"),
    ]
    for kwargs, message in cases:
        with pytest.raises(HyperNetworkError, match=message):
            NNXHyperNetwork(model, rngs=nnx.Rngs(0), **kwargs)
        with pytest.raises(HyperNetworkError, match=message):
            FlaxHyperNetwork(linen, **kwargs).init(jax.random.key(0), inputs())
    custom = "drop weight_generator_constructor"
    with pytest.raises(HyperNetworkError, match=custom):
        NNXHyperNetwork(
            model,
            weight_generator_constructor=lambda d, h, rngs: None,
            generate="delta",
            rngs=nnx.Rngs(0),
        )
    with pytest.raises(HyperNetworkError, match=custom):
        FlaxHyperNetwork(
            linen, weight_generator_constructor=lambda d, h: None, generate="delta"
        ).init(jax.random.key(0), inputs())
    with pytest.raises(HyperNetworkError, match=r"'hidden1.bias' has shape \(3,\), the target's"):
        NNXHyperNetwork(model, generate="delta", base=str(bad), rngs=nnx.Rngs(0))
    with pytest.raises(HyperNetworkError, match=r"the base checkpoint has no 'Dense_0.bias'"):
        FlaxHyperNetwork(linen, generate="delta", base=str(bad)).init(jax.random.key(0), inputs())
