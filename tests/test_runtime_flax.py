"""Flax runtime hypernetworks (Linen and NNX) and the Flax tracer.

Every check compares against an independent computation: the plain target run with the same
weights, a per-sample loop, ``jax.eval_shape``/``nnx.state`` listings.
"""

from __future__ import annotations

import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hypernn_gen.errors import HyperNetworkError, TraceError
from hypernn_gen.runtime.flax import (
    FlaxEmbeddingModule,
    FlaxHyperNetwork,
    FlaxWeightGenerator,
    GeneratedSlot,
    NNXEmbeddingModule,
    NNXHyperNetwork,
    NNXWeightGenerator,
    flatten_params,
    unflatten_params,
)
from hypernn_gen.trace_flax import trace_linen, trace_nnx_factory, trace_nnx_module

B = 5
X_MLP = jax.random.normal(jax.random.key(1), (B, 8))
X_CNN = jax.random.normal(jax.random.key(2), (B, 6, 6, 1))
TOL = dict(rtol=1e-5, atol=1e-5)


def size(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


# -- targets ------------------------------------------------------------------------------------


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(256)(x))
        x = jnp.tanh(nn.Dense(256)(x))
        return nn.Dense(4, use_bias=False)(x)


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


class NNXMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(8, 256, rngs=rngs), nnx.Linear(256, 256, rngs=rngs)])
        self.out = nnx.Linear(256, 4, use_bias=False, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = jnp.tanh(layer(x))
        return self.out(x)


class NNXCNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(6 * 6 * 4, 3, rngs=rngs)

    def __call__(self, x):
        x = self.dropout(nnx.relu(self.bn(self.conv(x))))
        return self.head(x.reshape(x.shape[0], -1))


def nnx_mlp() -> NNXMLP:
    return NNXMLP(nnx.Rngs(0))


def nnx_cnn() -> NNXCNN:
    return NNXCNN(nnx.Rngs(0, dropout=1))


def with_params(target: nnx.Module, tree: dict) -> nnx.Module:
    """A copy of an NNX target with its Params replaced by ``tree`` (the reference run)."""
    graphdef, params, rest = nnx.split(nnx.clone(target), nnx.Param, ...)
    flat = [(p, v.copy(_get(tree, p))) for p, v in nnx.to_flat_state(params)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def linen_setup(target, x, mode="static", **kw):
    hn = FlaxHyperNetwork(target, mode=mode, **kw)
    return hn, jax.jit(hn.init)(jax.random.key(0), x), hn.layout(x)  # one compile, not per op


# -- tracer -------------------------------------------------------------------------------------


def test_trace_linen_matches_eval_shape():
    x = jax.ShapeDtypeStruct(X_CNN.shape, X_CNN.dtype)
    layout = trace_linen(LinenCNN(), (x,), init_kwargs={"train": False})
    shapes = jax.eval_shape(LinenCNN().init, jax.random.key(0), X_CNN)
    expected = [
        (col, tuple(k.key for k in path), leaf.shape)
        for col in ["params", *sorted(c for c in shapes if c != "params")]
        for path, leaf in jax.tree.flatten_with_path(shapes[col])[0]
    ]
    assert [(t.collection, t.keys, t.shape) for t in layout.tensors] == expected
    assert [t.generated for t in layout.tensors] == [col == "params" for col, _, _ in expected]
    assert {t.reason for t in layout.state} == {"collection"}
    offset = 0
    for t in layout.generated:
        assert t.offset == offset
        offset = t.end
    assert layout.flat_size == offset == size(shapes["params"])
    kernel = layout.find("Conv_0.kernel")
    # Flax's own fans for a (3, 3, 1, 4) kernel (variance_scaling: receptive field 9)
    fans = jax.nn.initializers.variance_scaling(1.0, "fan_out", "normal")
    assert kernel.shape == (3, 3, 1, 4) and (kernel.fan_in, kernel.fan_out) == (9, 36)
    draw = fans(jax.random.key(0), (3, 3, 64, 64))  # std sqrt(1 / fan_out) = 1/24
    assert float(draw.std()) == pytest.approx(1 / 24, rel=0.05)
    assert kernel.init_source == "measured" and kernel.init_std == pytest.approx(1 / 3, rel=0.2)
    assert layout.find("BatchNorm_0.scale").init_mean == 1.0
    assert layout.find("Dense_0.bias").init_std == 0.0
    assert layout.framework == "linen" and layout.target_name == "LinenCNN"


def test_trace_nnx_matches_state_listing():
    layout = trace_nnx_factory(nnx_cnn)
    target = nnx_cnn()
    flat = list(nnx.to_flat_state(nnx.state(target)))
    listed = [(tuple(p), type(v).__name__, v.get_value().shape) for p, v in flat]
    assert [(t.keys, t.collection, t.shape) for t in layout.tensors] == listed
    assert {t.collection for t in layout.state} == {"BatchStat", "RngKey", "RngCount"}
    assert layout.flat_size == size(nnx.state(target, nnx.Param))
    live = trace_nnx_module(target)
    assert live.digest() == layout.digest()
    for a, b in zip(live.tensors, layout.tensors, strict=True):
        assert a.init_std == pytest.approx(b.init_std, rel=1e-4, abs=1e-6)
    mlp = trace_nnx_factory(nnx_mlp)
    assert mlp.generated[0].keys == ("layers", 0, "bias")  # list indices stay int
    assert mlp.find("layers.1.kernel").fan_in == 256
    assert mlp.framework == "nnx"


def test_trace_include_and_errors():
    layout = trace_linen(LinenMLP(), (X_MLP,), include=lambda p: not p.startswith("Dense_2"))
    assert layout.find("Dense_2.kernel").reason == "excluded"

    class NoParams(nn.Module):
        def __call__(self, x):
            return x

    with pytest.raises(TraceError, match="no floating-point parameters"):
        trace_linen(NoParams(), (X_MLP,))

    class IntParam(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.zeros(3, jnp.float32))
            self.n = nnx.Param(jnp.zeros(3, jnp.int32))

    with pytest.raises(TraceError, match="int32"):
        trace_nnx_module(IntParam())


# -- Linen --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def linen_mlp():
    return linen_setup(LinenMLP(), X_MLP)


@pytest.fixture(scope="module")
def linen_cnn():
    return linen_setup(LinenCNN(), X_CNN)


def test_linen_round_trip_and_static(linen_mlp, linen_cnn):
    for (hn, variables, layout), target, x in (
        (linen_mlp, LinenMLP(), X_MLP),
        (linen_cnn, LinenCNN(), X_CNN),
    ):
        own = target.init(jax.random.key(7), x)
        flat = flatten_params(layout, own["params"])
        state = {k: v for k, v in own.items() if k != "params"}
        hn_vars = {**variables, **{k: {"target": v} for k, v in state.items()}}
        out, returned = hn.apply(hn_vars, x, generated_params=flat)
        np.testing.assert_array_equal(out, target.apply(own, x))
        assert returned is flat
        assert jax.tree.all(
            jax.tree.map(jnp.array_equal, unflatten_params(layout, flat), own["params"])
        )

        out, flat = hn.apply(variables, x)
        assert flat.shape == (layout.flat_size,)
        reference = {"params": unflatten_params(layout, flat)}
        # the target's collections sit under "target"; "layout" is the hypernetwork's digest
        reference |= {k: v["target"] for k, v in variables.items() if k not in ("params", "layout")}
        np.testing.assert_array_equal(out, target.apply(reference, x))
    params = linen_mlp[1]["params"]
    assert set(params) == {"embedding_module", "weight_generator", "param_scale", "param_shift"}
    assert params["param_scale"].shape == (len(linen_mlp[2].generated),)


def test_linen_dynamic_per_sample():
    # per-sample BatchNorm statistics (the default, "batch", is in tests/real/test_real_flax.py)
    hn, variables, layout = linen_setup(
        LinenCNN(), X_CNN, mode="dynamic", batch_norm_stats="sample"
    )
    out, flat = jax.jit(hn.apply)(variables, X_CNN)
    assert flat.shape == (B, layout.flat_size) and out.shape == (B, 3)
    assert not jnp.allclose(flat[0], flat[1])
    stats = {"batch_stats": variables["batch_stats"]["target"]}
    # The reference: the plain target on one sample with one weight set (compiled once).
    single = jax.jit(
        lambda flat_b, x_b, train, key: LinenCNN().apply(
            {"params": unflatten_params(layout, flat_b), **stats},
            x_b,
            train=train,
            rngs={"dropout": key},
            mutable=["batch_stats"],
        ),
        static_argnums=2,
    )
    for b in range(B):
        ref, _ = single(flat[b], X_CNN[b : b + 1], False, jax.random.key(b))
        np.testing.assert_allclose(out[b], ref[0], **TOL)

    # Training: each sample updates its own copy of batch_stats; the mean is written back.
    train = jax.jit(
        lambda v, x: hn.apply(
            v, x, train=True, rngs={"dropout": jax.random.key(3)}, mutable=["batch_stats"]
        )
    )
    (_, flat), updates = train(variables, X_CNN)
    per_sample = [
        single(flat[b], X_CNN[b : b + 1], True, jax.random.key(b))[1]["batch_stats"]
        for b in range(B)
    ]
    mean = jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs), 0), *per_sample)
    got = updates["batch_stats"]["target"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), got, mean)
    assert not jax.tree.all(jax.tree.map(jnp.array_equal, got, stats["batch_stats"]))


