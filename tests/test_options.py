"""Hypernetwork options (issue 7): each lever generates a file that is checked numerically.

--chunking, --generator-hidden, --init-scheme, --condition-shape/--condition-dtype and
--embedding-hidden: the generated Torch module against the runtime twin built with the same
keyword arguments, and each option's effect against an independent computation (offsets on
chunk boundaries, Chang et al.'s variances, unit-variance generator output). The Flax side is in
test_generate_flax.py (``test_options_match_runtime_with_the_same_options``).
"""

from __future__ import annotations

import argparse
import inspect
import math
import textwrap
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from gen_support import TARGETS_DIR, hypernetwork_class, import_file, make_plain_target
from tolerances import DYNAMIC, GRAD, STATIC, assert_close

from hypernn_gen.cli import _generate_arguments, main
from hypernn_gen.design import aligned_layout, chunk_layout
from hypernn_gen.errors import TraceError
from hypernn_gen.generate import GenerateOptions
from hypernn_gen.runtime.flax import FlaxHyperNetwork, NNXHyperNetwork
from hypernn_gen.runtime.torch import TorchHyperNetwork
from hypernn_gen.trace_torch import trace_module

#: the hypernetwork options of GenerateOptions (the rest say where and how to write the file)
HYPER_OPTIONS = {
    "mode",
    "embedding_dim",
    "num_embeddings",
    "chunk_dim",
    "chunking",
    "generator_hidden",
    "init_scheme",
    "condition_shape",
    "embedding_hidden",
    "generate",  # weights|delta (lora: its own classes in Flax, a dispatch in Torch)
    "base",
}


def generate(tmp_path: Path, target: str, *flags: str, mode: str = "static"):  # noqa: ANN201
    out = tmp_path / f"{target}_{mode}_{abs(hash(flags))}.py"
    args = [str(TARGETS_DIR / f"{target}.py"), "--mode", mode, *flags, "-o", str(out)]
    if target == "seed_mlp":
        args += ["--input-shape", "1,8"]
    assert main(args) == 0
    return import_file(out)


def twins(module, target: str, **options):  # noqa: ANN001, ANN201
    """The generated hypernetwork and its runtime twin, with the same parameters."""
    torch.manual_seed(0)
    plain = make_plain_target(target)
    runtime = TorchHyperNetwork(plain, **options)
    gen = hypernetwork_class(module)(plain)
    assert sorted(gen.state_dict()) == sorted(runtime.state_dict())
    gen.load_state_dict(runtime.state_dict())
    return gen, runtime


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}


# -- every option together, against the runtime ---------------------------------------------------


