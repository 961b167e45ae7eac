"""The static Torch fast path (issue 18): no flat vector, Linear layers at rank D.

A generated static file's ``forward`` returns ``(output, None)`` by default: each generated
tensor is built from its own chunks and the ``LOW_RANK`` Linear layers never build their weight.
Its reference is the same file's materialising path (``return_params=True``: the flat vector,
``functional_call``) and the plain target holding those weights; numbers must agree to float
rounding, gradients included.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from gen_support import REPO, hypernetwork_class, import_file, target_file
from tolerances import GRAD, STATIC, assert_close
from torch import nn

from hypernn_gen.cli import main

SEED = str(target_file("seed_mlp"))


def generate(tmp_path: Path, target: str, *extra: str, name: str = "gen.py"):
    out = tmp_path / name
    assert main([target, "--backend", "torch", "--mode", "static", *extra, "-o", str(out)]) == 0
    return import_file(out), out.read_text()


def both_paths(hyper: nn.Module, *args: torch.Tensor) -> tuple[list, list]:
    """(output, gradients) of the fast path and of the materialising path, same numbers."""
    results = []
    for fast in (True, False):
        hyper.zero_grad(set_to_none=True)
        out, params = hyper(*args, return_params=not fast)
        assert (params is None) == fast
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in hyper.named_parameters() if p.grad is not None}
        results.append((out.detach(), grads))
    return results[0], results[1]


@pytest.mark.parametrize("extra", [(), ("--generate", "delta"), ("--chunking", "flat")])
def test_fast_path_equals_the_materialising_path_and_the_plain_target(tmp_path, extra) -> None:
    module, text = generate(tmp_path, SEED, *extra)
    torch.manual_seed(0)
    hyper = hypernetwork_class(module)()
    x = torch.randn(6, 8)
    (fast, fast_grads), (slow, slow_grads) = both_paths(hyper, x)
    assert_close(fast, slow, STATIC, "fast vs materialising output")
    assert set(fast_grads) == set(slow_grads) and len(fast_grads) >= 5
    for name, grad in slow_grads.items():
        assert_close(fast_grads[name], grad, GRAD, f"gradient of {name}")
    # the plain target holding the generated weights: an independent computation
    plain = module.make_target()
    flat = hyper.generate_params().detach()
    plain.load_state_dict(hyper.unflatten_params(flat), strict=False)
    assert_close(fast, plain(x).detach(), STATIC, "fast vs the plain target")
    if not extra or extra == ("--generate", "delta"):  # row-aligned chunks: 2 is rank D
        assert module.LOW_RANK == (("2", 2),)
        assert "# rank-D:   2" in text
    else:  # flat chunking: no row fills a chunk exactly
        assert not hasattr(module, "LOW_RANK")


def test_low_rank_layers_never_build_their_weight(tmp_path) -> None:
    module, _ = generate(tmp_path, SEED)
    hyper = hypernetwork_class(module)()
    built: list[tuple[int, ...]] = []
    original = module.StaticWeights.forward

    def spy(ctx, plan, *args):
        values = original(ctx, plan, *args)
        built.extend(tuple(v.shape) for v in values)
        return values

    module.StaticWeights.forward = staticmethod(spy)
    try:
        hyper(torch.randn(3, 8))
    finally:
        module.StaticWeights.forward = staticmethod(original)
    # the Linear "2" gets its table rows (256, 32), its shift (256,) and Wg (256, 32), no weight
    assert (256, 256) not in built and (256, 8) in built and (256, 32) in built


def grads_of(hyper: nn.Module, loss) -> dict[str, torch.Tensor]:  # noqa: ANN001
    params = {n: p for n, p in hyper.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: g for n, g in zip(params, grads, strict=True) if g is not None}


# The static call's generation is one autograd node with its backward written out
# (kernel.torch.StaticWeights): every target shape the committed files cover, both gradient
# settings, in float64 so a wrong term cannot hide in float32 rounding; second derivatives too.
@pytest.mark.parametrize(
    "name, extra",
    [
        ("seed_mlp", ()),
        ("seed_mlp", ("--gradient-scaling", "off")),
        ("seed_mlp", ("--generate", "delta")),
        ("seed_mlp", ("--template-dir", str(REPO / "generated_examples" / "templates"))),
        ("transformer", ()),  # tied head, layer norms, attention, LOW_RANK MLP layers
        ("cnn", ()),  # convolutions: every tensor built, none at rank D
    ],
)
def test_the_written_out_backward_equals_autograd_through_the_flat_vector(
    tmp_path, name, extra
) -> None:
    module, _ = generate(tmp_path, str(target_file(name)), *extra)
    torch.manual_seed(0)
    hyper = hypernetwork_class(module)().double().eval()  # eval: no dropout draws
    with torch.no_grad():  # every parameter away from its init (decode scales of 0 included)
        for p in hyper.parameters():
            p.add_(0.1 * torch.randn_like(p))
    args = {
        "seed_mlp": lambda: torch.randn(4, 8, dtype=torch.float64),
        "transformer": lambda: torch.randint(0, 64, (3, 16)),
        "cnn": lambda: torch.randn(3, 1, 8, 8, dtype=torch.float64),
    }[name]()
    args = (args,)
    fast = hyper(*args)[0]
    slow = hyper(*args, return_params=True)[0]
    assert_close(fast, slow, {"rtol": 1e-12, "atol": 1e-12}, "output")
    weights = [torch.randn_like(fast)]
    fast_grads = grads_of(hyper, (fast * weights[0]).sum())
    slow_grads = grads_of(hyper, (slow * weights[0]).sum())
    assert set(fast_grads) == set(slow_grads) and fast_grads
    for n, g in slow_grads.items():
        assert_close(fast_grads[n], g, {"rtol": 1e-10, "atol": 1e-12}, f"gradient of {n}")
    if name == "transformer":  # torch has no double backward for CPU flash attention
        return
    # second derivatives (meta-learning through the hypernetwork): d |dL/dWg|^2 / d params
    table = hyper.weight_generator.linear.weight
    second = []
    for out in (hyper(*args)[0], hyper(*args, return_params=True)[0]):
        (g,) = torch.autograd.grad((out * weights[0]).sum(), table, create_graph=True)
        second.append(grads_of(hyper, g.square().sum()))
    assert set(second[0]) == set(second[1])
    for n, g in second[1].items():
        assert_close(second[0][n], g, {"rtol": 1e-9, "atol": 1e-12}, f"second derivative, {n}")


def test_a_weight_read_outside_its_layer_is_not_computed_at_rank_d(tmp_path) -> None:
    """A parent that reads ``head.weight`` itself would fail without the weight: the planner's
    meta run sees it and keeps every weight built."""
    target = tmp_path / "reads_weight.py"
    target.write_text(
        "import torch\nfrom torch import nn\n\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.body = nn.Linear(256, 256)\n"
        "        self.head = nn.Linear(256, 256)\n\n"
        "    def forward(self, x):\n"
        "        h = torch.tanh(self.body(x))\n"
        "        return self.head(h) + h @ self.head.weight\n\n\n"
        "example_input = torch.zeros(2, 256)\n"
    )
    module, text = generate(tmp_path, f"{target}:Net", "--chunk-dim", "256")
    assert not hasattr(module, "LOW_RANK") and "# rank-D:" not in text
    hyper = hypernetwork_class(module)()
    (fast, _), (slow, _) = both_paths(hyper, torch.randn(4, 256))
    assert_close(fast, slow, STATIC, "fast vs materialising output")


def test_a_template_with_its_own_weight_generator_keeps_the_flat_vector(tmp_path) -> None:
    templates = tmp_path / "tpl" / "torch"
    templates.mkdir(parents=True)
    (templates / "hypernetwork.py.jinja").write_text(
        '{% extends "builtin/torch/hypernetwork.py.jinja" %}\n'
        "{% block weight_generator %}\n"
        "class {{ ctx.names.weight_generator }}(nn.Module):\n"
        '    """A non-linear generator: the fast path cannot read it."""\n\n'
        "    def __init__(self) -> None:\n"
        "        super().__init__()\n"
        "        self.linear = nn.Linear(EMBEDDING_DIM, CHUNK_DIM)\n\n"
        "    def reset_parameters(self) -> None:\n"
        "        self.linear.reset_parameters()\n\n"
        "    def forward(self, embedding: Tensor) -> Tensor:\n"
        "        return torch.tanh(self.linear(embedding))\n"
        "{% endblock weight_generator %}\n"
    )
    module, text = generate(tmp_path, SEED, "--template-dir", str(tmp_path / "tpl"))
    assert "run_static" not in text and not hasattr(module, "LOW_RANK")
    hyper = hypernetwork_class(module)()
    out, params = hyper(torch.randn(2, 8))
    assert params is not None and params.shape == (module.FLAT_SIZE,)
    flat = hyper.weight_generator(hyper.embedding_module()).reshape(-1)[: module.FLAT_SIZE]
    assert_close(params, hyper.decode(flat), STATIC, "its own generator's output")


def test_a_deep_copy_and_a_reloaded_state_keep_the_fast_path_exact(tmp_path) -> None:
    module, _ = generate(tmp_path, SEED)
    torch.manual_seed(1)
    hyper = hypernetwork_class(module)()
    twin = copy.deepcopy(hyper)
    fresh = hypernetwork_class(module)()
    fresh.load_state_dict(hyper.state_dict())
    x = torch.randn(5, 8)
    want = hyper(x, return_params=True)[0]
    for other in (twin, fresh):
        assert_close(other(x)[0], want, STATIC, "copy vs original")


def test_a_dynamic_template_with_its_own_classes_takes_the_per_sample_path(tmp_path) -> None:
    """The fused path reads the built-in generator's ``linear`` directly: with a non-linear
    generator of the template's own it would silently drop the ``tanh``. The file takes the
    per-sample path instead, and each sample's output is the plain target's with that sample's
    weights (the independent computation)."""
    templates = tmp_path / "tpl" / "torch"
    templates.mkdir(parents=True)
    (templates / "hypernetwork.py.jinja").write_text(
        '{% extends "builtin/torch/hypernetwork.py.jinja" %}\n'
        "{% block weight_generator %}\n"
        "class {{ ctx.names.weight_generator }}(nn.Module):\n"
        '    """A non-linear generator: the fused path cannot read it."""\n\n'
        "    def __init__(self) -> None:\n"
        "        super().__init__()\n"
        "        self.linear = nn.Linear(EMBEDDING_DIM, CHUNK_DIM)\n\n"
        "    def reset_parameters(self) -> None:\n"
        "        self.linear.reset_parameters()\n\n"
        "    def forward(self, embedding: Tensor) -> Tensor:\n"
        "        return 3.0 * torch.tanh(self.linear(embedding))\n"
        "{% endblock weight_generator %}\n"
    )
    out = tmp_path / "dyn.py"
    cmd = [SEED, "--mode", "dynamic", "--template-dir", str(tmp_path / "tpl"), "-o", str(out)]
    assert main(cmd) == 0
    text = out.read_text()
    assert "fusion:   none (the template writes its own weight_generator class)" in text
    assert "run_fused" not in text and "FUSED" not in text
    module = import_file(out)
    torch.manual_seed(0)
    hyper = hypernetwork_class(module)()
    x = torch.randn(3, 8)
    output, _ = hyper(x)
    flat = hyper.generate_params(x).detach()
    for b in range(len(x)):
        plain = module.make_target()
        plain.load_state_dict(hyper.unflatten_params(flat[b]), strict=False)
        assert_close(output[b], plain(x[b : b + 1])[0].detach(), STATIC, f"sample {b}")


def test_under_autocast_the_static_call_takes_the_reference_path(tmp_path) -> None:
    """The written-out backward works in the inputs' dtypes; under autocast the generation runs
    through autograd instead (bfloat16 products, float32 parameters) and trains."""
    module, _ = generate(tmp_path, SEED)
    torch.manual_seed(0)
    hyper = hypernetwork_class(module)()
    x = torch.randn(16, 8)
    want = grads_of(hyper, hyper(x)[0].square().mean())
    spy = []
    original = module.StaticWeights.apply
    module.StaticWeights.apply = lambda *a: spy.append(1) or original(*a)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = hyper(x)[0]
        got = grads_of(hyper, out.float().square().mean())
    finally:
        module.StaticWeights.apply = original
    assert out.dtype == torch.bfloat16 and not spy
    for name, g in want.items():
        cosine = torch.nn.functional.cosine_similarity(got[name].flatten(), g.flatten(), dim=0)
        assert cosine > 0.99, f"gradient of {name} under autocast: cosine {cosine:.4f}"
