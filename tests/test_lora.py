"""--generate lora and --generate delta (issue 17): adapters on a frozen base, Torch.

Generated files against their runtime twins (same parameters, outputs and gradients), dynamic
batches against one-sample calls and against per-sample merged weights run through the plain
target, the exact start at the base model, a frozen base, few trainable parameters, training
runs, --base checkpoints and the command line's refusals.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from gen_support import TARGETS_DIR, hypernetwork_class, import_file
from tolerances import DYNAMIC, GRAD, STATIC, assert_close
from torch import nn
from torch.func import functional_call

from hypernn_gen.cli import main
from hypernn_gen.runtime.lora_torch import TorchLoRAHyperNetwork
from hypernn_gen.runtime.torch import TorchHyperNetwork

TARGET = TARGETS_DIR / "tiny_lm.py"
TASKS = 4
ADAPTED = [
    f"layers.{i}.{name}"
    for i in range(2)
    for name in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "up", "down")
]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def plain_target() -> nn.Module:
    module = import_file(TARGET, "_lora_tiny_lm")
    torch.manual_seed(1)
    return module.TinyLM()


def tokens(batch: int = 3) -> torch.Tensor:
    return torch.randint(0, 48, (batch, 12), generator=torch.Generator().manual_seed(2))


def conditions(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, TASKS, generator=torch.Generator().manual_seed(3))


def generate(tmp_path: Path, *flags: str):  # noqa: ANN201
    out = tmp_path / f"lm_{abs(hash(flags))}.py"
    assert main([f"{TARGET}:TinyLM", *flags, "-o", str(out)]) == 0
    return import_file(out)


@torch.no_grad()
def perturb_b(hypernetwork: nn.Module) -> None:
    """Give the B heads values (they start at zero), so the adapters change the output."""
    gen = torch.Generator().manual_seed(4)
    for head in hypernetwork.generator.heads_b:
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.05)
        head.bias.copy_(torch.randn(head.bias.shape, generator=gen) * 0.05)


def lora_twins(tmp_path: Path, flags: tuple[str, ...], **options):  # noqa: ANN201
    module = generate(tmp_path, "--generate", "lora", *flags)
    plain = plain_target()
    torch.manual_seed(0)
    runtime = TorchHyperNetwork(plain, generate="lora", **options)
    gen = hypernetwork_class(module)(plain)
    assert sorted(gen.state_dict()) == sorted(runtime.state_dict())
    gen.load_state_dict(runtime.state_dict())
    perturb_b(runtime)
    gen.load_state_dict(runtime.state_dict())
    return gen.eval(), runtime.eval(), plain.eval()


def merged_reference(plain: nn.Module, adapters: dict, scaling: float, x, sample=None):  # noqa: ANN001, ANN201
    """The plain target with W + scaling * B @ A for each adapted layer (one sample's adapters)."""
    params = dict(plain.named_parameters())
    for path in ADAPTED:
        a, b = adapters[f"{path}.lora_A"], adapters[f"{path}.lora_B"]
        if sample is not None:
            a, b = a[sample], b[sample]
        params[f"{path}.weight"] = params[f"{path}.weight"] + scaling * b @ a
    return functional_call(plain, params, (x,))


# -- twins ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "options"),
    [
        (("--lora-rank", "4", "--lora-alpha", "8"), {"lora_rank": 4, "lora_alpha": 8.0}),
        (
            ("--lora-generator", "per-layer", "--generator-hidden", "16", "--lora-dropout", "0.1"),
            {"lora_generator": "per-layer", "generator_hidden": (16,), "lora_dropout": 0.1},
        ),
    ],
)
def test_static_lora_matches_runtime_and_merged_weights(tmp_path: Path, flags, options) -> None:
    gen, runtime, plain = lora_twins(tmp_path, flags, **options)
    x = tokens()
    out_g, adapters_g = gen(x)
    out_r, adapters_r = runtime(x)
    assert_close(out_g, out_r, STATIC)
    assert [k for k in adapters_g] == [f"{p}.lora_{w}" for p in ADAPTED for w in "AB"]
    rank = options["lora_rank"] if "lora_rank" in options else 8
    assert adapters_g["layers.0.up.lora_A"].shape == (rank, 32)
    assert adapters_g["layers.0.up.lora_B"].shape == (64, rank)
    scaling = options.get("lora_alpha", rank) / rank
    expected = merged_reference(plain, adapters_r, scaling, x)
    assert_close(out_r, expected, STATIC)
    assert (out_r - plain(x)).abs().max() > 1e-3  # the adapters do change the output
    out_g.square().mean().backward()
    out_r.square().mean().backward()
    for (name, p), q in zip(gen.named_parameters(), runtime.parameters(), strict=True):
        if p.requires_grad:
            assert_close(p.grad, q.grad, GRAD, name)