@pytest.mark.parametrize(
    ("target", "mode", "flags", "options"),
    [
        (
            "cnn",
            "static",
            ("--chunking", "tensor", "--generator-hidden", "16,8", "--init-scheme", "hyperfan-out"),
            {"chunking": "tensor", "generator_hidden": (16, 8), "init_scheme": "hyperfan-out"},
        ),
        (
            "cnn",
            "dynamic",
            ("--chunking", "tensor", "--init-scheme", "hyperfan-in", "--embedding-hidden", "32,16"),
            {"chunking": "tensor", "init_scheme": "hyperfan-in", "embedding_hidden": (32, 16)},
        ),
        (
            "seed_mlp",
            "dynamic",
            ("--generator-hidden", "48", "--num-embeddings", "300", "--chunking", "tensor"),
            {"generator_hidden": (48,), "num_embeddings": 300, "chunking": "tensor"},
        ),
    ],
)
def test_generated_with_options_matches_the_runtime_with_the_same_options(
    tmp_path: Path, target: str, mode: str, flags: tuple[str, ...], options: dict
) -> None:
    module = generate(tmp_path, target, *flags, mode=mode)
    if mode == "dynamic":
        options["condition_dim"] = 8 if target == "seed_mlp" else 64
    gen, runtime = twins(module, target, mode=mode, **options)
    x = torch.randn(6, 8) if target == "seed_mlp" else torch.randn(6, 1, 8, 8)
    tol = STATIC if mode == "static" else DYNAMIC
    for train in (True, False):
        gen.train(train)
        runtime.train(train)
        torch.manual_seed(1)
        expected, expected_flat = runtime(x)
        expected.square().mean().backward()
        torch.manual_seed(1)
        kwargs = {"return_params": True} if mode == "dynamic" else {}
        out, flat = gen(x, **kwargs)
        out.square().mean().backward()
        assert_close(out, expected, tol, f"output (train={train})")
        assert_close(flat, expected_flat, tol, f"generated_params (train={train})")
        ours, theirs = grads(gen), grads(runtime)
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert_close(ours[name], theirs[name], GRAD, f"grad of {name} (train={train})")
        gen.zero_grad()
        runtime.zero_grad()
    # the padding between tensors stays zero, and the layout round trip holds with it
    taken = torch.zeros(module.FLAT_SIZE, dtype=torch.bool)
    for p in module.GENERATED:
        taken[p.offset : p.offset + p.size] = True
    assert not taken.all()
    assert flat[..., ~taken].abs().max() == 0
    one = flat if mode == "static" else flat[0]
    assert torch.equal(gen.flatten_params(gen.unflatten_params(one)), one.detach())


# -- chunking --------------------------------------------------------------------------------------