def test_linen_batch_stats_train_and_eval(linen_cnn):
    hn, variables, layout = linen_cnn
    before = variables["batch_stats"]["target"]
    (_, flat), updates = hn.apply(
        variables, X_CNN, train=True, rngs={"dropout": jax.random.key(3)}, mutable=["batch_stats"]
    )
    after = updates["batch_stats"]["target"]
    assert not jnp.allclose(after["BatchNorm_0"]["mean"], before["BatchNorm_0"]["mean"])
    _, own = LinenCNN().apply(
        {"params": unflatten_params(layout, flat), "batch_stats": before},
        X_CNN,
        train=True,
        rngs={"dropout": jax.random.key(0)},
        mutable=["batch_stats"],
    )
    jax.tree.map(np.testing.assert_array_equal, after, own["batch_stats"])

    # Eval: the collection is not mutable and nothing changes; the output uses the running stats.
    out, flat = hn.apply({**variables, "batch_stats": {"target": after}}, X_CNN)
    ref = LinenCNN().apply({"params": unflatten_params(layout, flat), "batch_stats": after}, X_CNN)
    np.testing.assert_array_equal(out, ref)
    (_, _), kept = hn.apply(
        {**variables, "batch_stats": {"target": after}}, X_CNN, mutable=["batch_stats"]
    )
    jax.tree.map(np.testing.assert_array_equal, kept["batch_stats"]["target"], after)
    # Train mode with a frozen collection fails exactly like the target does.
    with pytest.raises(flax.errors.ModifyScopeVariableError):
        hn.apply(variables, X_CNN, train=True, rngs={"dropout": jax.random.key(3)})


