"""Hostile use of generated modules and the runtime (issue 14): checkpoints and inputs.

* a state dict saved from a hypernetwork of another layout, with the same shapes, is refused
  (the layout digest travels in the state), in generated files and the runtime alike;
* generated Torch files check their inputs before PyTorch does: one ValueError that names the
  expected shape.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from gen_support import hypernetwork_class, import_file
from torch import nn

from hypernn_gen.cli import main
from hypernn_gen.runtime.torch import TorchHyperNetwork

# Two targets whose hypernetworks have state dicts of the same keys and shapes (4 tensors, 76
# values, the same chunking) but whose values mean other tensors: A's "0.weight" (8, 4) is B's
# "0.weight" (4, 8) and the biases change places.
TARGETS = {
    "a": "nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4))",
    "b": "nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 8))",
}


def target_source(expr: str, width: int) -> str:
    return textwrap.dedent(f"""
        import torch
        from torch import nn


        def make_target():
            return {expr}


        example_input = torch.zeros(2, {width})
        """)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Generated static and dynamic files for targets a and b (modules, by ``a_static`` etc.)."""
    root = tmp_path_factory.mktemp("digest")
    out = {}
    for name, expr in TARGETS.items():
        (root / f"{name}.py").write_text(target_source(expr, 4 if name == "a" else 8))
        for mode in ("static", "dynamic"):
            path = root / f"{name}_{mode}.py"
            args = [str(root / f"{name}.py"), "--mode", mode, "--embedding-dim", "4"]
            args += ["--condition-shape", "4"] if mode == "dynamic" else []  # same for a and b
            assert main([*args, "--num-embeddings", "8", "-o", str(path)]) == 0
            out[f"{name}_{mode}"] = import_file(path)
    return out


def build(files: dict, key: str) -> nn.Module:
    return hypernetwork_class(files[key])()


def test_another_layout_with_the_same_shapes_is_refused(files: dict) -> None:
    for mode in ("static", "dynamic"):
        a, b = build(files, f"a_{mode}"), build(files, f"b_{mode}")
        saved = a.state_dict()
        mine = b.state_dict()
        assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in mine.items()}
        digest_a, digest_b = (
            files[f"a_{mode}"].CHECKPOINT_DIGEST,
            files[f"b_{mode}"].CHECKPOINT_DIGEST,
        )
        assert digest_a != digest_b
        with pytest.raises(ValueError, match="another layout") as info:
            b.load_state_dict(saved)
        message = str(info.value)
        assert digest_a in message and digest_b in message
        assert "regenerate" in message and "load it into the hypernetwork" in message
        with pytest.raises(ValueError, match="another layout"):
            b.load_state_dict(saved, strict=False)  # not a key problem: refused either way
        for name, value in b.state_dict().items():  # nothing was copied before the refusal
            assert torch.equal(value, mine[name]), name
        # without the digest the same state loads silently: shapes cannot tell the layouts apart
        b.load_state_dict({k: v for k, v in saved.items() if k != "layout_digest"})
        assert torch.equal(b.param_scale, a.param_scale)


def test_the_same_layout_loads_and_gives_the_same_numbers(files: dict) -> None:
    for mode in ("static", "dynamic"):
        torch.manual_seed(0)
        a = build(files, f"a_{mode}")
        torch.manual_seed(1)
        again = build(files, f"a_{mode}")
        x = torch.randn(3, 4)
        again.load_state_dict(a.state_dict())
        expected = a(x, return_params=True) if mode == "dynamic" else a(x)
        got = again(x, return_params=True) if mode == "dynamic" else again(x)
        torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)
        torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
        assert again.state_dict()["layout_digest"].dtype == torch.uint8


def test_generated_and_runtime_digests_agree_and_checkpoints_cross(files: dict) -> None:
    for mode in ("static", "dynamic"):
        module = files[f"a_{mode}"]
        extra = {"condition_shape": (4,)} if mode == "dynamic" else {}
        runtime = TorchHyperNetwork(
            module.make_target(), embedding_dim=4, num_embeddings=8, mode=mode, **extra
        )
        assert runtime.checkpoint_digest == module.CHECKPOINT_DIGEST
        generated = build(files, f"a_{mode}")
        generated.load_state_dict(runtime.state_dict())  # the same layout: accepted
        x = torch.randn(2, 4)
        want = runtime(x)[0]
        got = generated(x)[0]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        runtime.load_state_dict(generated.state_dict())
        other = TorchHyperNetwork(
            files[f"b_{mode}"].make_target(),
            embedding_dim=4,
            num_embeddings=8,
            mode=mode,
            **extra,
        )
        with pytest.raises(ValueError, match=other.checkpoint_digest):
            other.load_state_dict(generated.state_dict())
        with pytest.raises(ValueError, match=runtime.checkpoint_digest):
            build(files, f"b_{mode}").load_state_dict(runtime.state_dict())