def test_tensor_chunking_starts_every_tensor_on_a_chunk_and_wastes_less_than_a_chunk_each(
    tmp_path: Path,
) -> None:
    module = generate(tmp_path, "cnn", "--chunking", "tensor", "--chunk-dim", "50")
    assert module.CHUNK_DIM == 50
    end = 0
    for p in module.GENERATED:
        assert p.offset % 50 == 0 and end <= p.offset < end + 50
        end = p.offset + p.size
    assert module.FLAT_SIZE == -(-end // 50) * 50
    assert module.NUM_EMBEDDINGS == module.FLAT_SIZE // 50
    # each chunk belongs to one tensor: no chunk index is shared by two tensors
    chunks = [set(range(p.offset // 50, -(-(p.offset + p.size) // 50))) for p in module.GENERATED]
    assert sum(map(len, chunks)) == len(set().union(*chunks))


def test_tensor_chunking_with_num_embeddings_picks_the_smallest_chunk_that_fits() -> None:
    layout = trace_module(make_plain_target("cnn"))
    sizes = [t.size for t in layout.generated]
    aligned, chunking = chunk_layout(layout, num_embeddings=40, chunking="tensor")
    fits = lambda c: sum(-(-s // c) for s in sizes) <= 40  # noqa: E731
    assert fits(chunking.chunk_dim) and not fits(chunking.chunk_dim - 1)
    assert chunking.num_embeddings == 40
    assert aligned == aligned_layout(layout, chunking.chunk_dim)
    n = len(sizes)
    with pytest.raises(TraceError, match=rf"{n} tensors need num_embeddings >= {n}, got {n - 1}"):
        chunk_layout(layout, num_embeddings=n - 1, chunking="tensor")


# -- init schemes ----------------------------------------------------------------------------------


def chang_std(t, scheme: str, layout) -> float:  # noqa: ANN001
    """Chang et al. 2020's output std for a weight (fan from torch's own helper) or a bias."""
    owner = t.path.rpartition(".")[0]
    weight = layout.find(f"{owner}.weight")
    fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(weight.shape))
    has_bias = any(u.path == f"{owner}.bias" for u in layout.generated)
    if t.path.endswith(".weight"):
        fan = fan_in if scheme == "hyperfan-in" else fan_out
        return math.sqrt((0.5 if has_bias else 1.0) / fan)
    return math.sqrt(0.5) if scheme == "hyperfan-in" else math.sqrt(max(0.0, 1 - fan_in / fan_out))


@pytest.mark.parametrize("scheme", ["hyperfan-in", "hyperfan-out"])
def test_hyperfan_schemes_give_the_variances_of_chang_et_al(tmp_path: Path, scheme: str) -> None:
    """The decode starts at Chang et al.'s std for every weight and bias, and the weights the
    hypernetwork actually generates at init have that std (raw output has unit variance)."""
    module = generate(tmp_path, "seed_mlp", "--init-scheme", scheme, "--embedding-dim", "64")
    layout = trace_module(make_plain_target("seed_mlp"))
    for p in module.GENERATED:
        assert p.init_mean == 0.0
        assert p.init_std == pytest.approx(chang_std(layout.find(p.path), scheme, layout), rel=1e-5)
    torch.manual_seed(0)
    hyper = hypernetwork_class(module)()
    with torch.no_grad():
        params = hyper.unflatten_params(hyper.generate_params())
    big = [p for p in module.GENERATED if p.size >= 1024]
    for p in big:
        measured = params[p.path].std().item()
        assert measured == pytest.approx(p.init_std, rel=0.15), p.path
    # hyperfan-in keeps the pre-activation variance of the first layer near the input's
    if scheme == "hyperfan-in":
        x = torch.randn(4096, 8)
        w, b = params["0.weight"], params["0.bias"]
        assert (x @ w.T + b).var().item() == pytest.approx(1.0, rel=0.25)


def test_default_init_scheme_keeps_the_targets_own_statistics(tmp_path: Path) -> None:
    module = generate(tmp_path, "seed_mlp")
    linear = torch.nn.Linear(256, 256)  # kaiming_uniform(a=sqrt(5)): std 1/sqrt(3 fan_in)
    slot = next(p for p in module.GENERATED if p.path == "2.weight")
    assert slot.init_std == pytest.approx(1 / math.sqrt(3 * 256), rel=1e-4)
    assert slot.init_std == pytest.approx(linear.weight.std().item(), rel=0.02)


# -- weight generator hidden layers ----------------------------------------------------------------


def test_generator_hidden_layers_give_unit_variance_output_and_no_fusion(tmp_path: Path) -> None:
    module = generate(tmp_path, "seed_mlp", "--generator-hidden", "128,64", "--embedding-dim", "64")
    assert module.GENERATOR_HIDDEN == (128, 64)
    torch.manual_seed(0)
    generator = module.SeedMlpWeightGenerator()
    widths = [m.out_features for m in generator.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [128, 64, module.CHUNK_DIM]
    with torch.no_grad():
        raw = generator(torch.randn(2048, module.EMBEDDING_DIM))
    assert raw.var().item() == pytest.approx(1.0, rel=0.2)
    assert raw.mean().abs().item() < 0.1

    dynamic = generate(tmp_path, "seed_mlp", "--generator-hidden", "32", mode="dynamic")
    source = Path(dynamic.__file__).read_text()
    assert "# fusion:   no layer fused" in source and "FUSED" not in vars(dynamic)


# -- dynamic: the conditioning input and the embedding network ---------------------------------------


def test_condition_shape_makes_weights_from_a_separate_condition(tmp_path: Path) -> None:
    flags = ("--condition-shape", "2,3", "--condition-dtype", "float64", "--embedding-hidden", "16")
    module = generate(tmp_path, "seed_mlp", *flags, mode="dynamic")
    assert module.CONDITION_SHAPE == (2, 3) and module.EMBEDDING_HIDDEN == (16,)
    gen, runtime = twins(
        module, "seed_mlp", mode="dynamic", condition_shape=(2, 3), embedding_hidden=(16,)
    )
    x, condition = torch.randn(5, 8), torch.randn(5, 2, 3, dtype=torch.float64)
    expected, expected_flat = runtime(x, condition=condition)
    fused, _ = gen(x, condition=condition)
    out, flat = gen(x, condition=condition, return_params=True)
    assert_close(fused, expected, DYNAMIC, "fused")
    assert_close(out, expected, DYNAMIC, "materialised")
    assert_close(flat, expected_flat, DYNAMIC, "generated_params")
    # the condition decides the weights: sample 0 with sample 1's condition gets sample 1's
    swapped, _ = gen(x[:2], condition=condition[[1, 1]])
    assert not torch.allclose(swapped[0], out[0])
    with pytest.raises(ValueError, match=r"generated for \(batch, \*\(2, 3\)\); pass condition="):
        gen(x)
    header = Path(module.__file__).read_text()
    assert "--condition-shape 2,3 --condition-dtype float64 --embedding-hidden 16" in header
    assert "torch.float64" in header  # the smoke example builds its condition with that dtype


# -- CLI, pyproject and runtime share the option names ------------------------------------------------


def test_every_option_has_the_same_name_in_cli_config_and_runtimes(tmp_path: Path) -> None:
    fields_ = {f.name for f in fields(GenerateOptions)}
    assert fields_ >= HYPER_OPTIONS
    parser = argparse.ArgumentParser()
    _generate_arguments(parser)
    flags = {a.dest for a in parser._actions}
    assert flags >= HYPER_OPTIONS
    torch_args = set(inspect.signature(TorchHyperNetwork).parameters)
    nnx_args = set(inspect.signature(NNXHyperNetwork.__init__).parameters)
    linen_fields = {f.name for f in fields(FlaxHyperNetwork)}
    for names, where in ((torch_args, "torch"), (nnx_args, "nnx"), (linen_fields, "linen")):
        assert names >= HYPER_OPTIONS, f"{where} runtime lacks {HYPER_OPTIONS - names}"


def test_pyproject_job_takes_every_option_and_cli_flags_override_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "target.py").write_text((TARGETS_DIR / "seed_mlp.py").read_text())
    (tmp_path / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [tool.hypernn-gen]
            embedding-dim = 16

            [[tool.hypernn-gen.jobs]]
            target = "target.py"
            mode = "dynamic"
            input-shape = ["1,8"]
            chunking = "tensor"
            chunk-dim = 100
            generator_hidden = [32, 16]
            init-scheme = "hyperfan-in"
            condition-shape = [4]
            embedding-hidden = "20"
            output = "job.py"
            """
        )
    )
    assert main([]) == 0
    args = ["target.py", "--mode", "dynamic", "--input-shape", "1,8", "--embedding-dim", "16"]
    args += ["--chunking", "tensor", "--chunk-dim", "100", "--generator-hidden", "32,16"]
    args += ["--init-scheme", "hyperfan-in", "--condition-shape", "4", "--embedding-hidden", "20"]
    assert main([*args, "-o", "flags.py"]) == 0
    job, by_flags = (tmp_path / "job.py").read_text(), (tmp_path / "flags.py").read_text()

    def strip(text: str) -> list[str]:  # the output path and the seal differ
        return [
            ln for ln in text.splitlines() if not ln.startswith(("# command:", "# hypernn-gen:"))
        ]

    assert strip(job) == strip(by_flags)
    module = import_file(tmp_path / "job.py")
    assert (module.EMBEDDING_DIM, module.CHUNK_DIM, module.GENERATOR_HIDDEN) == (16, 100, (32, 16))
    assert module.CONDITION_SHAPE == (4,) and module.EMBEDDING_HIDDEN == (20,)

    # a flag given with no target overrides the job's value
    assert main(["--init-scheme", "target", "--force"]) == 0
    overridden = import_file(tmp_path / "job.py")
    assert "init_scheme=target" in (tmp_path / "job.py").read_text()
    slot = next(p for p in overridden.GENERATED if p.path == "2.weight")
    assert slot.init_std == pytest.approx(1 / math.sqrt(3 * 256), rel=1e-4)
    capsys.readouterr()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--condition-shape", "3"],
            "--condition-shape applies to dynamic mode only; add --mode dynamic",
        ),
        (["--generator-hidden", "64,x"], "bad hidden widths '64,x'"),
        (["--generator-hidden", "0"], "hidden widths must be positive integers"),
        (["--init-scheme", "xavier"], "invalid choice: 'xavier'"),
        (["--chunking", "tensor", "--num-embeddings", "3"], "need num_embeddings >= 5, got 3"),
    ],
)
def test_bad_option_values_fail_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    target = str(TARGETS_DIR / "seed_mlp.py")
    code = main([target, "--input-shape", "1,8", *args, "-o", str(tmp_path / "x.py")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "x.py").exists()


def test_unknown_pyproject_option_suggests_the_close_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text(
        '[[tool.hypernn-gen.jobs]]\ntarget = "t.py"\ngenerator-hiden = [8]\n'
    )
    assert main([]) == 2
    assert "did you mean 'generator-hidden'?" in capsys.readouterr().err


# -- a committed template override ---------------------------------------------------------------


def test_committed_sinusoidal_override_is_the_runtime_with_that_embedding() -> None:
    """generated_examples/seed_mlp_torch_static_sinusoidal.py, rendered from the user template
    in generated_examples/templates: its embedding is the sinusoidal code (computed here with
    NumPy), and the file equals a runtime hypernetwork given that embedding module."""
    import numpy as np

    from hypernn_gen.runtime.torch import TorchEmbeddingModule

    path = TARGETS_DIR.parent / "seed_mlp_torch_static_sinusoidal.py"
    assert "--template-dir generated_examples/templates" in path.read_text()
    module = import_file(path)
    n, d = module.NUM_EMBEDDINGS, module.EMBEDDING_DIM
    k, i = np.arange(n)[:, None], np.arange(d)[None, :]
    angle = k / 10000.0 ** ((i - i % 2) / d)
    code = np.where(i % 2 == 0, np.sin(angle), np.cos(angle)) * np.sqrt(2.0)

    class Sinusoidal(TorchEmbeddingModule):
        def __init__(self, embedding_dim: int, num_embeddings: int) -> None:
            super().__init__(embedding_dim, num_embeddings)
            self.register_buffer("code", gen.embedding_module.code.clone(), persistent=False)
            self.projection = torch.nn.Linear(embedding_dim, embedding_dim)

        def forward(self) -> torch.Tensor:
            return self.projection(self.code)

    # fp32 sin/cos of angles up to NUM_EMBEDDINGS radians: rounding ~1e-5 against float64
    trig = {"rtol": 0.0, "atol": 5e-5}
    torch.manual_seed(0)
    gen = hypernetwork_class(module)()
    assert_close(gen.embedding_module.code, torch.tensor(code, dtype=torch.float32), trig, "code")
    assert_close(gen.embedding_module(), gen.embedding_module.code, STATIC, "identity projection")
    runtime = TorchHyperNetwork(
        make_plain_target("seed_mlp"), embedding_module_constructor=Sinusoidal, num_embeddings=n
    )
    gen.load_state_dict(runtime.state_dict())
    x = torch.randn(7, 8)
    (out, flat), (expected, expected_flat) = gen(x, return_params=True), runtime(x)
    assert_close(out, expected, STATIC, "output")
    assert_close(gen(x)[0], expected, STATIC, "output, fast path (own embedding module)")
    assert_close(flat, expected_flat, STATIC, "generated_params")
    # no learned table: the hypernetwork is smaller than the built-in one by N x D parameters
    builtin = TorchHyperNetwork(make_plain_target("seed_mlp"), num_embeddings=n)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(builtin) - count(gen) == n * d - d * d - d
    gen.reset_parameters()  # recomputes the non-persistent code
    assert_close(gen.embedding_module.code, torch.tensor(code, dtype=torch.float32), trig, "reset")