def test_linen_init_scale(linen_mlp):
    hn, variables, layout = linen_mlp
    own = LinenMLP().init(jax.random.key(1), X_MLP)
    x = jax.random.normal(jax.random.key(4), (256, 8))
    out, flat = hn.apply(variables, x)
    generated = unflatten_params(layout, flat)
    for name in ("Dense_0", "Dense_1", "Dense_2"):
        ratio = generated[name]["kernel"].std() / own["params"][name]["kernel"].std()
        assert 0.5 < ratio < 2.0, (name, ratio)
    ratio = out.std() / LinenMLP().apply(own, x).std()
    assert 1 / 3 < ratio < 3, ratio


def test_linen_jit_grad_vmap(linen_mlp):
    hn, variables, _ = linen_mlp
    out, flat = hn.apply(variables, X_MLP)
    jit_out, jit_flat = jax.jit(hn.apply)(variables, X_MLP)
    np.testing.assert_allclose(jit_out, out, **TOL)
    np.testing.assert_allclose(jit_flat, flat, **TOL)

    # Transforms are composed under jit: one compile each instead of one per eager op.
    loss = lambda v: jnp.mean(hn.apply(v, X_MLP)[0] ** 2)  # noqa: E731
    grads = jax.jit(jax.grad(loss))(variables)["params"]
    for part in ("embedding_module", "weight_generator", "param_scale"):
        leaves = jax.tree.leaves(grads[part])
        assert all(jnp.isfinite(g).all() for g in leaves)
        assert any(jnp.abs(g).sum() > 0 for g in leaves), part

    vmapped = jax.jit(jax.vmap(lambda xi: hn.apply(variables, xi[None])[0][0]))(X_MLP)
    np.testing.assert_allclose(vmapped, out, **TOL)


