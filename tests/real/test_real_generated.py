"""Generated dynamic files for real library models (transformers, diffusers) from tiny configs.

The targets live in ``tests/real/targets`` (built from configs, nothing downloaded). For each:

* dynamic with the target's own weights for every sample equals the plain target on the batch;
* the fused path (no per-sample weights built) equals the materialising path (every sample
  through the target alone under vmap), outputs and the gradients of every parameter;
* one training step (train mode, fused path) gives finite, nonzero gradients to the embedding
  and the weight generator.

GPT-2 and Llama return a ``ModelOutput`` holding a ``DynamicCache`` (an object holding tensors),
T5 and the UNet need keyword tensors (``decoder_input_ids=``, ``timestep=``) given by the
targets' ``example_call``; so does BERT with a padding ``attention_mask=`` (split per sample under
vmap, whole on the fused path, where the target runs once on the batch). The vision models
(torchvision/timm style: ResNet-18, MobileNetV3, ConvNeXt, ViT) run on 32x32 (ViT: 16x16) images.
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
VISION = {  # torchvision/timm-style models (tests/real/targets) and their image sizes
    "tv_resnet18": 32,
    "tv_mobilenetv3": 32,
    "timm_convnext": 32,
    "timm_vit": 16,
}
NAMES = ("hf_bert", "hf_bert_masked", "hf_gpt2", "hf_llama", "hf_t5", "diffusers_unet", *VISION)


def _call(name: str) -> tuple[tuple, dict]:
    """A batch of 2 with real values (ids in the vocabulary, distinct timesteps)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (2, 8), generator=g)
    if name == "hf_t5":
        return (ids,), {"decoder_input_ids": torch.randint(0, 100, (2, 5), generator=g)}
    if name in VISION:
        return (torch.randn(2, 3, VISION[name], VISION[name], generator=g),), {}
    if name == "diffusers_unet":
        return (torch.randn(2, 3, 8, 8, generator=g),), {"timestep": torch.tensor([3, 7])}
    if name == "hf_bert_masked":
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[1, 5:] = 0  # the second sequence is padded
        return (ids,), {"attention_mask": mask}
    return (ids,), {}


def _main(out: Any) -> torch.Tensor:
    """The main output tensor: a tensor (the vision models' logits), ``.sample`` (diffusers),
    else element 0 of the ModelOutput."""
    if isinstance(out, torch.Tensor):
        return out
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


# Dynamic train mode normalises each sample alone (per-sample BatchNorm statistics): ResNet-18's
# layer4 sees a 1x1 map at 32x32, one value per channel, refused in one line (as the plain
# target refuses a batch of one); conditional BatchNorm (batch statistics) will run it.
ONE_VALUE_PER_CHANNEL = "Expected more than 1 value per channel when training"


@pytest.mark.parametrize("name", NAMES)
def test_one_training_step_gives_finite_nonzero_gradients(
    generated: dict[str, ModuleType], name: str
) -> None:
    torch.manual_seed(0)
    hyper = hypernetwork_class(generated[name])().train()
    args, kwargs = _call(name)
    if name == "tv_resnet18":
        try:
            out, _ = hyper(*args, **kwargs)
        except ValueError as exc:  # per-sample statistics: refused in one clear line
            message = str(exc)
            assert "\n" not in message and message.startswith(ONE_VALUE_PER_CHANNEL), message
            assert "(1, 32, 1, 1) per sample" in message and "normalised alone" in message
            with pytest.raises(ValueError, match=ONE_VALUE_PER_CHANNEL):  # as the target does
                _plain(name).train()(args[0][:1])
            # 64x64 images (layer4: 2x2), conditioned on the 32x32 ones
            kwargs = {"condition": args[0]}
            args = (torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)),)
    out, _ = hyper(*args, **kwargs)
    assert torch.isfinite(_main(out)).all()
    _main(out).square().mean().backward()
    grads = {n: p.grad for n, p in hyper.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    for part in ("embedding_module", "weight_generator"):
        assert sum(float(g.norm()) for n, g in grads.items() if n.startswith(part)) > 0, part


def test_in_place_randomness_runs_on_both_paths(generated: dict[str, ModuleType]) -> None:
    """MobileNetV3's DropPath (``x.new_empty(...).bernoulli_()``, in place) in train mode: the
    fused and the materialising path both run the whole batch at once (no vmap, where in-place
    randomness cannot run), finite; in eval mode (DropPath off) the two paths agree."""
    torch.manual_seed(0)
    hyper = hypernetwork_class(generated["tv_mobilenetv3"])().train()
    args, _ = _call("tv_mobilenetv3")
    out, params = hyper(*args)
    assert params is None and torch.isfinite(out).all()
    out, params = hyper(*args, return_params=True)
    assert torch.isfinite(out).all() and params.shape == (2, generated["tv_mobilenetv3"].FLAT_SIZE)
    hyper.eval()
    fused, _ = hyper(*args)
    materialised, _ = hyper(*args, return_params=True)
    torch.testing.assert_close(fused, materialised, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("return_params", [False, True], ids=["fused", "vmap"])
def test_the_attention_mask_reaches_each_sample(
    generated: dict[str, ModuleType], return_params: bool
) -> None:
    """BERT's attention_mask on the fused (whole batch, no vmap) path and under vmap: sample 0
    (no padding) gets what it gets without a mask, sample 1 (padded) its masked result, which is
    the plain target's on the batch with sample 1's own weights, and differs from no mask."""
    torch.manual_seed(0)
    module = generated["hf_bert_masked"]
    hyper = hypernetwork_class(module)().eval()
    (ids,), kwargs = _call("hf_bert_masked")
    with torch.no_grad():
        masked, _ = hyper(ids, return_params=return_params, **kwargs)
        plain, _ = hyper(ids, return_params=return_params)
        flat = hyper.generate_params(ids)
    masked, plain = _main(masked), _main(plain)
    torch.testing.assert_close(masked[0], plain[0], rtol=1e-5, atol=1e-5)
    assert (masked[1, :5] - plain[1, :5]).abs().max() > 1e-3  # the padding is not attended
    target = _plain("hf_bert_masked")
    target.load_state_dict(hyper.unflatten_params(flat[1]), strict=False)
    with torch.no_grad():
        alone = _main(target(ids[1:], attention_mask=kwargs["attention_mask"][1:]))
    torch.testing.assert_close(masked[1:], alone, rtol=1e-4, atol=1e-5)