@pytest.mark.parametrize("generator", ["shared", "per-layer"])
def test_dynamic_lora_per_sample_equals_one_sample_calls_and_merged_weights(
    tmp_path: Path, generator: str
) -> None:
    flags = ("--mode", "dynamic", "--condition-shape", str(TASKS), "--lora-generator", generator)
    options = {"mode": "dynamic", "condition_shape": (TASKS,), "lora_generator": generator}
    gen, runtime, plain = lora_twins(tmp_path, flags, **options)
    x, c = tokens(), conditions()
    out_g, adapters = gen(x, condition=c)
    out_r, _ = runtime(x, condition=c)
    assert_close(out_g, out_r, STATIC)
    assert adapters["layers.1.down.lora_A"].shape == (3, 8, 64)
    for b in range(3):
        one, _ = gen(x[b : b + 1], condition=c[b : b + 1])
        assert_close(out_g[b : b + 1], one, DYNAMIC, f"sample {b}")
        expected = merged_reference(plain, adapters, 1.0, x[b : b + 1], sample=b)
        assert_close(out_g[b : b + 1], expected, DYNAMIC, f"sample {b} merged")
    assert (out_g[0] - out_g[1]).abs().max() > 1e-4  # samples get different adapters
    out_g.sum().backward()
    out_r.sum().backward()
    for (name, p), q in zip(gen.named_parameters(), runtime.parameters(), strict=True):
        if p.requires_grad:
            assert_close(p.grad, q.grad, GRAD, name)


