"""hypernn_gen/kernel/flax.py: each function against a plain NumPy computation, and the kernel
section of every committed Linen/NNX file against the kernel's own source (a verbatim copy)."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hypernn_gen.extract import KERNEL_BEGIN, KERNEL_END, kernel_source
from hypernn_gen.generate import flax_kernel_roots, flax_scaling_roots
from hypernn_gen.kernel import flax as fk

REPO = Path(__file__).resolve().parents[1]
KERNEL_DIR = REPO / "hypernn_gen" / "kernel"
# Weight-generating files; the adapter files carry the LoRA kernels (tests/test_lora_flax.py).
FLAX_FILES = sorted(
    path
    for path in [
        *(REPO / "generated_examples").glob("*linen*.py"),
        *(REPO / "generated_examples").glob("*nnx*.py"),
        REPO / "examples" / "digits" / "digits_linen_static.py",
        REPO / "examples" / "digits" / "digits_nnx_static.py",
    ]
    if "_lora_" not in path.name and "_delta_" not in path.name
)


class Slice(NamedTuple):
    keys: tuple[str, ...]
    shape: tuple[int, ...]
    offset: int
    size: int
    dtype: str = "float32"


# Three tensors with gaps between them (chunking="tensor") and after the last one.
TENSORS = (
    Slice(("a", "kernel"), (2, 3), 0, 6),
    Slice(("a", "bias"), (3,), 8, 3),
    Slice(("b",), (4,), 12, 4, "bfloat16"),
)
FLAT_SIZE = 20


def test_concat_flat_puts_zeros_in_the_gaps() -> None:
    rng = np.random.default_rng(0)
    pieces = [rng.normal(size=(2, t.size)).astype(np.float32) for t in TENSORS]
    expected = np.zeros((2, FLAT_SIZE), np.float32)
    for t, piece in zip(TENSORS, pieces, strict=True):
        expected[:, t.offset : t.offset + t.size] = piece
    got = fk.concat_flat([jnp.asarray(p) for p in pieces], [t.offset for t in TENSORS], FLAT_SIZE)
    np.testing.assert_array_equal(np.asarray(got), expected)
    # no gaps: the plain concatenation
    tight = fk.concat_flat([jnp.ones((3,)), jnp.zeros((2,))], [0, 3], 5)
    np.testing.assert_array_equal(np.asarray(tight), [1, 1, 1, 0, 0])


def test_decode_is_an_affine_map_per_tensor() -> None:
    rng = np.random.default_rng(1)
    raw = rng.normal(size=(3, FLAT_SIZE)).astype(np.float32)
    scale = rng.normal(size=len(TENSORS)).astype(np.float32)
    shift = rng.normal(size=len(TENSORS)).astype(np.float32)
    expected = np.zeros_like(raw)
    for i, t in enumerate(TENSORS):
        span = slice(t.offset, t.offset + t.size)
        expected[:, span] = shift[i] + scale[i] * raw[:, span]
    got = fk.decode(jnp.asarray(raw), jnp.asarray(scale), jnp.asarray(shift), TENSORS, FLAT_SIZE)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)
    jitted = jax.jit(lambda r, a, b: fk.decode(r, a, b, TENSORS, FLAT_SIZE))
    np.testing.assert_allclose(
        np.asarray(jitted(raw, scale, shift)), expected, rtol=1e-6, atol=1e-6
    )


def test_decode_with_gradient_scaling_divides_the_decoder_gradients_by_size() -> None:
    """The same values exactly; the gradients of scale and shift of tensor t over size(t), the
    gradient of raw unchanged (the plain decode's, by autodiff)."""
    rng = np.random.default_rng(2)
    raw = jnp.asarray(rng.normal(size=(FLAT_SIZE,)).astype(np.float32))
    scale = jnp.asarray(rng.normal(size=len(TENSORS)).astype(np.float32))
    shift = jnp.asarray(rng.normal(size=len(TENSORS)).astype(np.float32))
    weights = jnp.asarray(rng.normal(size=(FLAT_SIZE,)).astype(np.float32))

    def loss(r: jax.Array, a: jax.Array, b: jax.Array, multipliers: tuple | None) -> jax.Array:
        return jnp.sum(weights * fk.decode(r, a, b, TENSORS, FLAT_SIZE, multipliers))

    plain, scaled = (fk.decode(raw, scale, shift, TENSORS, FLAT_SIZE, m) for m in (None, (2, 3, 4)))
    np.testing.assert_array_equal(np.asarray(scaled), np.asarray(plain))
    g_plain = jax.grad(loss, argnums=(0, 1, 2))(raw, scale, shift, None)
    g_scaled = jax.grad(loss, argnums=(0, 1, 2))(raw, scale, shift, (2.0, 3.0, 4.0))
    sizes = np.asarray([t.size for t in TENSORS], np.float32)
    np.testing.assert_array_equal(np.asarray(g_scaled[0]), np.asarray(g_plain[0]))
    for got, expected in zip(g_scaled[1:], g_plain[1:], strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected) / sizes, rtol=1e-6)


