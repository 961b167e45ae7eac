"""Generated dynamic files for real library models (transformers, diffusers) from tiny configs.

The targets live in ``tests/real/targets`` (built from configs, nothing downloaded). For each:

* dynamic with the target's own weights for every sample equals the plain target on the batch;
* the fused path (no per-sample weights built) equals the materialising path (every sample
  through the target alone under vmap), outputs and the gradients of every parameter;
* one training step (train mode, fused path) gives finite, nonzero gradients to the embedding
  and the weight generator.

GPT-2 and Llama return a ``ModelOutput`` holding a ``DynamicCache`` (an object holding tensors),
T5 and the UNet need keyword tensors (``decoder_input_ids=``, ``timestep=``) given by the
targets' ``example_call``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from gen_support import hypernetwork_class, import_file

from hypernn_gen.cli import main

pytestmark = pytest.mark.real

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

TARGETS = Path(__file__).parent / "targets"
NAMES = ("hf_bert", "hf_gpt2", "hf_llama", "hf_t5", "diffusers_unet")


def _call(name: str) -> tuple[tuple, dict]:
    """A batch of 2 with real values (ids in the vocabulary, distinct timesteps)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (2, 8), generator=g)
    if name == "hf_t5":
        return (ids,), {"decoder_input_ids": torch.randint(0, 100, (2, 5), generator=g)}
    if name == "diffusers_unet":
        return (torch.randn(2, 3, 8, 8, generator=g),), {"timestep": torch.tensor([3, 7])}
    return (ids,), {}


def _main(out: Any) -> torch.Tensor:
    """The main output tensor: ``.sample`` (diffusers), else element 0 of the ModelOutput."""
    return out.sample if hasattr(out, "sample") else out[0]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModuleType]:
    out = tmp_path_factory.mktemp("real_generated")
    files = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in NAMES:
            path = out / f"{name}_dynamic.py"
            assert main([str(TARGETS / f"{name}.py"), "--mode", "dynamic", "-o", str(path)]) == 0
            files[name] = import_file(path)
    return files


def _plain(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return import_file(TARGETS / f"{name}.py").make_target().eval()


@pytest.mark.parametrize("name", NAMES)
def test_identical_weights_equal_the_plain_target_on_the_batch(
    generated: dict[str, ModuleType], name: str
) -> None:
    module = generated[name]
    target = _plain(name)
    hyper = hypernetwork_class(module)(target).eval()
    args, kwargs = _call(name)
    flat = hyper.flatten_params(dict(target.named_parameters())).expand(2, -1)
    with torch.no_grad():
        expected = target(*args, **kwargs)
        got = hyper(*args, generated_params=flat, **kwargs)[0]
    torch.testing.assert_close(_main(got), _main(expected), rtol=1e-5, atol=1e-5)
    if name in ("hf_gpt2", "hf_llama"):  # the cache comes back too, batch first
        cache, own = got.past_key_values, expected.past_key_values
        assert type(cache) is type(own)
        torch.testing.assert_close(cache.layers[0].keys, own.layers[0].keys)


@pytest.mark.parametrize("name", NAMES)
def test_fused_equals_the_materialising_path(generated: dict[str, ModuleType], name: str) -> None:
    torch.manual_seed(0)
    hyper = hypernetwork_class(generated[name])().eval()
    args, kwargs = _call(name)
    results = []
    for return_params in (False, True):
        hyper.zero_grad()
        out, _ = hyper(*args, return_params=return_params, **kwargs)
        _main(out).square().mean().backward()
        grads = {n: p.grad.clone() for n, p in hyper.named_parameters() if p.grad is not None}
        results.append((_main(out).detach(), grads))
    (fused, fused_grads), (materialised, grads) = results
    torch.testing.assert_close(fused, materialised, rtol=1e-4, atol=1e-5)
    assert fused_grads.keys() == grads.keys() and grads
    # float32 noise, relative to the largest gradient: the two paths sum the embedding's
    # gradient over different products (its gradient multiplier scales that noise too)
    scale = max(float(g.abs().max()) for g in grads.values())
    for n, g in grads.items():
        torch.testing.assert_close(fused_grads[n], g, rtol=1e-3, atol=5e-5 * scale)


@pytest.mark.parametrize("name", NAMES)
def test_one_training_step_gives_finite_nonzero_gradients(
    generated: dict[str, ModuleType], name: str
) -> None:
    torch.manual_seed(0)
    hyper = hypernetwork_class(generated[name])().train()
    args, kwargs = _call(name)
    out, _ = hyper(*args, **kwargs)
    assert torch.isfinite(_main(out)).all()
    _main(out).square().mean().backward()
    grads = {n: p.grad for n, p in hyper.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    for part in ("embedding_module", "weight_generator"):
        assert sum(float(g.norm()) for n, g in grads.items() if n.startswith(part)) > 0, part
