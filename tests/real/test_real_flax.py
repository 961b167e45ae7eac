"""Targets in the style of Flax's own examples (tests/zoo/flax_*.py), generated static and dynamic.

* ``flax_resnet``: the ImageNet example's ResNet, ``BatchNorm(axis_name="batch")``, ``train``;
* ``flax_nnx_cnn``: the NNX MNIST tutorial's CNN, ``__call__(x, rngs)``, ``out_sharding=None``;
* ``flax_lm``: an lm1b-style transformer LM, keyword-only ``deterministic`` without a default;
* ``flax_vae``: the VAE example, submodules in ``setup``, ``__call__(x, z_rng)``, ``generate``.

Each declares its call with ``example_call``. For each: the generated file with the target's own
weights flattened in equals the plain target (static; dynamic with the same weight set for every
sample, on the whole batch); the fused path equals the materialising one (outputs and
gradients); one training step gives finite, nonzero gradients. The references are the plain
target (and, where each sample draws its own randomness, the plain target run sample by sample
with the keys the hypernetwork splits off).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from gen_support import REPO, ZOO_DIR, import_file, run_python
from tolerances import DYNAMIC, GRAD, STATIC, assert_close

from hypernn_gen.cli import main
from hypernn_gen.errors import TargetLoadError
from hypernn_gen.load import load_target

pytestmark = pytest.mark.real

BATCH = 3


@pytest.fixture(autouse=True)
def _quick_compiles() -> Iterator[None]:
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="module")
def generated(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[str, str], ModuleType]:
    directory = tmp_path_factory.mktemp("real_flax")
    cache: dict[tuple[str, str], ModuleType] = {}

    def get(target: str, mode: str) -> ModuleType:
        if (target, mode) not in cache:
            out = directory / f"{target}_{mode}.py"
            assert main([str(ZOO_DIR / f"{target}.py"), "--mode", mode, "-o", str(out)]) == 0
            cache[target, mode] = import_file(out)
        return cache[target, mode]

    return get


def plain(target: str) -> ModuleType:
    return sys.modules.get(f"_real_flax_{target}") or import_file(
        ZOO_DIR / f"{target}.py", f"_real_flax_{target}"
    )


def hypernetwork(module: ModuleType) -> type:
    (cls,) = [v for k, v in vars(module).items() if k.endswith("HyperNetwork")]
    return cls


def close(actual: Any, expected: Any, tol: dict[str, float], what: str) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected), what
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape, what
        assert_close(torch.from_numpy(a.copy()), torch.from_numpy(b.copy()), tol, what)


def normal(*shape: int, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


def finite_nonzero(grads: Any) -> None:
    leaves = [np.asarray(g) for g in jax.tree.leaves(grads)]
    assert leaves and all(np.isfinite(g).all() for g in leaves)
    for name in ("embedding_module", "weight_generator", "param_scale"):
        part = [np.asarray(g) for g in jax.tree.leaves(grads[name])]
        assert any(np.abs(g).max() > 0 for g in part), name


# -- Linen ----------------------------------------------------------------------------------------

#: target -> (a batch of inputs, keyword arguments in eval mode)
LINEN = {
    "flax_resnet": (lambda: (normal(BATCH, 8, 8, 3),), {"train": False}),
    "flax_lm": (
        lambda: (jnp.asarray(np.random.default_rng(0).integers(1, 32, (BATCH, 8)), jnp.int32),),
        {"deterministic": True},
    ),
    "flax_vae": (lambda: (normal(BATCH, 16), jax.random.key(7)), {}),
}


def linen_variables(target: str, module: ModuleType, args: tuple, kwargs: dict) -> tuple:
    """The plain target's variables and the generated module's, with the target's state."""
    model = plain(target).make_target()
    own = model.init(jax.random.key(1), *args, **kwargs)
    hn = hypernetwork(module)()
    variables = dict(hn.init(jax.random.key(0), *args, **kwargs))
    for col in own:
        if col != "params":
            variables[col] = {"target": own[col]}
    return model, own, hn, variables