def per_sample_weight_shapes(run, batch: int) -> set:  # noqa: ANN001
    """The shapes ``(batch, out, in)``/``(batch, in, out)`` of an adapted layer among every
    tensor a forward and backward make (recorded op by op with a TorchDispatchMode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    layers = dict(plain_target().named_modules())
    forbidden = {(batch, *layers[p].weight.shape) for p in ADAPTED}
    forbidden |= {(batch, i, o) for _, o, i in forbidden}
    seen: set = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor) and tuple(t.shape) in forbidden:
                    seen.add(tuple(t.shape))
            return out

    with Record():
        run()
    return seen


def test_dynamic_lora_never_forms_per_sample_weights(tmp_path: Path) -> None:
    """Forward and backward of a batch of 5 make no ``(5, out, in)`` tensor; the materialising
    path of a dynamic delta file (``return_params=True``) does, so the check can fail."""
    flags = ("--mode", "dynamic", "--condition-shape", str(TASKS))
    gen, _, _ = lora_twins(tmp_path, flags, mode="dynamic", condition_shape=(TASKS,))
    x, c = tokens(5), conditions(5)
    assert per_sample_weight_shapes(lambda: gen(x, condition=c)[0].sum().backward(), 5) == set()
    delta = hypernetwork_class(generate(tmp_path, "--generate", "delta", *flags))(plain_target())
    run = lambda: delta(x, condition=c, return_params=True)[0].sum().backward()  # noqa: E731
    assert (5, 64, 32) in per_sample_weight_shapes(run, 5)
    # the fused delta path (W x_b + D_b x_b) makes none either (pos_emb, read by indexing,
    # would run the root per sample: excluded)
    fused = generate(tmp_path, "--generate", "delta", "--exclude", "pos_emb", *flags)
    delta = hypernetwork_class(fused)(plain_target())
    assert per_sample_weight_shapes(lambda: delta(x, condition=c)[0].sum().backward(), 5) == set()


# -- the start, the frozen base, the parameter count ---------------------------------------------


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_lora_starts_exactly_at_the_base_and_the_base_is_frozen(mode: str) -> None:
    plain = plain_target().eval()
    before = copy.deepcopy(plain.state_dict())
    hyper = TorchHyperNetwork(
        plain, generate="lora", mode=mode, condition_shape=(TASKS,) if mode == "dynamic" else None
    ).eval()
    x, c = tokens(), conditions()
    out, adapters = hyper(x, condition=c) if mode == "dynamic" else hyper(x)
    assert torch.equal(out, plain(x))  # exactly: B = 0
    assert all(torch.equal(v, torch.zeros_like(v)) for k, v in adapters.items() if "lora_B" in k)
    a = adapters["layers.0.attn.q_proj.lora_A"]
    assert 0.5 < a.std().item() * (3 * 32) ** 0.5 < 1.5  # PEFT's A scale, std 1/sqrt(3 in)
    assert all(not p.requires_grad for p in hyper.target.parameters())
    trainable = {n for n, p in hyper.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("generator.") for n in trainable)
    out.square().mean().backward()
    grads = {n: p.grad for n, p in hyper.named_parameters() if p.grad is not None}
    assert all(grads[n].abs().sum() > 0 for n in trainable if "heads_b" in n)  # B-style zero init
    assert all(p.grad is None for p in hyper.target.parameters())
    torch.optim.SGD([p for p in hyper.parameters() if p.requires_grad], lr=0.1).step()
    assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items())  # not touched
    state = hyper.target.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())


def test_lora_has_few_trainable_parameters() -> None:
    big = nn.ModuleList(
        [nn.Sequential(nn.Linear(256, 1024), nn.Linear(1024, 256)) for _ in range(4)]
    )
    hyper = TorchLoRAHyperNetwork(big, lora_rank=4, embedding_dim=16)
    trainable = sum(p.numel() for p in hyper.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in hyper.target.parameters())
    # one pair of heads per module type, shared by the 4 blocks: (D + 1) * r * (in + out) each,
    # plus the condition vector and the depth (4) and kind (2) embeddings
    d, r = 16, 4
    assert trainable == 2 * (d + 1) * r * (256 + 1024) + d * (1 + 4 + 2)
    assert trainable < frozen / 10
    assert len(hyper.generator.heads_a) == 2


def test_a_lora_training_run_fits_a_shifted_target() -> None:
    """Static LoRA learns to reproduce a target whose adapted weights moved by a low-rank step."""
    plain = plain_target()
    teacher = copy.deepcopy(plain)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for path in ADAPTED:
            w = teacher.get_submodule(path).weight
            w += (
                0.3
                * torch.randn(w.shape[0], 2, generator=gen)
                @ torch.randn(2, w.shape[1], generator=gen)
                / w.shape[1] ** 0.5
            )
    torch.manual_seed(0)
    hyper = TorchHyperNetwork(plain, generate="lora", lora_rank=4)
    optimizer = torch.optim.Adam([p for p in hyper.parameters() if p.requires_grad], lr=3e-3)
    x = torch.randint(0, 48, (16, 12), generator=gen)
    target = teacher(x).detach()
    losses = []
    for _ in range(150):
        loss = (hyper(x)[0] - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])


# -- delta ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_delta_matches_runtime_starts_at_the_base_and_keeps_it_frozen(
    tmp_path: Path, mode: str
) -> None:
    flags = ("--mode", mode, "--condition-shape", str(TASKS)) if mode == "dynamic" else ()
    module = generate(tmp_path, "--generate", "delta", *flags)
    plain = plain_target().eval()
    options = {"condition_shape": (TASKS,)} if mode == "dynamic" else {}
    torch.manual_seed(0)
    runtime = TorchHyperNetwork(plain, generate="delta", mode=mode, **options).eval()
    gen = hypernetwork_class(module)(plain).eval()
    assert sorted(gen.state_dict()) == sorted(runtime.state_dict())
    gen.load_state_dict(runtime.state_dict())
    x, c = tokens(), conditions()
    kwargs = {"condition": c} if mode == "dynamic" else {}
    out_g, flat_g = gen(x, **kwargs, return_params=True)
    out_r, flat_r = runtime(x, **kwargs)
    assert_close(out_g, plain(x), STATIC)  # the delta starts at exactly 0: the base model
    assert torch.equal(out_r, out_g)
    assert torch.equal(flat_r, flat_g)
    # the fused / fast path (no flat vector) equals the runtime twin too
    assert_close(gen(x, **kwargs)[0], out_r, DYNAMIC if mode == "dynamic" else STATIC, "fast")
    assert "base" in dict(gen.named_buffers()) and "base" not in dict(gen.named_parameters())
    out_g.square().mean().backward()
    out_r.square().mean().backward()
    grads = {n: p.grad for n, p in gen.named_parameters()}
    assert grads["weight_generator.linear.weight"].abs().sum() > 0  # zeroed output layer learns
    for (name, p), q in zip(gen.named_parameters(), runtime.parameters(), strict=True):
        assert_close(p.grad, q.grad, GRAD, name)
    base = gen.base.clone()
    torch.optim.SGD(gen.parameters(), lr=0.1).step()
    assert torch.equal(gen.base, base)
    out_after, flat_after = gen(x, **kwargs, **({"return_params": True} if kwargs else {}))
    assert (out_after - out_g).abs().max() > 0  # it moved away from the base
    if mode == "dynamic":  # the batch equals one-sample calls and the plain target per sample
        assert (flat_after[0] - flat_after[1]).abs().max() > 1e-6  # the samples' deltas differ
        for b in range(x.shape[0]):
            one, _ = gen(x[b : b + 1], condition=c[b : b + 1], return_params=True)
            assert_close(one[0], out_after[b], DYNAMIC, f"sample {b} alone")
            weights = gen.unflatten_params(flat_after[b])
            plain_out = functional_call(
                plain, {**dict(plain.named_parameters()), **weights}, x[b : b + 1]
            )
            assert_close(plain_out[0], out_after[b], DYNAMIC, f"sample {b} plain target")


# -- --base checkpoints ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_base_checkpoint_is_the_frozen_base(tmp_path: Path, suffix: str) -> None:
    pretrained = plain_target()
    with torch.no_grad():
        for p in pretrained.parameters():
            p.add_(0.1)
    path = tmp_path / f"base{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_model

        save_model(pretrained, str(path))
    else:
        torch.save(pretrained.state_dict(), path)
    x = tokens()
    expected = pretrained.eval()(x)
    for generate_kind in ("lora", "delta"):
        module = generate(tmp_path, "--generate", generate_kind, "--base", str(path))
        text = Path(module.__file__).read_text()
        base_line = next(line for line in text.splitlines() if line.startswith("# base:"))
        assert base_line.startswith("# base:     checkpoint ") and base_line.endswith(path.name)
        gen = hypernetwork_class(module)().eval()
        torch.manual_seed(0)
        runtime = TorchHyperNetwork(plain_target(), generate=generate_kind, base=str(path)).eval()
        assert_close(gen(x)[0], expected, STATIC, generate_kind)
        assert_close(runtime(x)[0], expected, STATIC, generate_kind)
    bad = {k: v for k, v in pretrained.state_dict().items() if k != "layers.0.up.weight"}
    with pytest.raises(Exception, match="base checkpoint has no 'layers.0.up.weight'"):
        TorchHyperNetwork(plain_target(), generate="lora", base=bad)


# -- the command line -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--lora-rank", "4"), "--lora-rank applies to --generate lora only; add --generate lora"),
        (("--generate", "lora", "--chunk-dim", "8"), "--chunk-dim sizes the chunked weight"),
        (("--generate", "lora", "--lora-dropout", "1.5"), "--lora-dropout must lie in [0, 1)"),
        (("--generate", "lora", "--lora-alpha", "0"), "--lora-alpha must be positive"),
        (("--generate", "delta", "--base", "missing.pt"), "--base missing.pt: no such file"),
        (("--base", "x.pt"), "--base applies to --generate delta or lora only"),
        (("--generate", "lora", "--include", "tok_emb.*"), "'tok_emb' is a Embedding"),
    ],
)
def test_bad_adapter_options_are_refused_in_one_line(
    tmp_path: Path, capsys, flags, message
) -> None:  # noqa: ANN001
    code = main([f"{TARGET}:TinyLM", *flags, "-o", str(tmp_path / "x.py")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_include_selects_the_adapted_layers_and_the_header_records_them(tmp_path: Path) -> None:
    module = generate(tmp_path, "--generate", "lora", "--include", "*.attn.q_proj.*")
    assert [a.path for a in module.ADAPTERS] == ["layers.0.attn.q_proj", "layers.1.attn.q_proj"]
    assert [(a.depth, a.kind) for a in module.ADAPTERS] == [(0, 0), (1, 0)]
    text = Path(module.__file__).read_text()
    assert "# layout:   2 LoRA-adapted Linear layers, 1,024 adapter values per set" in text
    assert "# base:     the target's own weights (TinyLM())" in text
    default = generate(tmp_path, "--generate", "lora")
    assert [a.path for a in default.ADAPTERS] == ADAPTED  # not the LM head


def test_inspect_shows_each_adapted_layer_its_base_shape_rank_and_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    path = tmp_path / "base.pt"
    torch.save(plain_target().state_dict(), path)
    args = ["inspect", f"{TARGET}:TinyLM", "--generate", "lora", "--lora-rank", "4"]
    assert main([*args, "--base", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    layers = dict(plain_target().named_modules())
    assert [row["path"] for row in report["layers"]] == ADAPTED
    for row in report["layers"]:
        weight = layers[row["path"]].weight  # (out, in): A is (r, in), B (out, r)
        assert row["base_shape"] == list(weight.shape) and row["rank"] == 4
        assert row["adapter_values"] == 4 * (weight.shape[0] + weight.shape[1]), row
    assert report["adapter_values"] == sum(row["adapter_values"] for row in report["layers"])
    assert report["base_values"] == sum(layers[p].weight.numel() for p in ADAPTED)
    assert report["base"].startswith("checkpoint ") and report["base"].endswith("base.pt")
    runtime = TorchHyperNetwork(plain_target(), generate="lora", lora_rank=4)
    trainable = sum(p.numel() for p in runtime.parameters() if p.requires_grad)
    assert report["generator_params"] == trainable
    assert main(args) == 0  # the table: one row per layer with these numbers
    text = capsys.readouterr().out
    assert "base: the target's own weights" in text
    assert "layers.0.up           (64, 32)        0     4     4             384" in text


def test_adapter_options_have_the_same_names_in_cli_config_and_runtime() -> None:
    import inspect

    from hypernn_gen.config import load_jobs  # noqa: F401 - the pyproject side converts by key
    from hypernn_gen.options import BY_KEY, convert

    torch_args = set(inspect.signature(TorchHyperNetwork).parameters)
    lora_args = set(inspect.signature(TorchLoRAHyperNetwork).parameters)
    assert {"generate", "base"} <= torch_args
    assert {"lora_rank", "lora_alpha", "lora_dropout", "lora_generator", "base"} <= lora_args
    assert convert(BY_KEY["lora-alpha"], 16, "pyproject.toml") == 16.0
    assert convert(BY_KEY["generate"], "lora", "pyproject.toml") == "lora"
    with pytest.raises(Exception, match="lora-dropout must be a number"):
        convert(BY_KEY["lora-dropout"], "high", "pyproject.toml")


@pytest.mark.parametrize("name", ["tiny_lm_lora_dynamic.py", "seed_mlp_delta_static.py"])
def test_committed_adapter_files_carry_the_kernel_verbatim(name: str) -> None:
    import ast

    from hypernn_gen.extract import KERNEL_BEGIN, KERNEL_END

    text = (TARGETS_DIR.parent / name).read_text()
    begin = text.index(KERNEL_BEGIN + "\n")
    section = text[begin : text.index(KERNEL_END + "\n", begin)]
    kernel = TARGETS_DIR.parents[1] / "hypernn_gen" / "kernel"
    source = (kernel / "torch.py").read_text() + (kernel / "lora_torch.py").read_text()
    tree = ast.parse(section)
    assert tree.body
    for stmt in tree.body:
        assert ast.get_source_segment(section, stmt) in source
    assert "hypernn_gen" not in text.replace("hypernn_gen/kernel", "")


def test_delta_hypernetwork_built_on_meta_gets_its_base_back() -> None:
    module = import_file(TARGETS_DIR.parent / "seed_mlp_delta_static.py")
    cls = hypernetwork_class(module)
    with torch.device("meta"):
        lazy = cls()
    lazy.to_empty(device="cpu")
    lazy.reset_parameters()
    assert torch.isfinite(lazy.base).all() and lazy.base.abs().sum() > 0  # a real target's values
    assert not lazy.weight_generator.linear.weight.any()  # the zeroed output layer again
    x = torch.randn(3, 8)
    out, _ = lazy(x)
    plain = module.make_target()
    params = lazy.unflatten_params(lazy.base)
    assert_close(out, functional_call(plain, params, (x,)), STATIC)


# -- Conv2d ---------------------------------------------------------------------------------------


def test_conv2d_lora_generated_runtime_merged_weights_and_peft(tmp_path: Path) -> None:
    """LoRA on Conv2d layers (PEFT's: A a convolution like the layer's, B 1x1): a generated file
    and its runtime twin, the exact start, per-sample adapters against each sample's merged
    weights run through the plain CNN, and PEFT loading the export of one condition."""
    from hypernn_gen.select import path_filter

    target = TARGETS_DIR / "cnn.py"
    out = tmp_path / "cnn_lora.py"
    include = ("--include", "features.0.*", "--include", "features.3.*")
    flags = (
        "--generate",
        "lora",
        "--mode",
        "dynamic",
        "--condition-shape",
        "3",
        "--lora-rank",
        "2",
    )
    assert main([f"{target}:SmallCNN", *flags, *include, "-o", str(out)]) == 0
    module = import_file(out)
    assert [(a.path, a.out_features, a.in_features) for a in module.ADAPTERS] == [
        ("features.0", 8, 9),
        ("features.3", 16, 72),
    ]
    torch.manual_seed(1)
    plain = import_file(target, "_lora_cnn").SmallCNN().eval()
    torch.manual_seed(0)
    predicate = path_filter(("features.0.*", "features.3.*"))
    runtime = TorchHyperNetwork(
        plain, generate="lora", mode="dynamic", condition_shape=(3,), lora_rank=2, include=predicate
    ).eval()
    gen = hypernetwork_class(module)(plain).eval()
    gen.load_state_dict(runtime.state_dict())
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    c = torch.randn(3, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(gen(x, condition=c)[0], plain(x))  # exactly: B = 0
    perturb_b(runtime)
    gen.load_state_dict(runtime.state_dict())
    out_g, adapters = gen(x, condition=c)
    out_r, _ = runtime(x, condition=c)
    assert_close(out_g, out_r, STATIC)
    assert adapters["features.3.lora_A"].shape == (3, 2, 72)
    with torch.no_grad():
        for b in range(3):
            merged = copy.deepcopy(plain)
            merged.load_state_dict(runtime.merged_state_dict(c[b : b + 1]))
            assert_close(out_r[b : b + 1], merged(x[b : b + 1]), DYNAMIC, f"sample {b}")
        assert (out_r[0] - plain(x[:1])[0]).abs().max() > 1e-4  # the adapters act
    out_g.sum().backward()
    out_r.sum().backward()
    for (name, p), q in zip(gen.named_parameters(), runtime.parameters(), strict=True):
        if p.requires_grad:
            assert_close(p.grad, q.grad, GRAD, name)
    peft = pytest.importorskip("peft")
    runtime.save_peft(tmp_path / "adapter", condition=c[1:2])
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(plain), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert_close(loaded(x[1:2]), out_r[1:2], DYNAMIC, "peft")


# -- dynamic delta on the fused path: W x_b + D_b x_b, no per-sample weights ----------------------

FUSED_DELTA_CASES = {
    "seed-mlp": ("seed_mlp.py", (), lambda b, g: torch.randn(b, 8, generator=g)),
    "seed-mlp-flat": ("seed_mlp.py", ("--chunking", "flat"), lambda b, g: torch.randn(b, 8, generator=g)),
    "cnn": ("cnn.py:SmallCNN", (), lambda b, g: torch.randn(b, 1, 8, 8, generator=g)),
    "cnn-shared-convs": ("cnn.py:SmallCNN", (), lambda b, g: torch.randn(b, 1, 8, 8, generator=g)),
    "transformer": ("transformer.py", (), lambda b, g: torch.randint(0, 64, (b, 10), generator=g)),
    "transformer-fused": (  # without pos_emb the root runs once: embedding, MHA, norms fused
        "transformer.py", ("--exclude", "pos_emb"), lambda b, g: torch.randint(0, 64, (b, 10), generator=g)
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(FUSED_DELTA_CASES))
def test_fused_dynamic_delta_equals_the_materialising_path_and_starts_at_the_base(
    tmp_path: Path, case: str
) -> None:
    """``--generate delta --mode dynamic`` runs fused (the base's product shared by the batch):
    at the start exactly the plain target; with a nonzero delta, outputs and every gradient equal
    the materialising path's (``return_params=True``: base + delta per sample, vmap)."""
    target, flags, make_input = FUSED_DELTA_CASES[case]
    out = tmp_path / f"{case}.py"
    args = [str(TARGETS_DIR / target), "--generate", "delta", "--mode", "dynamic", *flags]
    assert main([*args, "--condition-shape", str(TASKS), "-o", str(out)]) == 0
    module = import_file(out, f"_fused_delta_{case.replace('-', '_')}")
    source = out.read_text()
    assert "install_fusion(" in source and "delta=True" in source
    if case == "cnn-shared-convs":  # the shared convolutions, not one grouped convolution
        module.GROUPED_CONV_LIMIT = 0
    torch.manual_seed(0)
    hyper = hypernetwork_class(module)()
    hyper.train(case.startswith("transformer"))  # no dropout; MHA's eval fast path has no backward
    plain = hyper.target  # its generated tensors are gone: rebuild the base model from `base`
    base = hyper.unflatten_params(hyper.base.expand(1, -1))
    gen = torch.Generator().manual_seed(6)
    x, c = make_input(3, gen), conditions(3)
    fused, params = hyper(x, condition=c)
    assert params is None
    reference = torch.stack(
        [
            functional_call(plain, {k: v[0] for k, v in base.items()}, (x[b : b + 1],))[0]
            for b in range(3)
        ]
    )
    assert torch.equal(hyper(x, condition=c, return_params=True)[1], hyper.base.expand(3, -1))
    assert_close(fused, reference, DYNAMIC, "the start: the base model")
    with torch.no_grad():  # a nonzero delta, different per sample
        for p in hyper.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    fused, _ = hyper(x, condition=c)
    fused.square().mean().backward()
    grads = {n: p.grad for n, p in hyper.named_parameters()}
    assert grads["weight_generator.linear.weight"] is not None
    hyper.zero_grad(set_to_none=True)
    materialised, flat = hyper(x, condition=c, return_params=True)
    assert (flat - hyper.base).abs().amax(1).min() > 1e-3  # every sample has a nonzero delta
    assert (materialised - reference).abs().max() > 1e-3  # the delta changes the output
    assert_close(fused, materialised, DYNAMIC, "outputs")
    materialised.square().mean().backward()
    for name, p in hyper.named_parameters():
        if p.grad is None or grads[name] is None:  # a parameter neither path uses
            assert p.grad is None and grads[name] is None, name
        else:
            assert_close(grads[name], p.grad, GRAD, name)
    assert "base" not in dict(hyper.named_parameters())