def test_other_options_change_the_digest(files: dict) -> None:
    target = files["a_static"].make_target()
    digests = {
        TorchHyperNetwork(target, embedding_dim=4, num_embeddings=8).checkpoint_digest,
        TorchHyperNetwork(
            target, embedding_dim=4, num_embeddings=8, chunking="tensor"
        ).checkpoint_digest,
        TorchHyperNetwork(target, embedding_dim=4, num_embeddings=10).checkpoint_digest,
        TorchHyperNetwork(target, embedding_dim=5, num_embeddings=8).checkpoint_digest,
        TorchHyperNetwork(
            target, embedding_dim=4, num_embeddings=8, mode="dynamic", condition_dim=4
        ).checkpoint_digest,
    }
    assert len(digests) == 5
    # init statistics are not structure: another init scheme keeps the digest
    assert (
        TorchHyperNetwork(
            target, embedding_dim=4, num_embeddings=8, init_scheme="hyperfan-in"
        ).checkpoint_digest
        == files["a_static"].CHECKPOINT_DIGEST
    )


def test_a_checkpoint_without_a_digest_still_loads(files: dict) -> None:
    """Checkpoints saved before digests existed load as before (documented in the README)."""
    a = build(files, "a_static")
    old = {k: v for k, v in a.state_dict().items() if k != "layout_digest"}
    fresh = build(files, "a_static")
    fresh.load_state_dict(old)
    x = torch.randn(2, 4)
    torch.testing.assert_close(fresh(x)[0], a(x)[0], rtol=0, atol=0)


def test_the_digest_follows_the_module_into_a_parent_and_to_meta(files: dict) -> None:
    parent = nn.ModuleDict({"hyper": build(files, "a_static")})
    state = parent.state_dict()
    assert "hyper.layout_digest" in state
    other = nn.ModuleDict({"hyper": build(files, "b_static")})
    with pytest.raises(ValueError, match="another layout"):
        other.load_state_dict(state)
    meta = build(files, "a_static").to("meta")
    assert all(v.is_meta for v in meta.state_dict().values())


# -- generated Torch files check their inputs ------------------------------------------------------


def test_dynamic_inputs_are_checked_before_pytorch(files: dict) -> None:
    module = files["a_dynamic"]
    hyper = build(files, "a_dynamic")
    flat = module.FLAT_SIZE
    cases = [
        ((torch.randn(4),), {}, r"the condition has shape \(4,\).*\(batch, \*\(4,\)\)"),
        (
            (torch.tensor(1.0),),
            {},
            r"conditioning input \(batch, \*condition shape\), got shape \(\)",
        ),
        ((), {}, "got None; pass the target's inputs or condition="),
        ((torch.randn(0, 4),), {}, "a batch of 0 samples"),
        ((torch.randn(0, 4),), {"return_params": True}, "a batch of 0 samples"),
        (
            (torch.randn(2, 4),),
            {"generated_params": torch.randn(2, 5)},
            rf"expected \(batch, {flat}\)",
        ),
        (
            (torch.randn(2, 4),),
            {"generated_params": torch.randn(flat)},
            rf"shape \({flat},\), expected \(batch, {flat}\)",
        ),
        ((torch.randn(2, 4),), {"generated_params": torch.randn(0, flat)}, "a batch of 0 samples"),
        (
            (torch.randn(2, 4),),
            {"generated_params": torch.randn(3, flat)},
            r"3 weight sets but input 0 has shape \(2, 4\)",
        ),
    ]
    for args, kwargs, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            hyper(*args, **kwargs)
    # and the valid calls still agree: given weights == generated ones
    x = torch.randn(3, 4)
    out, params = hyper(x, return_params=True)
    torch.testing.assert_close(hyper(x, generated_params=params)[0], out, rtol=0, atol=0)