@pytest.mark.slow
@pytest.mark.parametrize("target", list(LINEN))
def test_linen_static_and_dynamic_with_the_targets_weights_equal_the_target(
    generated: Callable, target: str
) -> None:
    make, kwargs = LINEN[target]
    args = make()
    for mode in ("static", "dynamic"):
        module = generated(target, mode)
        model, own, hn, variables = linen_variables(target, module, args, kwargs)
        flat = module.flatten_params(own["params"])
        if mode == "dynamic":
            flat = jnp.broadcast_to(flat, (BATCH, flat.shape[-1]))
        out, _ = hn.apply(variables, *args, generated_params=flat, **kwargs)
        expected = model.apply(own, *args, **kwargs)
        if target == "flax_vae" and mode == "dynamic":
            # each sample draws from its own key, split off z_rng: the plain target, sample by
            # sample with those keys; mean and logvar (no randomness) equal the whole batch's
            keys = jax.random.split(args[1], BATCH)
            rows = [model.apply(own, args[0][b : b + 1], keys[b]) for b in range(BATCH)]
            per_sample = jax.tree.map(lambda *r: jnp.concatenate(r), *rows)
            close(out, per_sample, DYNAMIC, f"{target} {mode} per sample")
            close(out[1:], expected[1:], DYNAMIC, f"{target} {mode} mean, logvar")
            continue
        close(out, expected, STATIC if mode == "static" else DYNAMIC, f"{target} {mode}")


@pytest.mark.slow
@pytest.mark.parametrize("target", list(LINEN))
def test_linen_fused_equals_materialising_and_trains(generated: Callable, target: str) -> None:
    make, kwargs = LINEN[target]
    args = make()
    module = generated(target, "dynamic")
    assert module.FUSED, "the Flax-example targets have fused Dense/Conv layers"
    _, _, hn, variables = linen_variables(target, module, args, kwargs)

    def loss(params: dict, materialise: bool) -> tuple:
        out, _ = hn.apply(
            {**variables, "params": params}, *args, return_params=materialise, **kwargs
        )
        return sum(jnp.mean(o**2) for o in jax.tree.leaves(out)), out

    grads = [jax.grad(loss, has_aux=True)(variables["params"], m) for m in (False, True)]
    close(grads[0][1], grads[1][1], DYNAMIC, f"{target} fused output")
    close(grads[0][0], grads[1][0], GRAD, f"{target} fused gradients")
    finite_nonzero(grads[0][0])
    static = generated(target, "static")
    _, _, hs, sv = linen_variables(target, static, args, kwargs)
    finite_nonzero(
        jax.grad(
            lambda p: jnp.mean(
                jax.tree.leaves(hs.apply({**sv, "params": p}, *args, **kwargs)[0])[0] ** 2
            )
        )(sv["params"])
    )


def test_resnet_axis_name_batch_norm_trains_inside_pmap_and_shard_map(
    generated: Callable,
) -> None:
    """In train mode the target's BatchNorm(axis_name="batch") needs the axis: under pmap and
    shard_map the dynamic module with one weight set for every sample computes the plain
    target's batch statistics (over the samples and the devices), so outputs and updated
    batch_stats equal the plain target's, and the fused path equals the materialising one;
    outside them, init in train mode works, as Flax's (static and dynamic)."""
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    x = normal(BATCH, 8, 8, 3)
    module = generated("flax_resnet", "dynamic")
    model, own, hn, variables = linen_variables("flax_resnet", module, (x,), {"train": False})
    hn.init(jax.random.key(0), x, train=True)  # no axis needed at init
    hypernetwork(generated("flax_resnet", "static"))().init(jax.random.key(0), x, train=True)
    flat = jnp.broadcast_to(module.flatten_params(own["params"]), (BATCH, module.FLAT_SIZE))

    def theirs(xs: jax.Array) -> tuple:
        return model.apply(own, xs, train=True, mutable=["batch_stats"])

    def ours(xs: jax.Array, p: jax.Array, how: str) -> tuple:
        kwargs = {
            "own": {"generated_params": p},
            "fused": {},
            "materialise": {"return_params": True},
        }
        (out, _), updates = hn.apply(
            variables, xs, train=True, mutable=["batch_stats"], **kwargs[how]
        )
        return out, updates["batch_stats"]["target"]

    mesh = Mesh(np.array(jax.devices()[:1]), ("batch",))
    runs = {
        "pmap": lambda f: jax.pmap(f, axis_name="batch"),
        "shard_map": lambda f: jax.shard_map(
            f,
            mesh=mesh,
            in_specs=P("batch"),
            out_specs=(P("batch"), P()),
            check_vma=False,
        ),
    }
    for name, wrap in runs.items():
        lead = (lambda a: a[None]) if name == "pmap" else (lambda a: a)
        expected, stats = wrap(theirs)(lead(x))
        expected_stats = stats["batch_stats"]
        results = {}
        for how in ("own", "fused", "materialise"):
            results[how] = wrap(lambda xs, p, how=how: ours(xs, p, how))(lead(x), lead(flat))
        close(results["own"][0], expected, DYNAMIC, f"train-mode output in {name}")
        close(results["own"][1], expected_stats, DYNAMIC, f"batch_stats in {name}")
        close(results["fused"], results["materialise"], DYNAMIC, f"fused in {name}")
    checked = jax.shard_map(
        lambda xs, p: ours(xs, p, "fused"),
        mesh=mesh,
        in_specs=P("batch"),
        out_specs=(P("batch"), P()),
    )
    with pytest.raises(
        ValueError,
        match=r"BatchNorm .* check_vma=True; call shard_map with check_vma=False",
    ):
        checked(x, flat)