def test_scaled_dense_is_dense_with_multiplied_gradients() -> None:
    """ScaledDense (Linen) and ScaledLinear (NNX): nn.Dense's/nnx.Linear's parameters and
    outputs exactly, gradients times the multipliers; scale_grad's value is its input."""
    import flax.linen as nn
    from flax import nnx

    from hypernn_gen.kernel.linen import ScaledDense
    from hypernn_gen.kernel.nnx import ScaledLinear

    x = jax.random.normal(jax.random.key(0), (2, 5, 3))
    dense, scaled = (
        nn.Dense(4),
        ScaledDense(4, (0.5, 3.0), kernel_init=nn.initializers.lecun_normal()),
    )
    variables = dense.init(jax.random.key(1), x)
    np.testing.assert_array_equal(
        np.asarray(scaled.init(jax.random.key(1), x)["params"]["kernel"]),
        np.asarray(variables["params"]["kernel"]),
    )
    np.testing.assert_array_equal(
        np.asarray(scaled.apply(variables, x)), np.asarray(dense.apply(variables, x))
    )
    grads = [
        jax.grad(lambda v, m=m: jnp.sum(m.apply(v, x) ** 2))(variables) for m in (dense, scaled)
    ]
    for key, factor in (("kernel", 0.5), ("bias", 3.0)):
        np.testing.assert_allclose(
            np.asarray(grads[1]["params"][key]),
            factor * np.asarray(grads[0]["params"][key]),
            rtol=1e-6,
        )
    plain, ours = nnx.Linear(3, 4, rngs=nnx.Rngs(0)), ScaledLinear(3, 4, rngs=nnx.Rngs(0))
    ours.gradient_scale = (0.25, 2.0)
    np.testing.assert_array_equal(np.asarray(ours(x)), np.asarray(plain(x)))
    g = [nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m) for m in (plain, ours)]
    np.testing.assert_allclose(
        np.asarray(g[1]["kernel"][...]), 0.25 * np.asarray(g[0]["kernel"][...]), rtol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(g[1]["bias"][...]), 2.0 * np.asarray(g[0]["bias"][...]), rtol=1e-6
    )
    assert fk.scale_grad(x, None) is x
    np.testing.assert_array_equal(np.asarray(fk.scale_grad(x, 7.0)), np.asarray(x))


def test_unflatten_keeps_batch_dims_and_casts() -> None:
    flat = np.arange(2 * FLAT_SIZE, dtype=np.float32).reshape(2, FLAT_SIZE)
    tree = fk.unflatten(jnp.asarray(flat), TENSORS)
    assert set(tree) == {"a", "b"} and set(tree["a"]) == {"kernel", "bias"}
    np.testing.assert_array_equal(np.asarray(tree["a"]["kernel"]), flat[:, 0:6].reshape(2, 2, 3))
    np.testing.assert_array_equal(np.asarray(tree["a"]["bias"]), flat[:, 8:11])
    assert tree["b"].dtype == jnp.bfloat16 and tree["b"].shape == (2, 4)
    np.testing.assert_array_equal(np.asarray(tree["b"].astype(jnp.float32)), flat[:, 12:16])


def test_check_flat_names_the_expected_shape() -> None:
    fk.check_flat(jnp.zeros((FLAT_SIZE,)), FLAT_SIZE, dynamic=False)
    fk.check_flat(jnp.zeros((4, FLAT_SIZE)), FLAT_SIZE, dynamic=True)
    with pytest.raises(ValueError, match=r"generated_params has shape \(3,\), expected \(20,\)"):
        fk.check_flat(jnp.zeros((3,)), FLAT_SIZE, dynamic=False)
    with pytest.raises(KeyError, match=r"shape \(20,\), expected \(batch, 20\)"):
        fk.check_flat(jnp.zeros((FLAT_SIZE,)), FLAT_SIZE, dynamic=True, error=KeyError)