class MLPGenerator(FlaxWeightGenerator):
    """Returns one flat vector (hyper-nn style), not chunks."""

    @nn.compact
    def __call__(self, embedding):
        h = nn.relu(nn.Dense(16)(embedding))
        return nn.Dense(self.hidden_dim)(h).reshape(*embedding.shape[:-2], -1)


class ConstantEmbedding(FlaxEmbeddingModule):
    @nn.compact
    def __call__(self):
        return self.param("table", nn.initializers.ones, (self.num_embeddings, self.embedding_dim))


def test_linen_custom_constructors():
    hn = FlaxHyperNetwork(
        LinenMLP(), ConstantEmbedding, MLPGenerator, embedding_dim=8, num_embeddings=64
    )
    variables = jax.jit(hn.init)(jax.random.key(0), X_MLP)
    assert "table" in variables["params"]["embedding_module"]
    assert "Dense_1" in variables["params"]["weight_generator"]
    out, flat = hn.apply(variables, X_MLP)
    layout = hn.layout(X_MLP)
    ref = LinenMLP().apply({"params": unflatten_params(layout, flat)}, X_MLP)
    np.testing.assert_array_equal(out, ref)

    dyn = FlaxHyperNetwork(LinenMLP(), weight_generator_constructor=MLPGenerator, mode="dynamic")
    variables = jax.jit(dyn.init)(jax.random.key(0), X_MLP)
    out, flat = jax.jit(dyn.apply)(variables, X_MLP)
    assert flat.shape == (B, layout.flat_size)


class WrongEmbedding(FlaxEmbeddingModule):
    @nn.compact
    def __call__(self, *args):
        return jnp.ones((self.num_embeddings, self.embedding_dim + 1))


class ShortGenerator(FlaxWeightGenerator):
    @nn.compact
    def __call__(self, embedding):
        return nn.Dense(self.hidden_dim)(embedding)[:1]


def test_linen_errors(linen_mlp):
    hn, variables, layout = linen_mlp
    key = jax.random.key(0)
    with pytest.raises(HyperNetworkError, match=r"embedding module returned shape .*embedding_dim"):
        FlaxHyperNetwork(LinenMLP(), WrongEmbedding).init(key, X_MLP)
    with pytest.raises(HyperNetworkError, match=r"made \d+ values .* needs \d+"):
        FlaxHyperNetwork(LinenMLP(), weight_generator_constructor=ShortGenerator).init(key, X_MLP)
    with pytest.raises(HyperNetworkError, match="not a flax.linen.Module"):
        FlaxHyperNetwork(LinenMLP(), lambda d, n: object()).init(key, X_MLP)
    with pytest.raises(HyperNetworkError, match=r"generated_params has shape \(3,\)"):
        hn.apply(variables, X_MLP, generated_params=jnp.zeros(3))
    dyn = FlaxHyperNetwork(LinenMLP(), mode="dynamic")
    dyn_vars = jax.jit(dyn.init)(key, X_MLP)
    with pytest.raises(
        HyperNetworkError, match=r"condition batch 3\) but input 0 has batch size 5"
    ):
        dyn.apply(dyn_vars, X_MLP, condition=X_MLP[:3])
    with pytest.raises(HyperNetworkError, match="mode must be"):
        FlaxHyperNetwork(LinenMLP(), mode="both").init(key, X_MLP)

    class IntParam(nn.Module):
        @nn.compact
        def __call__(self, x):
            self.param("n", lambda k: jnp.zeros(3, jnp.int32))
            return nn.Dense(2)(x)

    with pytest.raises(HyperNetworkError, match="int32.*floating-point"):
        FlaxHyperNetwork(IntParam()).init(key, X_MLP)
    with pytest.raises(HyperNetworkError, match="no floating-point parameters"):
        FlaxHyperNetwork(nn.Dropout(0.1, deterministic=True)).init(key, X_MLP)