# -- NNX ------------------------------------------------------------------------------------------


def nnx_pair(module: ModuleType) -> tuple[nnx.Module, nnx.Module]:
    return plain("flax_nnx_cnn").make_target(), hypernetwork(module)(rngs=nnx.Rngs(0))


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_nnx_cnn_static_and_dynamic_with_the_targets_weights(
    generated: Callable, mode: str
) -> None:
    """Static: the target's own weights give the target's output in train mode (the same
    dropout rngs, batch statistics) and in eval mode; dynamic, eval mode: the whole batch's.
    """
    module = generated("flax_nnx_cnn", mode)
    x = normal(BATCH, 8, 8, 1)
    target, hn = nnx_pair(module)
    flat = hn.flatten_params(target)
    if mode == "static":  # train mode: dropout draws from the rngs given to __call__
        out, _ = hn(x, generated_params=flat, rngs=nnx.Rngs(dropout=5))
        close(out, target(x, rngs=nnx.Rngs(dropout=5)), STATIC, "static, train mode")
    else:
        flat = jnp.broadcast_to(flat, (BATCH, flat.shape[-1]))
    hn.eval()
    target.eval()
    out, _ = hn(x, generated_params=flat)
    close(out, target(x), STATIC if mode == "static" else DYNAMIC, f"{mode}, eval mode")


def without_dropout(model: nnx.Module) -> nnx.Module:
    for _, m in nnx.iter_modules(model):
        if isinstance(m, nnx.Dropout):
            m.rate = 0.0
    return model


@pytest.mark.parametrize("stats", ["batch", "sample"])
def test_nnx_cnn_dynamic_train_mode_batch_norm(
    tmp_path: Path, generated: Callable, stats: str
) -> None:
    """Train mode, one weight set for every sample: by default (conditional BatchNorm) the
    dynamic module equals the plain target on the whole batch, outputs and running statistics;
    ``--batch-norm-stats sample`` equals the plain target sample by sample (each its own
    statistics; the running statistics move by the samples' mean)."""
    if stats == "batch":
        module = generated("flax_nnx_cnn", "dynamic")
    else:
        out = tmp_path / "cnn_sample.py"
        argv = [str(ZOO_DIR / "flax_nnx_cnn.py"), "--mode", "dynamic", "-o", str(out)]
        assert main([*argv, "--batch-norm-stats", "sample"]) == 0
        module = import_file(out)
    x = normal(BATCH, 8, 8, 1)
    target, hn = nnx_pair(module)
    without_dropout(target)
    without_dropout(hn.target)
    flat = jnp.broadcast_to(hn.flatten_params(target), (BATCH, module.FLAT_SIZE))
    out, _ = hn(x, generated_params=flat)
    if stats == "batch":
        expected = target(x)
    else:
        rows = []
        for b in range(BATCH):
            one = without_dropout(plain("flax_nnx_cnn").make_target())
            rows.append(one(x[b : b + 1]))
        expected = jnp.concatenate(rows)
        target(x)  # the plain target's running statistics, for the batch (compared for "batch")
    close(out, expected, DYNAMIC, f"train-mode output ({stats})")
    # either way the running mean equals the batch's (the samples' updates are averaged)
    close(
        hn.target.batch_norm1.mean[...],
        target.batch_norm1.mean[...],
        DYNAMIC,
        "running mean",
    )


def test_nnx_cnn_fused_equals_materialising_and_trains(generated: Callable) -> None:
    module = generated("flax_nnx_cnn", "dynamic")
    assert {
        type(m).__name__ for _, m in nnx.iter_modules(hypernetwork(module)(rngs=nnx.Rngs(0)))
    } >= {
        "FusedConv",
        "FusedLinear",
    }
    x = normal(BATCH, 8, 8, 1)
    results = []
    for materialise in (False, True):
        _, hn = nnx_pair(module)

        def loss(model: nnx.Module, materialise: bool = materialise) -> tuple:
            out, _ = model(x, return_params=materialise, rngs=nnx.Rngs(dropout=3))
            return jnp.mean(out**2), out

        grads, out = nnx.grad(loss, has_aux=True)(hn)
        results.append((out, nnx.to_pure_dict(nnx.state(grads, nnx.Param))))
    close(results[0][0], results[1][0], DYNAMIC, "fused output (train mode, rngs)")
    close(results[0][1], results[1][1], GRAD, "fused gradients")
    finite_nonzero(results[0][1])