def test_check_batch_and_is_array() -> None:
    assert fk.is_array(np.zeros(2)) and fk.is_array(jnp.zeros(2)) and not fk.is_array([1.0])
    fk.check_batch((jnp.zeros((3, 2)), "not an array", np.zeros((3,))), 3)
    with pytest.raises(ValueError, match=r"made 3 weight sets .* input 1 has batch size 5"):
        fk.check_batch((jnp.zeros((3, 2)), jnp.zeros((5, 2))), 3)
    with pytest.raises(ValueError, match=r"input 0 has batch size none \(a scalar\)"):
        fk.check_batch((jnp.float32(1.0),), 3)


def test_per_sample_merge_and_squeeze() -> None:
    x = jnp.arange(6.0).reshape(2, 3)
    copies = fk.per_sample(x, 4)
    np.testing.assert_array_equal(np.asarray(copies), np.broadcast_to(np.asarray(x), (4, 2, 3)))
    keys = fk.per_sample(jax.random.key(0), 3)
    data = np.asarray(jax.random.key_data(keys))
    assert keys.shape == (3,) and len({tuple(row) for row in data}) == 3  # independent keys
    # floats: old + mean(new - old); unchanged copies give old back exactly
    new = copies + jnp.arange(4.0)[:, None, None]
    np.testing.assert_allclose(np.asarray(fk.merge_samples(x, new)), np.asarray(x) + 1.5)
    np.testing.assert_array_equal(np.asarray(fk.merge_samples(x, copies)), np.asarray(x))
    key = jax.random.key(1)
    assert fk.merge_samples(key, fk.per_sample(key, 3)) is key
    counts = jnp.array([7, 8, 9])[:, None] + jnp.zeros((3, 2), jnp.int32)
    np.testing.assert_array_equal(
        np.asarray(fk.merge_samples(jnp.zeros(2, jnp.int32), counts)), [7, 7]
    )
    out = fk.squeeze_sample({"y": jnp.ones((1, 5)), "n": 3, "z": jnp.ones((2, 5))})
    assert out["y"].shape == (5,) and out["n"] == 3 and out["z"].shape == (2, 5)


def test_model_mesh_checks_the_axis() -> None:
    assert fk.model_mesh("model", 7) is None  # no mesh set
    devices = np.array(jax.devices()[:1])
    auto = jax.sharding.Mesh(devices, ("model",))
    with jax.set_mesh(auto):
        assert fk.model_mesh("model", 7) is not None
        x = jnp.arange(12.0).reshape(3, 4)
        np.testing.assert_array_equal(np.asarray(fk.split_chunks(x, "model")), np.asarray(x))
        with pytest.raises(RuntimeError, match=r"the mesh has no axis 'data'"):
            fk.model_mesh("data", 7, RuntimeError)
    explicit = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(explicit):
        with pytest.raises(ValueError, match=r"mesh axis 'model' is not of type Auto"):
            fk.model_mesh("model", 7)


def _section(text: str) -> str:
    assert text.count(KERNEL_BEGIN) == 1 and text.count(KERNEL_END) == 1
    return text[text.index(KERNEL_BEGIN) : text.index(KERNEL_END)]


def _definitions(source: str) -> dict[str, str]:
    lines = source.splitlines()
    tree = ast.parse(source)
    return {
        node.name: "\n".join(lines[node.lineno - 1 : node.end_lineno])
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.ClassDef)
    }


@pytest.mark.parametrize("path", FLAX_FILES, ids=lambda p: p.name)
def test_generated_kernel_section_is_a_verbatim_copy(path: Path) -> None:
    text = path.read_text()
    section = _section(text)
    framework = "nnx" if "from flax import nnx" in text else "linen"
    dynamic = "a dynamic hypernetwork" in text.splitlines()[0]
    fused, excluded = "\nFUSED: " in text, "\nEXCLUDED: " in text
    roots = flax_kernel_roots(framework, dynamic, fused, excluded, "\nLOW_RANK: " in text)
    if "\nGRADIENT_SCALE = " in text:
        roots += flax_scaling_roots(framework, "\nGENERATOR_HIDDEN = " in text)
    kernel = kernel_source(framework, roots)
    assert kernel.body in section
    assert text.index(KERNEL_END) < text.index('if __name__ == "__main__":')
    ours = _definitions((KERNEL_DIR / "flax.py").read_text())
    ours.update(_definitions((KERNEL_DIR / f"{framework}.py").read_text()))
    copied = _definitions(re.sub(r"^#.*$", "", section, flags=re.M))
    assert copied and set(copied) <= set(ours)
    for name, body in copied.items():
        assert body == ours[name], name
    # nothing of the kernel is defined a second time outside the section
    outside = _definitions(text.replace(section, ""))
    assert not set(outside) & set(ours)
    assert _imported("\n".join(kernel.imports)) <= _imported(text)  # the file imports them