def test_linen_serialisation(linen_cnn):
    hn, variables, _ = linen_cnn
    (_, _), updates = hn.apply(
        variables, X_CNN, train=True, rngs={"dropout": jax.random.key(3)}, mutable=["batch_stats"]
    )
    trained = {**variables, **updates}
    restored = flax.serialization.from_bytes(variables, flax.serialization.to_bytes(trained))
    jax.tree.map(np.testing.assert_array_equal, restored, trained)
    np.testing.assert_array_equal(hn.apply(restored, X_CNN)[0], hn.apply(trained, X_CNN)[0])


# -- NNX ----------------------------------------------------------------------------------------


def nnx_hn(factory, mode="static", **kw) -> tuple[NNXHyperNetwork, nnx.Module]:
    target = factory()
    x = X_MLP if isinstance(target, NNXMLP) else X_CNN
    kw.setdefault("condition_dim", math.prod(x.shape[1:]))
    return NNXHyperNetwork(target, mode=mode, rngs=nnx.Rngs(0), **kw), target


def test_nnx_round_trip_and_static():
    for factory, x in ((nnx_mlp, X_MLP), (nnx_cnn, X_CNN)):
        hn, target = nnx_hn(factory)
        hn.eval()
        target.eval()
        flat = hn.flatten_params(target)
        out, returned = hn(x, generated_params=flat)
        np.testing.assert_array_equal(out, target(x))
        assert returned is flat

        out, flat = hn(x)
        assert flat.shape == (hn.layout.flat_size,)
        np.testing.assert_array_equal(out, with_params(target, hn.unflatten_params(flat))(x))

    own = size(nnx.state(hn, nnx.Param))
    expected = size(nnx.state(hn.embedding_module, nnx.Param))
    expected += size(nnx.state(hn.weight_generator, nnx.Param)) + 2 * len(hn.layout.generated)
    assert own == expected
    slots = nnx.state(hn, GeneratedSlot)
    assert size(slots) == 0 and len(jax.tree.leaves(slots)) == len(hn.layout.generated)


def test_nnx_dynamic_per_sample():
    # per-sample BatchNorm statistics (the default, "batch", is in tests/real/test_real_flax.py)
    hn, target = nnx_hn(nnx_cnn, mode="dynamic", batch_norm_stats="sample")
    hn.eval()
    target.eval()
    frozen = nnx.to_pure_dict(nnx.state(hn.target, nnx.BatchStat))
    out, flat = hn(X_CNN)
    jax.tree.map(
        np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(hn.target, nnx.BatchStat)), frozen
    )
    assert flat.shape == (B, hn.layout.flat_size) and out.shape == (B, 3)
    assert not jnp.allclose(flat[0], flat[1])
    for b in range(B):
        single = with_params(target, hn.unflatten_params(flat[b]))(X_CNN[b : b + 1])
        np.testing.assert_allclose(out[b], single[0], **TOL)

    hn.train()
    target.train()
    before = hn.target.bn.mean[...]
    _, flat = hn(X_CNN)
    means = [
        (m := with_params(target, hn.unflatten_params(flat[b])), m(X_CNN[b : b + 1]))[0].bn.mean[
            ...
        ]
        for b in range(B)
    ]
    np.testing.assert_allclose(hn.target.bn.mean[...], jnp.mean(jnp.stack(means), 0), **TOL)
    assert not jnp.allclose(hn.target.bn.mean[...], before)
    assert int(hn.target.dropout.rngs.count[...]) == 1  # the per-sample streams advanced once


def test_nnx_batch_stats_train_and_eval():
    hn, target = nnx_hn(nnx_cnn)
    before = hn.target.bn.mean[...]
    _, flat = hn(X_CNN)  # modules start in training mode
    after = hn.target.bn.mean[...]
    assert not jnp.allclose(after, before)
    reference = with_params(target, hn.unflatten_params(flat))
    reference(X_CNN)
    np.testing.assert_array_equal(after, reference.bn.mean[...])
    np.testing.assert_array_equal(hn.target.bn.var[...], reference.bn.var[...])
    np.testing.assert_array_equal(target.bn.mean[...], before)  # the original is untouched

    hn.eval()
    assert hn.target.bn.use_running_average and hn.target.dropout.deterministic
    out, flat = hn(X_CNN)
    np.testing.assert_array_equal(hn.target.bn.mean[...], after)
    reference.eval()
    np.testing.assert_array_equal(out, reference(X_CNN))