def test_static_generated_params_of_the_wrong_shape(files: dict) -> None:
    module = files["a_static"]
    hyper = build(files, "a_static")
    flat = module.FLAT_SIZE
    for bad in (torch.randn(2, flat), torch.randn(flat - 1), torch.tensor(1.0)):
        with pytest.raises(
            ValueError, match=rf"generated_params has shape .*, expected \({flat},\)"
        ):
            hyper(torch.randn(2, 4), generated_params=bad)
    with pytest.raises(ValueError, match=r"has shape list, expected"):
        hyper(torch.randn(2, 4), generated_params=[0.0] * flat)
    x = torch.randn(2, 4)
    out, params = hyper(x)
    torch.testing.assert_close(hyper(x, generated_params=params)[0], out, rtol=0, atol=0)


# -- Flax: the digest is a variable (Linen: the "layout" collection; NNX: layout_digest) -----------

LINEN_TARGET = """
import jax.numpy as jnp
from flax import linen as nn


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense({out})(jnp.tanh(nn.Dense({hidden})(x)))


example_input = jnp.zeros((2, {width}))
"""

NNX_TARGET = """
import jax.numpy as jnp
from flax import nnx


class Net(nnx.Module):
    def __init__(self, *, rngs):
        self.a = nnx.Linear({width}, {hidden}, rngs=rngs)
        self.b = nnx.Linear({hidden}, {out}, rngs=rngs)

    def __call__(self, x):
        return self.b(jnp.tanh(self.a(x)))


def make_target():
    return Net(rngs=nnx.Rngs(0))


example_input = jnp.zeros((2, {width}))
"""

# A (4 -> 8 -> 4) and B (8 -> 4 -> 8): the same variable shapes, other meanings.
FLAX_SIZES = {"a": (4, 8, 4), "b": (8, 4, 8)}


def flax_files(root, source: str, mode: str = "static") -> dict:  # noqa: ANN001
    modules = {}
    for name, (width, hidden, out) in FLAX_SIZES.items():
        (root / f"{name}.py").write_text(source.format(width=width, hidden=hidden, out=out))
        args = [str(root / f"{name}.py"), "--mode", mode, "--embedding-dim", "4"]
        args += ["--condition-shape", "4"] if mode == "dynamic" else []
        assert main([*args, "--num-embeddings", "8", "-o", str(root / f"g_{name}.py")]) == 0
        modules[name] = import_file(root / f"g_{name}.py")
    assert modules["a"].CHECKPOINT_DIGEST != modules["b"].CHECKPOINT_DIGEST
    return modules


def digest_of(saved) -> str:  # noqa: ANN001
    """The 16 hex digits a saved digest variable holds (8 byte values)."""
    return bytes(int(v) for v in saved.tolist()).hex()


def one_line_refusal(info: pytest.ExceptionInfo, saved: str, mine: str) -> None:
    message = str(info.value)
    assert "\n" not in message and "another layout" in message and "regenerate" in message
    assert saved in message and mine in message


def test_linen_variables_of_another_layout_are_refused(tmp_path) -> None:  # noqa: ANN001
    jax = pytest.importorskip("jax")
    from hypernn_gen.errors import HyperNetworkError
    from hypernn_gen.runtime.flax import FlaxHyperNetwork

    modules = flax_files(tmp_path, LINEN_TARGET)
    a, b = modules["a"].NetHyperNetwork(), modules["b"].NetHyperNetwork()
    xa, xb = jax.numpy.ones((2, 4)), jax.numpy.ones((2, 8))
    va, vb = a.init(jax.random.key(0), xa), b.init(jax.random.key(0), xb)
    assert jax.tree.map(jax.numpy.shape, va) == jax.tree.map(jax.numpy.shape, vb)
    digest_a, digest_b = modules["a"].CHECKPOINT_DIGEST, modules["b"].CHECKPOINT_DIGEST
    assert digest_of(va["layout"]["digest"]) == digest_a
    with pytest.raises(ValueError, match=digest_a) as info:
        b.apply(va, xb)
    one_line_refusal(info, digest_a, digest_b)
    out_b, flat_b = b.apply(vb, xb)  # its own variables
    # jax.grad over all the variables still works: the digest's gradient is zero
    grads = jax.jit(jax.grad(lambda v: b.apply(v, xb)[0].sum()))(vb)
    assert not grads["layout"]["digest"].any() and grads["params"]["param_scale"].any()
    # no digest (saved before digests existed): applies as before, the same numbers
    old_out, old_flat = b.apply({"params": vb["params"]}, xb)
    assert jax.numpy.array_equal(old_flat, flat_b) and jax.numpy.array_equal(old_out, out_b)
    runtime = FlaxHyperNetwork(modules["a"].Net(), embedding_dim=4, num_embeddings=8)
    vr = runtime.init(jax.random.key(0), xa)
    assert digest_of(vr["layout"]["digest"]) == digest_a
    out_gen, _ = a.apply(vr, xa)  # generated file and runtime share the digest and the names
    out_rt, _ = runtime.apply(vr, xa)
    assert jax.numpy.allclose(out_gen, out_rt, atol=1e-6)
    with pytest.raises(HyperNetworkError, match="another layout") as info:
        runtime.apply(vb, xa)
    one_line_refusal(info, digest_b, digest_a)