def _imported(source: str) -> set[tuple[str, str, str | None]]:
    """(module, name, alias) of every top-level import."""
    out: set[tuple[str, str, str | None]] = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Import):
            out |= {("", a.name, a.asname) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            out |= {(node.module or "", a.name, a.asname) for a in node.names}
    return out


# -- flat vector <-> tree, layout check ----------------------------------------------------------


class Named(NamedTuple):
    path: str
    keys: tuple[str, ...]
    shape: tuple[int, ...]
    offset: int
    size: int
    dtype: str = "float32"


NAMED = tuple(Named(".".join(t.keys), t.keys, t.shape, t.offset, t.size, t.dtype) for t in TENSORS)


def test_flatten_inverts_unflatten_and_names_what_is_missing() -> None:
    flat = jnp.asarray(np.random.default_rng(2).normal(size=(3, FLAT_SIZE)), jnp.float32)
    mask = np.zeros(FLAT_SIZE, bool)
    for t in TENSORS:
        mask[t.offset : t.offset + t.size] = True
    flat = flat * mask  # padding is zero, as decode makes it
    tree = fk.unflatten(flat, NAMED)
    back = fk.flatten(tree, NAMED, FLAT_SIZE)
    np.testing.assert_array_equal(np.asarray(back[:, :12]), np.asarray(flat[:, :12]))
    with pytest.raises(KeyError, match=r"flatten_params: the parameter tree has no 'b'"):
        fk.flatten({"a": tree["a"]}, NAMED, FLAT_SIZE, KeyError)
    bad = {**tree, "b": jnp.zeros((3, 5))}
    with pytest.raises(ValueError, match=r"'b' has shape \(3, 5\), the layout says \(4,\)"):
        fk.flatten(bad, NAMED, FLAT_SIZE)


def test_check_params_names_the_first_difference() -> None:
    fk.check_params({("a",): (2,)}, {("a",): (2,)}, "fix it")
    with pytest.raises(ValueError, match=r"\(a\.0: \(2,\) expected, found \(3,\)\); fix it"):
        fk.check_params({("a", 0): (3,)}, {("a", 0): (2,)}, "fix it")


# -- the fused path against the materialised weights ---------------------------------------------


class LinearGenerator:
    """A linear weight generator as a bound Linen module presents it: callable, its parameters
    under ``variables["params"]["linear"]``."""

    def __init__(self, w: jax.Array, b: jax.Array) -> None:
        self.variables = {"params": {"linear": {"kernel": w, "bias": b}}}

    def __call__(self, e: jax.Array) -> jax.Array:
        linear = self.variables["params"]["linear"]
        return e @ linear["kernel"] + linear["bias"]


CHUNK, N_EMB = 5, 8
# a Dense kernel (3, 4) starting inside chunk 0 (rows span 2 chunks), its bias, a Conv kernel
FUSED_LAYOUT = (
    Named("d.kernel", ("d", "kernel"), (3, 4), 2, 12),
    Named("d.bias", ("d", "bias"), (4,), 14, 4),
    Named("c.kernel", ("c", "kernel"), (2, 2, 1, 3), 18, 12),
    Named("n.scale", ("n", "scale"), (3,), 30, 3),
)


def _shared() -> tuple[fk.Shared, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.normal(size=(6, CHUNK)), jnp.float32)  # a linear generator
    b = jnp.asarray(rng.normal(size=(CHUNK,)), jnp.float32)
    table = jnp.asarray(rng.normal(size=(N_EMB, 6)), jnp.float32)
    scale = jnp.asarray(rng.normal(size=4), jnp.float32)
    shift = jnp.asarray(rng.normal(size=4), jnp.float32)
    fused = ((("d",), 0, 1, 2), (("c",), 2, None, 2))
    shared = fk.shared_inputs(LinearGenerator(w, b), table, scale, shift, FUSED_LAYOUT, fused)
    scales = rng.normal(size=(N_EMB,)).astype(np.float32)
    # the plain computation: the generator on the scaled table, decoded per tensor
    raw = (np.asarray(table) * scales[:, None]) @ np.asarray(w) + np.asarray(b)
    flat = np.asarray(fk.decode(jnp.asarray(raw.reshape(-1)), scale, shift, FUSED_LAYOUT, 40))
    return shared, scales, flat


def test_shared_materialises_each_tensor_as_the_decoded_generator_output() -> None:
    shared, scales, flat = _shared()
    assert shared.fused[0] == fk.FusedLayer(("d",), 0, 1, 2)
    for i, p in enumerate(FUSED_LAYOUT):
        expected = flat[p.offset : p.offset + p.size].reshape(p.shape)
        got = shared.materialise(i, jnp.asarray(scales))
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
    params = shared.params(jnp.asarray(scales))  # only the tensors no fused layer holds
    assert set(params) == {"n"} and params["n"]["scale"].shape == (3,)


def test_fused_output_is_the_layer_with_materialised_weights() -> None:
    import flax.linen as nn

    shared, scales, flat = _shared()
    kernel = flat[2:14].reshape(3, 4)
    x = np.random.default_rng(4).normal(size=(2, 3)).astype(np.float32)
    dense = SimpleNamespace(dtype=None, precision=jax.lax.Precision.HIGHEST)
    stack = shared.stack(shared.fused[0])
    got = fk.fused_output(shared.fused[0], stack, shared, jnp.asarray(scales), dense, x, False)
    np.testing.assert_allclose(np.asarray(got), x @ kernel + flat[14:18], rtol=1e-5, atol=1e-5)
    conv = nn.Conv(3, (2, 2), padding="SAME", use_bias=False, precision="highest")
    image = jnp.asarray(np.random.default_rng(5).normal(size=(1, 4, 4, 1)), jnp.float32)
    ckernel = jnp.asarray(flat[18:30].reshape(2, 2, 1, 3))
    expected = conv.apply({"params": {"kernel": ckernel}}, image)
    layer = shared.fused[1]
    got = fk.fused_output(
        layer, shared.stack(layer), shared, jnp.asarray(scales), conv, image, True
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)


# chunks of 6 holding whole kernel rows of 3 (k = 2 rows to a chunk), every tensor from a chunk
# boundary; d.kernel has 5 rows, so its last chunk holds one row and padding
ROW_CHUNK = 6
ROW_LAYOUT = (
    Named("d.kernel", ("d", "kernel"), (5, 3), 0, 15),
    Named("d.bias", ("d", "bias"), (3,), 18, 3),
    Named("w.kernel", ("w", "kernel"), (4, 6), 24, 24),
)


def test_low_rank_output_is_the_dense_layer_with_materialised_weights() -> None:
    rng = np.random.default_rng(6)
    w = jnp.asarray(rng.normal(size=(3, ROW_CHUNK)), jnp.float32)  # embedding_dim 3
    b = jnp.asarray(rng.normal(size=(ROW_CHUNK,)), jnp.float32)
    table = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    scale = jnp.asarray(rng.normal(size=3), jnp.float32)
    shift = jnp.asarray(rng.normal(size=3), jnp.float32)
    fused = ((("d",), 0, 1, 1), (("w",), 2, None, 1))
    shared = fk.shared_inputs(LinearGenerator(w, b), table, scale, shift, ROW_LAYOUT, fused)
    scales = rng.normal(size=(8,)).astype(np.float32)
    raw = (np.asarray(table) * scales[:, None]) @ np.asarray(w) + np.asarray(b)
    flat = np.asarray(fk.decode(jnp.asarray(raw.reshape(-1)), scale, shift, ROW_LAYOUT, 48))
    dense = SimpleNamespace(dtype=None, precision=jax.lax.Precision.HIGHEST)
    # rank-D where cheaper than the stacked GEMM: w (3 x (4 + 6) <= 2 x 24), not d (33 > 30)
    assert [shared.low_rank(layer) for layer in shared.fused] == [False, True]
    assert shared.stack(shared.fused[1]) is None
    x = rng.normal(size=(3, 4)).astype(np.float32)
    got = fk.fused_output(shared.fused[1], None, shared, jnp.asarray(scales), dense, x, False)
    np.testing.assert_allclose(np.asarray(got), x @ flat[24:48].reshape(4, 6), rtol=1e-5, atol=1e-5)
    # d in both forms (the rank-D one asked directly), leading positions kept
    x = rng.normal(size=(2, 7, 5)).astype(np.float32)
    expected = x @ flat[:15].reshape(5, 3) + flat[18:21]
    got = fk.low_rank_output(shared.fused[0], shared, jnp.asarray(scales), dense, x)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
    stack = shared.stack(shared.fused[0])
    got = fk.fused_output(shared.fused[0], stack, shared, jnp.asarray(scales), dense, x, False)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


# -- Linen and NNX: running the target ------------------------------------------------------------


def test_linen_excluded_merge_and_per_sample_run_match_a_loop() -> None:
    import flax.linen as nn

    from hypernn_gen.kernel import linen as lk

    params = {"a": {"kernel": 1, "bias": 2}, "b": 3}
    picked = lk.excluded_params(params, [(("a", "bias"), ())])
    assert picked == {"a": {"bias": 2}}
    assert lk.merge_params({"a": {"kernel": 1}, "b": 3}, picked) == params
    target = nn.Dense(2)
    x = jnp.asarray(np.random.default_rng(6).normal(size=(3, 4)), jnp.float32)
    weights = target.init(jax.random.key(0), jnp.zeros((1, 4)))["params"]
    bias = {"bias": weights["bias"]}
    kernels = jnp.stack([weights["kernel"] * (b + 1) for b in range(3)])
    out, updates = lk.run_per_sample(target, {"kernel": kernels}, {}, [], bias, {}, (x,), {})
    assert updates == {}
    for b in range(3):
        variables = {"params": {"kernel": kernels[b], "bias": weights["bias"]}}
        np.testing.assert_allclose(
            np.asarray(out[b]), np.asarray(target.apply(variables, x[b])), rtol=1e-5, atol=1e-6
        )
    single, _ = lk.apply_target(target.apply, {"params": weights}, (x,), {}, [], {})
    np.testing.assert_allclose(np.asarray(single), np.asarray(target.apply({"params": weights}, x)))


def test_nnx_slots_and_per_sample_run_match_a_loop() -> None:
    from flax import nnx

    from hypernn_gen.kernel import nnx as nk

    target = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
    layout = (Named("kernel", ("kernel",), (4, 2), 0, 8), Named("bias", ("bias",), (2,), 8, 2))
    nk.check_layout(target, layout)
    with pytest.raises(ValueError, match=r"\(bias: \(3,\) expected, found \(2,\)\); regenerate"):
        nk.check_layout(target, layout[:1] + (Named("bias", ("bias",), (3,), 8, 3),))
    copy = nk.without_generated(target, layout)
    slots = nnx.state(copy, nk.GeneratedSlot)
    assert {tuple(p) for p, _ in nnx.to_flat_state(slots)} == {("kernel",), ("bias",)}
    assert not nnx.state(copy, nnx.Param)  # no second set of weights
    filled = nk.as_params(slots, {"kernel": jnp.ones((4, 2))})  # bias: no value, stays a slot
    kinds = {tuple(p): type(v) for p, v in nnx.to_flat_state(filled)}
    assert kinds == {("kernel",): nnx.Param, ("bias",): nk.GeneratedSlot}
    x = jnp.asarray(np.random.default_rng(7).normal(size=(3, 4)), jnp.float32)
    kernels = jnp.stack([target.kernel[...] * (b + 1) for b in range(3)])
    biases = jnp.stack([target.bias[...] - b for b in range(3)])
    out = nk.run_per_sample(copy, {"kernel": kernels, "bias": biases}, (x,), {})
    for b in range(3):
        np.testing.assert_allclose(
            np.asarray(out[b]), np.asarray(x[b] @ kernels[b] + biases[b]), rtol=1e-5, atol=1e-6
        )
    single = nk.run_target(copy, {"kernel": kernels[1], "bias": biases[1]}, (x,), {})
    np.testing.assert_allclose(
        np.asarray(single), np.asarray(x @ kernels[1] + biases[1]), rtol=1e-5
    )


@pytest.mark.parametrize(
    "template", sorted((REPO / "templates").rglob("*.jinja")), ids=lambda p: p.name
)
def test_every_template_is_at_most_350_lines(template: Path) -> None:
    assert len(template.read_text().splitlines()) <= 350, template


def test_normalized_brings_each_tensor_to_unit_rms_per_sample() -> None:
    rng = np.random.default_rng(0)
    tensors = [Slice(("a",), (3,), 0, 3), Slice(("b",), (2, 2), 4, 4)]
    raw = rng.normal(size=(2, 9)).astype(np.float32) * 3
    out = np.asarray(fk.normalized(jnp.asarray(raw), tensors, 9))
    expected = np.zeros_like(raw)
    for t in tensors:
        piece = raw[:, t.offset : t.offset + t.size].astype(np.float64)
        rms = np.sqrt((piece**2).mean(-1, keepdims=True) + fk.NORM_EPS)
        expected[:, t.offset : t.offset + t.size] = piece / rms
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("offset", "size"), [(3, 20), (16, 8), (17, 3), (0, 48)])
def test_sample_mean_square_is_that_of_the_materialised_values(offset: int, size: int) -> None:
    """Per sample, the mean square of a tensor's values (chunk k: s_k * table[k] @ kernel +
    bias) from the chunks' moments equals the one of the materialised generator output."""
    rng = np.random.default_rng(1)
    table, kernel = rng.normal(size=(6, 4)), rng.normal(size=(4, 8))
    bias, scales = rng.normal(size=8), rng.normal(size=(3, 6))
    raw = (scales[:, :, None] * (table @ kernel) + bias).reshape(3, -1)  # float64 reference
    expected = (raw[:, offset : offset + size] ** 2).mean(-1)
    moments = fk.chunk_moments(
        *(jnp.asarray(a, jnp.float32) for a in (table, kernel, bias)), offset, size
    )
    found = fk.sample_mean_square(moments, jnp.asarray(scales, jnp.float32), size)
    np.testing.assert_allclose(np.asarray(found), expected, rtol=1e-5)


