"""hypernn_gen.kernel.torch on its own (no generation), and its copies in the generated files.

The kernel functions are checked against plain computations (slicing, loops over samples,
per-sample weights built by hand); the generated files' kernel sections against the kernel's
source text, byte for byte.
"""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from hypernn_gen.extract import KERNEL_BEGIN, KERNEL_END
from hypernn_gen.kernel import torch as kernel
from hypernn_gen.render import make_environment

ROOT = Path(__file__).resolve().parents[1]
KERNEL_FILE = ROOT / "hypernn_gen" / "kernel" / "torch.py"


class Slice(NamedTuple):
    path: str
    shape: tuple[int, ...]
    offset: int
    size: int
    init_mean: float = 0.0
    init_std: float = 1.0


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# a layout with padding between tensors (chunking="tensor": offsets on chunk boundaries of 4)
PADDED = (
    Slice("a.weight", (3, 2), 0, 6),
    Slice("a.bias", (3,), 8, 3),
    Slice("b.weight", (1, 3), 12, 3),
)
PADDED_FLAT = 16


@pytest.mark.parametrize("batch", [(), (5,)])
def test_decode_is_the_per_tensor_affine_map_with_zero_padding(batch: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    raw = torch.randn(*batch, PADDED_FLAT)
    scale, shift = torch.tensor([2.0, 3.0, 0.5]), torch.tensor([0.1, -1.0, 4.0])
    out = kernel.decode(raw, scale, shift, PADDED, PADDED_FLAT)
    expected = torch.zeros_like(raw)
    for i, p in enumerate(PADDED):
        part = slice(p.offset, p.offset + p.size)
        expected[..., part] = raw[..., part] * scale[i] + shift[i]
    torch.testing.assert_close(out, expected)
    assert out.shape == raw.shape


def test_unflatten_and_flatten_params_are_inverse_and_slice_the_vector() -> None:
    torch.manual_seed(0)
    flat = torch.randn(2, PADDED_FLAT)
    params = kernel.unflatten_params(flat, PADDED, PADDED_FLAT, {"c.weight": "b.weight"})
    for p in PADDED:
        assert torch.equal(
            params[p.path], flat[:, p.offset : p.offset + p.size].reshape(2, *p.shape)
        )
    assert params["c.weight"] is params["b.weight"]
    single = kernel.flatten_params({k: v[1] for k, v in params.items()}, PADDED, PADDED_FLAT)
    padding = torch.ones(PADDED_FLAT, dtype=torch.bool)
    for p in PADDED:
        padding[p.offset : p.offset + p.size] = False
    assert torch.equal(single[~padding], flat[1][~padding])
    assert torch.equal(single[padding], torch.zeros(int(padding.sum())))


def test_flatten_params_names_a_missing_tensor() -> None:
    with pytest.raises(ValueError, match=r"flatten_params is missing 'a.bias' \(and 1 more\)"):
        kernel.flatten_params({"a.weight": torch.zeros(3, 2)}, PADDED, PADDED_FLAT)


def test_reset_decoder_restores_init_std_and_mean() -> None:
    layout = (Slice("w", (2,), 0, 2, 0.5, 0.25), Slice("b", (1,), 2, 1, -1.0, 2.0))
    scale, shift = torch.zeros(2), torch.zeros(2)
    kernel.reset_decoder(scale, shift, layout)
    assert scale.tolist() == [0.25, 2.0] and shift.tolist() == [0.5, -1.0]


def test_layout_and_input_checks_refuse_with_the_expected_shape() -> None:
    target = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    good = (
        Slice("0.weight", (3, 2), 0, 6),
        Slice("0.bias", (3,), 6, 3),
        Slice("1.weight", (1, 3), 9, 3),
        Slice("1.bias", (1,), 12, 1),
    )
    kernel.check_layout(target, good)
    with pytest.raises(ValueError, match=r"\('1.weight', \(1, 3\)\) != \('1.weight', \(1, 4\)\)"):
        kernel.check_layout(nn.Sequential(nn.Linear(2, 3), nn.Linear(4, 1)), good)
    kernel.check_layout(target, good[:3], frozenset({"1.bias"}))
    with pytest.raises(ValueError, match="3 generated tensors expected, the target has 4"):
        kernel.check_layout(target, good[:3])
    with pytest.raises(ValueError, match=r"4 weight sets but input 1 has shape \(3, 2\)"):
        kernel.check_batch((torch.zeros(4, 2), torch.zeros(3, 2), 7), 4)
    with pytest.raises(ValueError, match=r"generated for \(batch, \*\(2, 3\)\)"):
        kernel.check_condition(torch.zeros(4, 5), (2, 3))
    kernel.check_condition(torch.zeros(4, 2, 3), (2, 3))


def test_without_generated_drops_generated_tensors_and_keeps_state() -> None:
    target = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    clone = kernel.without_generated(target, {"0.weight", "1.weight"})
    assert {n for n, _ in clone.named_parameters()} == {"0.bias", "1.bias"}
    assert torch.equal(clone[0].bias, target[0].bias) and clone[0].bias is not target[0].bias
    assert {n for n, _ in clone.named_buffers()} == {n for n, _ in target.named_buffers()}
    assert isinstance(target[0].weight, nn.Parameter)  # the original is untouched


def test_run_per_sample_equals_a_loop_over_samples() -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    batch = 5
    params = {n: torch.randn(batch, *p.shape) for n, p in module.named_parameters()}
    x = torch.randn(batch, 3)
    out = kernel.run_per_sample(module, params, batch, (x,), {})
    for b in range(batch):
        one = functional_call(module, {n: v[b] for n, v in params.items()}, (x[b : b + 1],))
        torch.testing.assert_close(out[b], one[0])


@pytest.mark.parametrize("chunk_dim", [5, 16])  # rows spanning 2+ chunks, and one chunk each
def test_fused_linear_equals_per_sample_weights(chunk_dim: int) -> None:
    """The fused path (shared products, per-sample coefficients) against sample b through the
    layer with weight set b built by hand: g[b] = shift + scale * (s[b, chunk] * g0 + bg)."""
    torch.manual_seed(0)
    layout = (Slice("0.weight", (4, 3), 0, 12), Slice("0.bias", (4,), 12, 4))
    flat_size, num_embeddings, dim = 16, -(-16 // chunk_dim), 6
    table = torch.randn(num_embeddings, dim)
    modulation = torch.randn(num_embeddings, 2)
    embedding = SimpleNamespace(weight=table, scales=lambda c: 1.0 + c @ modulation.T)
    generator = nn.Linear(dim, chunk_dim)
    hyper = SimpleNamespace(
        embedding_module=embedding,
        weight_generator=SimpleNamespace(linear=generator),
        param_scale=torch.tensor([0.5, 2.0]),
        param_shift=torch.tensor([0.1, -0.3]),
    )
    target = nn.Sequential(nn.Linear(3, 4))
    stripped = kernel.without_generated(target, {"0.weight", "0.bias"})
    spans = max((3 * o + 2) // chunk_dim - (3 * o) // chunk_dim + 1 for o in range(4))
    assert spans == (2 if chunk_dim == 5 else 1)
    fused = (("0", "linear", 0, 1, spans),)
    indices, swapped = kernel.install_fusion(
        stripped, fused, {"linear": kernel.fused_forward}, (), layout, {}, chunk_dim, num_embeddings
    )
    condition, x = torch.randn(3, 2), torch.randn(3, 3)
    shared = kernel.shared_inputs(hyper, condition, layout, flat_size)
    out = kernel.run_fused(stripped, swapped, shared, (x,), {})

    scales = embedding.scales(condition)  # (batch, num_embeddings)
    raw = (scales[:, :, None] * F.linear(table, generator.weight) + generator.bias).flatten(1)
    weights = kernel.decode(
        raw[:, :flat_size], hyper.param_scale, hyper.param_shift, layout, flat_size
    )
    for b in range(3):
        w, bias = weights[b, :12].view(4, 3), weights[b, 12:]
        torch.testing.assert_close(out[b], F.linear(x[b], w, bias), rtol=1e-5, atol=1e-6)
        for i in range(2):
            torch.testing.assert_close(
                shared.materialise(i)[b],
                weights[b, layout[i].offset :][: layout[i].size].view(layout[i].shape),
            )
    assert all(m.hyper_shared is None for m in swapped)  # restored after the call
    assert len(indices) == 1


def aligned_layout(shapes: list[tuple[str, tuple[int, ...]]], chunk_dim: int) -> tuple:
    """chunking="tensor": every tensor from a chunk boundary."""
    layout, offset = [], 0
    for path, shape in shapes:
        size = math.prod(shape)
        layout.append(Slice(path, shape, offset, size, 0.1 * len(layout), 0.5 + len(layout)))
        offset += -(-size // chunk_dim) * chunk_dim
    return tuple(layout), offset


ROW_CASES = {  # (target, input shape without the batch, chunk size, embedding dim)
    "linear, a row per chunk, rank-D product": (lambda: nn.Linear(6, 4), (6,), 6, 2),
    "linear, a row per chunk, shared GEMM": (lambda: nn.Linear(6, 4), (6,), 6, 64),
    "linear, 2 rows per chunk, no bias": (lambda: nn.Linear(3, 5, bias=False), (3,), 6, 4),
    "linear on (batch, positions, in)": (lambda: nn.Linear(4, 3), (2, 4), 8, 4),
    "linear, 2 rows per chunk, chunks full": (lambda: nn.Linear(3, 4), (2, 3), 6, 4),
    "conv2d, 2 rows per chunk, chunks full": (lambda: nn.Conv2d(2, 4, 3), (2, 5, 5), 36, 4),
    "conv2d, a row per chunk": (lambda: nn.Conv2d(2, 3, 3, padding=1), (2, 5, 5), 18, 4),
    "conv2d, 2 rows per chunk": (lambda: nn.Conv2d(2, 3, 3), (2, 5, 5), 36, 4),
}


@pytest.mark.parametrize("case", list(ROW_CASES))
def test_fused_rows_in_one_chunk_equal_per_sample_weights(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks that hold whole rows (row_products: one shared product, the generator's bias and
    the shift as a few shared rows, a generated bias folded in): outputs and every gradient
    against sample b through the layer with weight set b built by hand."""
    monkeypatch.setattr(kernel, "GROUPED_CONV_LIMIT", 0)  # convolutions take the shared path
    make, sample, chunk_dim, dim = ROW_CASES[case]
    torch.manual_seed(0)
    target = nn.Sequential(make())
    names = [(n, tuple(v.shape)) for n, v in target.named_parameters()]
    layout, flat_size = aligned_layout(names, chunk_dim)
    fused = target[0]
    row = layout[0].size // layout[0].shape[0]
    assert chunk_dim % row == 0
    num_embeddings = flat_size // chunk_dim
    hyper = SimpleNamespace(
        embedding_module=SimpleNamespace(
            weight=nn.Parameter(torch.randn(num_embeddings, dim)),
            scales=None,
        ),
        weight_generator=SimpleNamespace(linear=nn.Linear(dim, chunk_dim)),
        param_scale=nn.Parameter(torch.rand(len(layout)) + 0.5),
        param_shift=nn.Parameter(torch.randn(len(layout))),
    )
    modulation = nn.Parameter(torch.randn(num_embeddings, 2))
    hyper.embedding_module.scales = lambda c: 1.0 + c @ modulation.T
    with torch.no_grad():
        hyper.weight_generator.linear.bias.normal_()
    leaves = [
        hyper.embedding_module.weight,
        modulation,
        hyper.weight_generator.linear.weight,
        hyper.weight_generator.linear.bias,
        hyper.param_scale,
        hyper.param_shift,
    ]
    bias = 1 if len(layout) > 1 else None
    stripped = kernel.without_generated(target, {p.path for p in layout})
    kind = "linear" if isinstance(fused, nn.Linear) else "conv2d"
    indices, swapped = kernel.install_fusion(
        stripped,
        (("0", kind, 0, bias, 1),),
        {kind: kernel.fused_forward},
        (),
        layout,
        {},
        chunk_dim,
        num_embeddings,
    )
    assert indices[0].aligned
    condition, x = torch.randn(3, 2), torch.randn(3, *sample)
    shared = kernel.shared_inputs(hyper, condition, layout, flat_size)
    out = kernel.run_fused(stripped, swapped, shared, (x,), {})
    got = torch.autograd.grad(out.square().sum(), leaves)

    scales = hyper.embedding_module.scales(condition)
    generator = hyper.weight_generator.linear
    table = F.linear(hyper.embedding_module.weight, generator.weight)
    raw = (scales[:, :, None] * table + generator.bias).flatten(1)
    weights = kernel.decode(raw, hyper.param_scale, hyper.param_shift, layout, flat_size)
    params = kernel.unflatten_params(weights, layout, flat_size)
    want = torch.stack(
        [
            functional_call(target, {n: v[b] for n, v in params.items()}, (x[b : b + 1],))[0]
            for b in range(3)
        ]
    )
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    expected = torch.autograd.grad(want.square().sum(), leaves)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


# -- the generated files' kernel sections ----------------------------------------------------


def torch_files() -> list[Path]:
    files = sorted((ROOT / "generated_examples").glob("*_torch_*.py"))
    files += sorted((ROOT / "examples").glob("*/*_torch_static.py"))
    files += sorted((ROOT / "examples").glob("*/*_torch_dynamic.py"))
    return files


def kernel_section(text: str) -> tuple[str, str]:
    """(the kernel section, the rest of the file)."""
    begin = text.index(KERNEL_BEGIN + "\n")
    end = text.index(KERNEL_END + "\n", begin) + len(KERNEL_END) + 1
    return text[begin:end], text[:begin] + text[end:]


@pytest.mark.parametrize("path", torch_files(), ids=lambda p: p.name)
def test_kernel_section_is_a_verbatim_copy_of_kernel_code(path: Path) -> None:
    text = path.read_text()
    assert text.count(KERNEL_BEGIN) == 1 and text.count(KERNEL_END) == 1
    section, rest = kernel_section(text)
    source = KERNEL_FILE.read_text()
    kernel_names = {
        n.name for n in ast.parse(source).body if isinstance(n, ast.FunctionDef | ast.ClassDef)
    }
    tree = ast.parse(section)
    assert tree.body, f"{path.name}: empty kernel section"
    for stmt in tree.body:
        segment = ast.get_source_segment(section, stmt)
        assert segment in source, (
            f"{path.name}: not in hypernn_gen/kernel/torch.py:\n{segment[:200]}"
        )
    # and the kernel is not defined a second time outside its section
    outside = {
        n.name for n in ast.parse(rest).body if isinstance(n, ast.FunctionDef | ast.ClassDef)
    }
    assert not outside & kernel_names


def test_seed_dynamic_file_is_short_outside_its_kernel() -> None:
    text = (ROOT / "generated_examples" / "seed_mlp_torch_dynamic.py").read_text()
    _, rest = kernel_section(text)
    assert len(rest.splitlines()) <= 220
    assert text.index(KERNEL_BEGIN) > text.index("class SeedMlpHyperNetwork")  # specialised first


@pytest.mark.parametrize(
    "template",
    sorted(
        [
            *(ROOT / "templates" / "base").glob("*.jinja"),
            *(ROOT / "templates" / "torch").glob("*.jinja"),
        ]
    ),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_templates_are_at_most_350_lines(template: Path) -> None:
    assert len(template.read_text().splitlines()) <= 350


def test_layout_block_renders_from_a_hand_built_context() -> None:
    """One block of the Torch template, rendered alone from a context built by hand, run."""
    params = [
        SimpleNamespace(
            path="fc.weight",
            shape=(2, 3),
            offset=0,
            size=6,
            init_mean=0.0,
            init_std=0.5,
            aliases=(),
        ),
        SimpleNamespace(
            path="fc.bias",
            shape=(2,),
            offset=8,
            size=2,
            init_mean=0.1,
            init_std=0.2,
            aliases=("tied.bias",),
        ),
    ]
    ctx = SimpleNamespace(
        dynamic=False,
        fused=False,
        low_rank=(),
        delta=False,
        generator_hidden=(),
        gradient_scale=(1.5, 0.25, 0.5),
        embedding_dim=4,
        excluded=("frozen",),
        chunking=SimpleNamespace(num_embeddings=3, chunk_dim=4),
        layout=SimpleNamespace(flat_size=12, digest=lambda: "0123abcd"),
        checkpoint_digest="4567cdef",
        params=params,
        tied=(("tied.bias", "fc.bias"),),
        names=SimpleNamespace(prefix="X"),
    )
    template = make_environment().get_template("torch/hypernetwork.py.jinja")
    text = "".join(template.blocks["layout"](template.new_context({"ctx": ctx})))
    scope: dict = {"NamedTuple": NamedTuple}
    exec(compile("from __future__ import annotations\n" + text, "layout", "exec"), scope)
    assert [tuple(p) for p in scope["GENERATED"]] == [
        ("fc.weight", (2, 3), 0, 6, 0.0, 0.5),
        ("fc.bias", (2,), 8, 2, 0.1, 0.2),
    ]
    assert (scope["FLAT_SIZE"], scope["CHUNK_DIM"], scope["LAYOUT_DIGEST"]) == (12, 4, "0123abcd")
    assert scope["CHECKPOINT_DIGEST"] == "4567cdef"
    assert scope["TIED"] == {"tied.bias": "fc.bias"} and scope["EXCLUDED"] == frozenset({"frozen"})
    assert scope["GRADIENT_SCALE"] == (1.5, 0.25, 0.5)
    assert "FUSED" not in scope and not re.search(r"^def ", text, re.M)