# -- the example call and its failure classes -----------------------------------------------------


def test_example_call_forms_and_bad_declarations(tmp_path: Path) -> None:
    """A tuple or a function (called afresh each time); a bad value or a clash with
    example_input is one line naming the fix."""
    loaded = load_target(str(ZOO_DIR / "flax_nnx_cnn.py"))
    assert loaded.input_specs[0].shape == (2, 8, 8, 1)
    first, second = loaded.example_call()[1]["rngs"], loaded.example_call()[1]["rngs"]
    assert isinstance(first, nnx.Rngs) and first is not second
    loaded = load_target(str(ZOO_DIR / "flax_vae.py"))
    assert [s.shape for s in loaded.input_specs] == [(2, 16)]  # the key is not an input array
    head = "import flax.linen as nn\nimport jax.numpy as jnp\n\n\nclass M(nn.Module):\n"
    head += (
        "    @nn.compact\n    def __call__(self, x, *, train):\n        return nn.Dense(2)(x)\n\n\n"
    )
    cases = {
        "example_call = (jnp.zeros((1, 3)), jnp.zeros((1, 3)))": r"example_call in .* is a tuple, not a pair \(positional arguments, keyword arguments\); write",
        "example_call = ((jnp.zeros((1, 3)),), {})\nexample_input = jnp.zeros((1, 3))": "defines both example_call and example_input",
    }
    for i, (tail, message) in enumerate(cases.items()):
        path = tmp_path / f"bad_{i}.py"
        path.write_text(head + tail + "\n")
        with pytest.raises(TargetLoadError, match=message):
            load_target(str(path))
    path = tmp_path / "good.py"
    path.write_text(head + 'example_call = ((jnp.zeros((1, 3)),), {"train": False})\n')
    assert load_target(str(path)).example_kwargs == {"train": False}


def test_keyword_arrays_are_split_per_sample_and_refused_without_the_batch(
    tmp_path: Path,
) -> None:
    """A keyword array with the batch first reaches each sample as its row; one without it is
    refused (which dimension is the batch cannot be known)."""
    source = (
        "import flax.linen as nn\nimport jax.numpy as jnp\n\n\n"
        "class Masked(nn.Module):\n"
        "    @nn.compact\n"
        "    def __call__(self, x, *, mask):\n"
        "        return nn.Dense(3)(x) * mask\n\n\n"
        'example_call = ((jnp.zeros((2, 4)),), {"mask": jnp.ones((2, 3))})\n'
    )
    (tmp_path / "masked.py").write_text(source)
    out = tmp_path / "masked_dynamic.py"
    assert main([str(tmp_path / "masked.py"), "--mode", "dynamic", "-o", str(out)]) == 0
    module = import_file(out)
    hn = hypernetwork(module)()
    x, mask = normal(BATCH, 4), (normal(BATCH, 3, seed=1) > 0).astype(jnp.float32)
    variables = hn.init(jax.random.key(0), x, mask=mask)
    target = import_file(tmp_path / "masked.py").Masked()
    own = target.init(jax.random.key(1), x, mask=mask)
    flat = jnp.broadcast_to(module.flatten_params(own["params"]), (BATCH, module.FLAT_SIZE))
    out, _ = hn.apply(variables, x, mask=mask, generated_params=flat)
    close(out, target.apply(own, x, mask=mask), DYNAMIC, "keyword array per sample")
    with pytest.raises(ValueError, match=r"keyword argument 'mask' has shape \(1, 3\)"):
        hn.apply(variables, x, mask=mask[:1])


@pytest.mark.parametrize("target", ["flax_resnet", "flax_nnx_cnn"])
def test_generated_main_runs_the_targets_example_call(generated: Callable, target: str) -> None:
    """``python file.py`` makes the target file's example call (ResNet: train=False, outside
    pmap; the NNX CNN: its rngs), as the plain target would run it."""
    path = Path(generated(target, "dynamic").__file__)
    assert "inputs, kwargs = example_call" in path.read_text()
    result = run_python([str(path)], cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "generated_params: (2," in result.stdout