def test_grouped_linear_runs_each_row_through_its_groups_head() -> None:
    """Row k is embedding[k] @ kernel[g] + bias[g] for its group g (with and without a leading
    sample dimension); each head's gradients are multiplied by its group's multipliers, the
    forward unchanged; row_factors gives every row its group's table multiplier."""
    rng = np.random.default_rng(2)
    rows = ((0, 3, 4), (1,), (2, 5))
    emb = rng.normal(size=(2, 6, 4)).astype(np.float32)
    kernel = rng.normal(size=(3, 4, 5)).astype(np.float32)
    bias = rng.normal(size=(3, 5)).astype(np.float32)
    expected = np.zeros((2, 6, 5))
    for g, r in enumerate(rows):
        for k in r:
            expected[:, k] = emb[:, k].astype(np.float64) @ kernel[g] + bias[g]
    args = (jnp.asarray(emb), jnp.asarray(kernel), jnp.asarray(bias))
    np.testing.assert_allclose(np.asarray(fk.grouped_linear(*args, rows)), expected, rtol=1e-5)
    single = fk.grouped_linear(args[0][0], *args[1:], rows)
    np.testing.assert_allclose(np.asarray(single), expected[0], rtol=1e-5)
    mults = ((2.0, 3.0, 5.0), (7.0, 11.0, 13.0), (0.5, 0.25, 0.125))
    np.testing.assert_array_equal(fk.row_factors(rows, mults)[:, 0], [2, 7, 0.5, 2, 2, 0.5])
    np.testing.assert_array_equal(
        np.asarray(fk.grouped_linear(*args, rows, mults)),
        np.asarray(fk.grouped_linear(*args, rows)),
    )
    weights = jnp.asarray(rng.normal(size=(2, 6, 5)), jnp.float32)

    def grads(m: object) -> tuple:
        def loss(*a: jax.Array) -> jax.Array:
            return jnp.sum(weights * fk.grouped_linear(*a, rows, m))

        return jax.grad(loss, argnums=(0, 1, 2))(*args)

    raw, scaled = grads(None), grads(mults)
    np.testing.assert_array_equal(
        np.asarray(scaled[0]), np.asarray(raw[0])
    )  # the table's: not here
    for g, (_, mw, mb) in enumerate(mults):
        np.testing.assert_allclose(scaled[1][g], mw * raw[1][g], rtol=1e-6)
        np.testing.assert_allclose(scaled[2][g], mb * raw[2][g], rtol=1e-6)