def test_nnx_init_scale():
    hn, target = nnx_hn(nnx_mlp)
    x = jax.random.normal(jax.random.key(4), (256, 8))
    out, flat = hn(x)
    generated = hn.unflatten_params(flat)
    own = nnx.to_pure_dict(nnx.state(target, nnx.Param))
    for path in (("layers", 0), ("layers", 1), ("out",)):
        ratio = _get(generated, path)["kernel"].std() / _get(own, path)["kernel"].std()
        assert 0.5 < ratio < 2.0, (path, ratio)
    ratio = out.std() / target(x).std()
    assert 1 / 3 < ratio < 3, ratio


def test_nnx_transforms():
    hn, _ = nnx_hn(nnx_cnn)
    hn.eval()
    out, flat = hn(X_CNN)

    @nnx.jit
    def forward(model, x):
        return model(x)

    np.testing.assert_allclose(forward(hn, X_CNN)[0], out, **TOL)

    def loss(model, x):
        return jnp.mean(model(x)[0] ** 2)

    grads = nnx.jit(nnx.grad(loss))(hn, X_CNN)
    for part in (grads["embedding_module"], grads["weight_generator"], grads["param_scale"]):
        leaves = jax.tree.leaves(part)
        assert all(jnp.isfinite(g).all() for g in leaves)
        assert any(jnp.abs(g).sum() > 0 for g in leaves)
    assert "target" not in grads

    # Plain JAX over split state; training mode writes the new batch stats into the state.
    hn.train()
    graphdef, params, rest = nnx.split(hn, nnx.Param, ...)

    def pure_loss(params, rest, x):
        model = nnx.merge(graphdef, params, rest, copy=True)  # as for any NNX model
        value = jnp.mean(model(x)[0] ** 2)
        return value, nnx.state(model, nnx.Not(nnx.Param))

    (value, new_rest), pure_grads = jax.jit(jax.value_and_grad(pure_loss, has_aux=True))(
        params, rest, X_CNN
    )
    assert jnp.isfinite(value)
    assert any(jnp.abs(g).sum() > 0 for g in jax.tree.leaves(pure_grads["weight_generator"]))
    assert not jnp.allclose(
        new_rest["target"]["bn"]["mean"][...], rest["target"]["bn"]["mean"][...]
    )

    hn.eval()
    graphdef, state = nnx.split(hn)
    apply = jax.vmap(lambda s, xi: nnx.merge(graphdef, s)(xi[None])[0][0], in_axes=(None, 0))
    np.testing.assert_allclose(jax.jit(apply)(state, X_CNN), out, **TOL)


class NNXMLPGenerator(NNXWeightGenerator):
    def __init__(self, embedding_dim, hidden_dim, *, rngs):
        super().__init__(embedding_dim, hidden_dim)
        self.hidden = nnx.Linear(embedding_dim, 16, rngs=rngs)
        self.out = nnx.Linear(16, hidden_dim, rngs=rngs)

    def __call__(self, embedding):
        return self.out(nnx.relu(self.hidden(embedding))).reshape(*embedding.shape[:-2], -1)


class NNXConstantEmbedding(NNXEmbeddingModule):
    def __init__(self, embedding_dim, num_embeddings, *, rngs):
        super().__init__(embedding_dim, num_embeddings)
        self.table = nnx.Param(jnp.ones((num_embeddings, embedding_dim)))

    def __call__(self):
        return self.table[...]