def test_nnx_state_of_another_layout_is_refused(tmp_path) -> None:  # noqa: ANN001
    jax = pytest.importorskip("jax")
    from flax import nnx

    from hypernn_gen.errors import HyperNetworkError
    from hypernn_gen.runtime.flax import NNXHyperNetwork

    modules = flax_files(tmp_path, NNX_TARGET)
    digest_a, digest_b = modules["a"].CHECKPOINT_DIGEST, modules["b"].CHECKPOINT_DIGEST
    a = modules["a"].AHyperNetwork(rngs=nnx.Rngs(0))
    b = modules["b"].BHyperNetwork(rngs=nnx.Rngs(1))
    xb = jax.numpy.ones((2, 8))
    saved_a, saved_b = nnx.clone(nnx.state(a)), nnx.clone(nnx.state(b))  # not views
    assert jax.tree.map(jax.numpy.shape, saved_a) == jax.tree.map(jax.numpy.shape, saved_b)
    assert digest_of(saved_a["layout_digest"][...]) == digest_a
    out_b, flat_b = b(xb)
    nnx.update(b, saved_a)  # shapes match: nnx takes it; the call refuses it
    with pytest.raises(ValueError, match=digest_a) as info:
        b(xb)
    one_line_refusal(info, digest_a, digest_b)
    nnx.update(b, saved_b)
    again_out, again_flat = b(xb)
    assert jax.numpy.array_equal(again_flat, flat_b) and jax.numpy.array_equal(again_out, out_b)
    # the runtime twin of A: the same digest and names, checkpoints cross both ways
    runtime = NNXHyperNetwork(
        modules["a"].make_target(), embedding_dim=4, num_embeddings=8, rngs=nnx.Rngs(2)
    )
    assert runtime.checkpoint_digest == digest_a
    nnx.update(runtime, saved_a)
    xa = jax.numpy.ones((2, 4))
    assert jax.numpy.allclose(runtime(xa)[0], a(xa)[0], atol=1e-6)
    nnx.update(runtime, saved_b)
    with pytest.raises(HyperNetworkError, match="another layout") as info:
        runtime(xa)
    one_line_refusal(info, digest_b, digest_a)


def test_nnx_dynamic_state_of_another_layout_is_refused(tmp_path) -> None:  # noqa: ANN001
    jax = pytest.importorskip("jax")
    from flax import nnx

    from hypernn_gen.runtime.flax import NNXHyperNetwork

    modules = flax_files(tmp_path, NNX_TARGET, mode="dynamic")
    b = modules["b"].BHyperNetwork(rngs=nnx.Rngs(0))
    runtime_a = NNXHyperNetwork(
        modules["a"].make_target(),
        mode="dynamic",
        embedding_dim=4,
        num_embeddings=8,
        condition_shape=(4,),
        rngs=nnx.Rngs(0),
    )
    assert runtime_a.checkpoint_digest == modules["a"].CHECKPOINT_DIGEST
    nnx.update(b, nnx.state(runtime_a))
    with pytest.raises(ValueError, match=runtime_a.checkpoint_digest) as info:
        b(jax.numpy.ones((2, 8)), condition=jax.numpy.ones((2, 4)))
    one_line_refusal(info, runtime_a.checkpoint_digest, modules["b"].CHECKPOINT_DIGEST)