def test_nnx_custom_constructors():
    target = nnx_mlp()
    hn = NNXHyperNetwork(target, NNXConstantEmbedding, NNXMLPGenerator, 8, 64, rngs=nnx.Rngs(0))
    assert hn.num_embeddings == 64 and hn.embedding_module.table.shape == (64, 8)
    out, flat = hn(X_MLP)
    np.testing.assert_array_equal(out, with_params(target, hn.unflatten_params(flat))(X_MLP))
    dyn, _ = nnx_hn(nnx_mlp, mode="dynamic", weight_generator_constructor=NNXMLPGenerator)
    assert nnx.jit(lambda m, x: m(x))(dyn, X_MLP)[1].shape == (B, hn.layout.flat_size)


class NNXWrongEmbedding(NNXEmbeddingModule):
    def __call__(self, *args):
        return jnp.ones((self.num_embeddings, self.embedding_dim + 1))


class NNXShortGenerator(NNXWeightGenerator):
    def __call__(self, embedding):
        return embedding[:1]


def test_nnx_errors():
    rngs = nnx.Rngs(0)
    with pytest.raises(HyperNetworkError, match=r"embedding module returned shape .*embedding_dim"):
        NNXHyperNetwork(nnx_mlp(), NNXWrongEmbedding, rngs=rngs)(X_MLP)
    with pytest.raises(HyperNetworkError, match=r"made \d+ values .* needs \d+"):
        NNXHyperNetwork(nnx_mlp(), weight_generator_constructor=NNXShortGenerator, rngs=rngs)(X_MLP)
    with pytest.raises(HyperNetworkError, match="not an nnx.Module"):
        NNXHyperNetwork(nnx_mlp(), lambda d, n, rngs: object(), rngs=rngs)
    with pytest.raises(HyperNetworkError, match="needs condition_dim"):
        NNXHyperNetwork(nnx_mlp(), mode="dynamic", rngs=rngs)
    hn, _ = nnx_hn(nnx_mlp)
    with pytest.raises(HyperNetworkError, match=r"generated_params has shape \(3,\)"):
        hn(X_MLP, generated_params=jnp.zeros(3))
    dyn, _ = nnx_hn(nnx_mlp, mode="dynamic")
    with pytest.raises(
        HyperNetworkError, match=r"condition batch 3\) but input 0 has batch size 5"
    ):
        dyn(X_MLP, condition=X_MLP[:3])

    class IntParam(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.zeros(3, jnp.float32))
            self.n = nnx.Param(jnp.zeros(3, jnp.complex64))

    with pytest.raises(HyperNetworkError, match="complex64.*floating-point"):
        NNXHyperNetwork(IntParam(), rngs=rngs)
    with pytest.raises(HyperNetworkError, match="no floating-point parameters"):
        NNXHyperNetwork(nnx.Dropout(0.1), rngs=rngs)


def test_nnx_serialisation():
    hn, _ = nnx_hn(nnx_cnn)
    hn(X_CNN)  # a training step moves the batch stats
    hn.eval()
    state = nnx.state(hn, nnx.Not(nnx.RngKey))  # typed rng keys need jax.random.key_data
    blob = flax.serialization.to_bytes(nnx.to_pure_dict(state))

    fresh, _ = nnx_hn(nnx_cnn)
    fresh.eval()
    fresh_state = nnx.state(fresh, nnx.Not(nnx.RngKey))
    pure = flax.serialization.from_bytes(nnx.to_pure_dict(fresh_state), blob)
    nnx.replace_by_pure_dict(fresh_state, pure)
    nnx.update(fresh, fresh_state)
    np.testing.assert_array_equal(fresh.target.bn.mean[...], hn.target.bn.mean[...])
    np.testing.assert_array_equal(fresh(X_CNN)[0], hn(X_CNN)[0])


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="head")(jnp.tanh(nn.Dense(3, name="body")(x)))


class NNXTied(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.first = nnx.Linear(8, 8, rngs=rngs)
        self.second = self.first  # the same Linear twice: generated once
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.second(jnp.tanh(self.first(x)))))


def test_include_tied_and_dynamic_jit():
    keep_head = lambda path: not path.startswith("head")  # noqa: E731
    hn = FlaxHyperNetwork(Tiny(), include=keep_head, mode="dynamic")
    variables = jax.jit(hn.init)(jax.random.key(0), X_MLP)
    head = variables["params"]["target"]["head"]
    assert head["kernel"].shape == (3, 2)
    out, flat = jax.jit(hn.apply)(variables, X_MLP)
    layout = hn.layout(X_MLP)
    assert flat.shape == (B, layout.flat_size) and layout.num_generated == 8 * 3 + 3
    single = jax.jit(
        lambda f, x: Tiny().apply({"params": {**unflatten_params(layout, f), "head": head}}, x)
    )
    for b in range(B):
        np.testing.assert_allclose(out[b], single(flat[b], X_MLP[b : b + 1])[0], **TOL)
    grads = jax.jit(jax.grad(lambda v: hn.apply(v, X_MLP)[0].sum()))(variables)
    assert jnp.abs(grads["params"]["target"]["head"]["kernel"]).sum() > 0

    target = NNXTied(nnx.Rngs(0))
    hn = NNXHyperNetwork(target, include=keep_head, rngs=nnx.Rngs(0))
    assert [t.path for t in hn.layout.generated] == ["first.bias", "first.kernel"]
    assert hn.target.first is hn.target.second and isinstance(hn.target.head.kernel, nnx.Param)
    out, _ = hn(X_MLP, generated_params=hn.flatten_params(target))
    np.testing.assert_array_equal(out, target(X_MLP))
    grads = nnx.jit(nnx.grad(lambda m, x: m(x)[0].sum()))(hn, X_MLP)
    assert jnp.abs(grads["target"]["head"]["kernel"][...]).sum() > 0
    assert jnp.abs(grads["weight_generator"]["linear"]["kernel"][...]).sum() > 0


class LinenMaskedNorm(nn.Module):
    @nn.compact
    def __call__(self, x, mask, train: bool = False):
        return nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x), mask=mask)


class NNXMaskedNorm(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(3, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x, mask):
        return self.bn(self.dense(x), mask=mask)


def test_batch_norm_with_a_mask_in_batch_statistics_is_refused():
    """BatchNorm(mask=) in training with statistics over the batch (the default): Flax would
    average the samples' own masked means, not the plain target's masked mean over the batch,
    so both runtimes refuse with one line; running statistics and per-sample statistics run."""
    x = jax.random.normal(jax.random.key(5), (B, 6, 3))
    mask = jnp.arange(6)[None, :, None] < jnp.array([1, 2, 3, 5, 6])[:, None, None]
    dynamic = dict(mode="dynamic", rngs=nnx.Rngs(0), condition_dim=18)
    refusal = (
        r"^BatchNorm \S+ is called with a mask: .* generate with --batch-norm-stats sample(\n|$)"
    )

    hn = NNXHyperNetwork(NNXMaskedNorm(nnx.Rngs(0)), **dynamic)
    with pytest.raises(ValueError, match=refusal.replace(r"\S+", "bn")):
        hn(x, mask=mask)  # modules start in training mode
    hn.eval()
    out, flat = hn(x, mask=mask)
    target = with_params(NNXMaskedNorm(nnx.Rngs(0)), hn.unflatten_params(flat[1]))
    target.eval()
    np.testing.assert_allclose(out[1], target(x[1:2], mask=mask[1:2])[0], **TOL)
    hn = NNXHyperNetwork(NNXMaskedNorm(nnx.Rngs(0)), **dynamic, batch_norm_stats="sample")
    out, flat = hn(x, mask=mask)
    target = with_params(NNXMaskedNorm(nnx.Rngs(0)), hn.unflatten_params(flat[2]))
    np.testing.assert_allclose(out[2], target(x[2:3], mask=mask[2:3])[0], **TOL)

    hn = FlaxHyperNetwork(LinenMaskedNorm(), mode="dynamic")
    variables = hn.init(jax.random.key(0), x, mask)
    with pytest.raises(ValueError, match=refusal.replace(r"\S+", "BatchNorm_0")):
        hn.apply(variables, x, mask, train=True, mutable=["batch_stats"])
    out, flat = hn.apply(variables, x, mask)  # running statistics
    stats = {"batch_stats": variables["batch_stats"]["target"]}
    params = {"params": unflatten_params(hn.layout(x, mask), flat[3]), **stats}
    np.testing.assert_allclose(out[3], LinenMaskedNorm().apply(params, x[3:4], mask[3:4])[0], **TOL)
