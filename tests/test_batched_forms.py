"""Batched forms: the target runs once on the whole batch, each module with its own batched form.

Every target here is generated in dynamic mode and checked against the materialising path: each
sample alone through the plain target (``functional_call``) with its own weight set from
``generate_params``, for outputs and for the gradients of every hypernetwork parameter. The plan
is asserted too (which kind each module gets), so a form that silently stops being used fails.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from gen_support import hypernetwork_class, import_file
from tolerances import DYNAMIC, GRAD, assert_close
from torch.func import functional_call

from hypernn_gen.cli import main

HEADER = "import torch\nfrom torch import nn\n"


def generate(tmp_path: Path, body: str, name: str = "target") -> tuple[ModuleType, ModuleType]:
    """The generated dynamic module and the target module, for a target file ``body``."""
    target = tmp_path / f"{name}.py"
    target.write_text(HEADER + textwrap.dedent(body))
    out = tmp_path / f"{name}_hyper.py"
    assert main([str(target), "--mode", "dynamic", "--embedding-dim", "8", "-o", str(out)]) == 0
    return import_file(out), import_file(target)


def kinds(generated: ModuleType) -> dict[str, str]:
    return {f[0]: f[1] for f in generated.FUSED}


def first(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def check_against_materialising(
    generated: ModuleType,
    plain: torch.nn.Module,
    *inputs: torch.Tensor,
    vmap_free: bool = True,
    condition: torch.Tensor | None = None,
) -> None:
    """Fused output and gradients == each sample alone with its materialised weights."""
    condition = inputs[0] if condition is None else condition
    torch.manual_seed(0)
    hyper = hypernetwork_class(generated)()
    with torch.no_grad():  # weight sets far apart, so that a mixed-up sample shows
        hyper.embedding_module.modulation[-1].weight.normal_(0.0, 0.5)
    if vmap_free:

        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("vmap was called on the fused path")

        generated.vmap, saved = refuse, generated.vmap
    try:
        output, params = hyper(*inputs, condition=condition)
    finally:
        if vmap_free:
            generated.vmap = saved
    assert params is None
    output = first(output)
    flat = hyper.generate_params(condition)
    assert (flat[0] - flat[1]).abs().max() > 1e-2, "weight sets do not differ: vacuous"
    expected = []
    for b in range(inputs[0].shape[0]):
        weights = {
            p.path: flat[b, p.offset : p.offset + p.size].view(p.shape) for p in generated.GENERATED
        }
        sample = tuple(x[b : b + 1] for x in inputs)
        expected.append(first(functional_call(plain, weights, sample)))
    expected = torch.cat(expected)
    assert_close(output, expected, DYNAMIC, "output")
    probe = torch.randn_like(expected)
    names = [n for n, p in hyper.named_parameters() if p.requires_grad]
    ours = torch.autograd.grad(
        (output * probe).sum(),
        [dict(hyper.named_parameters())[n] for n in names],
        allow_unused=True,
    )
    theirs = torch.autograd.grad(
        (expected * probe).sum(),
        [dict(hyper.named_parameters())[n] for n in names],
        allow_unused=True,
    )
    for name, a, b in zip(names, ours, theirs, strict=True):
        if b is None:
            assert a is None or a.abs().max() == 0, name
            continue
        assert_close(a, b, GRAD, f"grad of {name}")


CONTROL_FLOW = """
class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(6, 5)
        self.norm = nn.LayerNorm(5)

    def forward(self, x):
        if x.abs().sum() > 0:  # data-dependent: meta cannot run it, vmap cannot batch it
            h = self.a(x)
        else:
            h = self.b(x)
        return self.norm(torch.relu(h))


example_input = torch.randn(2, 6)
"""


def test_data_dependent_control_flow_runs_once_on_the_whole_batch(tmp_path: Path) -> None:
    generated, target = generate(tmp_path, CONTROL_FLOW)
    assert kinds(generated) == {"a": "linear", "b": "linear", "norm": "layer_norm"}
    assert not hasattr(generated, "PER_SAMPLE")  # nothing per sample: no vmap anywhere
    plain = target.Branchy()
    check_against_materialising(generated, plain, torch.randn(3, 6))
    zeros = torch.zeros(3, 6)  # the other branch
    check_against_materialising(generated, plain, zeros, condition=torch.randn(3, 6))


def test_the_materialising_path_runs_that_target_one_sample_at_a_time(tmp_path: Path) -> None:
    """vmap cannot run the branch, so the materialising path runs its samples one at a time:
    each sample alone, even where a zero sample takes the other branch."""
    generated, target = generate(tmp_path, CONTROL_FLOW)
    hyper = hypernetwork_class(generated)()
    x = torch.randn(3, 6)
    x[1] = 0.0  # alone, sample 1 takes branch b
    condition = torch.randn(3, 6)
    out, flat = hyper(x, return_params=True, condition=condition)
    plain = target.Branchy()
    for b in range(3):
        weights = {
            p.path: flat[b, p.offset : p.offset + p.size].view(p.shape) for p in generated.GENERATED
        }
        alone = functional_call(plain, weights, (x[b : b + 1],))
        assert_close(out[b : b + 1], alone, DYNAMIC, f"sample {b}")


NORMS = """
class Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(4, 8)
        self.fc = nn.Linear(8, 6)
        self.rms = nn.RMSNorm(6, eps=1e-5)
        self.ln = nn.LayerNorm(6, bias=False)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = self.gn(self.conv(x)).mean((2, 3))
        return self.out(self.ln(self.rms(self.fc(h))))


example_input = torch.randn(2, 3, 5, 5)
"""


def test_group_norm_rms_norm_and_layer_norm_without_bias(tmp_path: Path) -> None:
    generated, target = generate(tmp_path, NORMS)
    assert kinds(generated) == {
        "conv": "conv2d",
        "gn": "group_norm",
        "fc": "linear",
        "rms": "rms_norm",
        "ln": "layer_norm",
        "out": "linear",
    }
    check_against_materialising(generated, target.Normed(), torch.randn(3, 3, 5, 5))


CONVS = """
class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c3 = nn.Conv3d(2, 4, 3, padding=1)
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.grouped = nn.Conv1d(4, 6, 3, groups=2, stride=2)
        self.up1 = nn.ConvTranspose1d(6, 4, 3, stride=2, output_padding=1)
        self.up2 = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.c3(x)).mean(2)  # (batch, 4, 6, 6)
        h = torch.relu(self.depthwise(h))
        s = torch.relu(self.grouped(h.flatten(2)))  # (batch, 6, 17)
        s = torch.relu(self.up1(s))  # (batch, 4, 36)
        h = self.up2(s.view(-1, 4, 6, 6))  # (batch, 6, 11, 11)
        return self.head(h.mean((2, 3)))


example_input = torch.randn(2, 2, 4, 6, 6)
"""


@pytest.mark.parametrize("grouped", [True, False], ids=["kernels-built", "shared-convs"])
def test_conv3d_depthwise_grouped_and_transposed_convolutions(
    tmp_path: Path, grouped: bool
) -> None:
    generated, target = generate(tmp_path, CONVS)
    assert kinds(generated) == {
        "c3": "conv3d",
        "depthwise": "conv2d",
        "grouped": "conv1d",
        "up1": "conv_transpose1d",
        "up2": "conv_transpose2d",
        "head": "linear",
    }
    assert max(f[4] for f in generated.FUSED) > 1  # some row spans several chunks
    if not grouped:
        generated.GROUPED_CONV_LIMIT = 0
    check_against_materialising(generated, target.Convs(), torch.randn(3, 2, 4, 6, 6))


DIRECT = """
class TinyViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Linear(4, 8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
        self.pos_embed = nn.Parameter(torch.randn(1, 4, 8))
        self.gain = nn.Parameter(torch.ones(8))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # (batch, 3, 4) patches
        tokens = self.patch(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        h = torch.cat([cls, tokens], dim=1) + self.pos_embed
        h = self.norm(h) * self.gain
        return self.logit_scale.exp() * self.head(h[:, 0])


example_input = torch.randn(2, 3, 4)
"""


def test_parameters_used_directly_get_one_value_per_sample(tmp_path: Path) -> None:
    generated, target = generate(tmp_path, DIRECT)
    direct = sorted(
        (generated.GENERATED[f[2]].path, f[4]) for f in generated.FUSED if f[1] == "direct"
    )
    # the rank of the batched tensors each is broadcast into
    assert direct == [("cls_token", 3), ("gain", 3), ("logit_scale", 2), ("pos_embed", 3)]
    assert kinds(generated)["patch"] == "linear" and kinds(generated)["head"] == "linear"
    check_against_materialising(generated, target.TinyViT(), torch.randn(3, 3, 4))


UNPROVEN = """
class Mixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.mix = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return self.fc(x) @ self.mix  # not elementwise: no per-sample broadcast is proven


example_input = torch.randn(2, 4)
"""


def test_a_parameter_used_otherwise_runs_per_sample(tmp_path: Path) -> None:
    generated, target = generate(tmp_path, UNPROVEN)
    assert generated.FUSED == ()
    assert generated.PER_SAMPLE == (
        ("", "mix is used by matmul, not only broadcast elementwise into batched tensors"),
    )
    check_against_materialising(generated, target.Mixer(), torch.randn(3, 4), vmap_free=False)


transformers = pytest.importorskip("transformers")

LIBRARY = """
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.t5.modeling_t5 import T5LayerNorm
from transformers.pytorch_utils import Conv1D


class Library(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = Conv1D(12, 6)  # nf, nx: weight (6, 12)
        self.llama_norm = LlamaRMSNorm(12, eps=1e-5)
        self.c_proj = Conv1D(6, 12)
        self.t5_norm = T5LayerNorm(6)

    def forward(self, x):
        return self.t5_norm(self.c_proj(torch.tanh(self.llama_norm(self.c_fc(x)))))


example_input = torch.randn(2, 5, 6)
"""


def test_transformers_conv1d_and_rms_norms(tmp_path: Path) -> None:
    generated, target = generate(tmp_path, LIBRARY)
    assert kinds(generated) == {
        "c_fc": "transposed_linear",
        "llama_norm": "elementwise",
        "c_proj": "transposed_linear",
        "t5_norm": "elementwise",
    }
    check_against_materialising(generated, target.Library(), torch.randn(3, 5, 6))


def test_a_library_class_is_matched_by_identity_not_by_name(tmp_path: Path) -> None:
    """A class of the target's own called Conv1D (weight (out, in)) is not transformers'."""
    generated, target = generate(
        tmp_path,
        """
        class Conv1D(nn.Module):
            def __init__(self):
                super().__init__()
                self.weight = nn.Parameter(torch.randn(3, 4))

            def forward(self, x):
                return x @ self.weight.t()


        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = Conv1D()

            def forward(self, x):
                return self.proj(x)


        target = Net()
        example_input = torch.randn(2, 4)
        """,
    )
    assert generated.FUSED == ()
    assert generated.PER_SAMPLE[0][0] == "proj"
    check_against_materialising(generated, target.target, torch.randn(3, 4), vmap_free=False)


GPT2 = """
import transformers


def make_target():
    config = transformers.GPT2Config(
        vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2Model(config).eval()


example_input = torch.zeros(2, 6, dtype=torch.long)
"""


def test_gpt2_fuses_every_layer_and_equals_each_sample_alone(tmp_path: Path) -> None:
    """GPT-2: Conv1D, LayerNorm, a token Embedding and a position Embedding looked up with
    shared ids (1, L), whose output is only added to the batch (ids repeated per sample)."""
    generated, target = generate(tmp_path, GPT2)
    found = kinds(generated)
    assert found["wpe"] == "embedding" and found["h.0.attn.c_attn"] == "transposed_linear"
    assert [f[5] for f in generated.FUSED if f[0] == "wpe"] == [True]
    assert not hasattr(generated, "PER_SAMPLE")
    ids = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(0))
    check_against_materialising(generated, target.make_target(), ids)


PADDED = """
class Padded(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(10, 4, padding_idx=0)
        self.head = nn.Linear(4, 2)

    def forward(self, ids):
        return self.head(self.tok(ids))


example_input = torch.zeros(2, 5, dtype=torch.long)
"""


def test_embedding_padding_rows_are_read_but_get_no_gradient(tmp_path: Path) -> None:
    generated, target = generate(tmp_path, PADDED)
    assert kinds(generated) == {"tok": "embedding", "head": "linear"}
    ids = torch.tensor([[0, 3, 0, 7, 1], [2, 0, 0, 9, 4], [0, 0, 0, 0, 5]])
    check_against_materialising(generated, target.Padded(), ids, condition=torch.randn(3, 5))


ATTENTION = """
class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.cross = nn.MultiheadAttention(8, 2, batch_first=True, bias=False)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        x = self.emb(ids)
        n = ids.shape[1]
        causal = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
        h, weights = self.attn(x, x, x, attn_mask=causal, key_padding_mask=ids == 0)
        c, _ = self.cross(h, x, x, need_weights=False)
        return self.head(c + h + weights @ x)


example_input = torch.ones(2, 5, dtype=torch.long)
"""


def test_multihead_attention_projections_are_fused(tmp_path: Path) -> None:
    """Self-attention (causal mask, key padding, weights returned) and cross-attention without
    biases (SDPA): in_proj and out_proj fused, the masks as torch merges them."""
    generated, target = generate(tmp_path, ATTENTION)
    assert kinds(generated) == {
        "emb": "embedding",
        "attn": "multihead_attention",
        "attn.out_proj": "linear",
        "cross": "multihead_attention",
        "cross.out_proj": "linear",
        "head": "linear",
    }
    ids = torch.tensor([[3, 0, 5, 7, 0], [1, 2, 0, 4, 9], [6, 6, 0, 0, 2]])
    check_against_materialising(generated, target.Attention(), ids, condition=torch.randn(3, 5))


def test_the_materialising_path_gives_the_padding_row_no_gradient() -> None:
    """Under vmap with a per-sample weight, torch's F.embedding backward gives padding_idx's row
    a gradient in every sample but the first; run_per_sample must equal each sample alone."""
    from hypernn_gen.kernel.torch import run_per_sample

    embedding = torch.nn.Embedding(5, 4, padding_idx=0)
    weight = torch.randn(3, 5, 4, requires_grad=True)
    ids = torch.tensor([[0, 1, 2], [0, 0, 3], [4, 0, 1]])
    probe = torch.randn(3, 3, 4)
    (run_per_sample(embedding, {"weight": weight}, 3, (ids,), {}) * probe).sum().backward()
    got, weight.grad = weight.grad, None
    for b in range(3):
        (functional_call(embedding, {"weight": weight[b]}, (ids[b],)) * probe[b]).sum().backward()
    assert got[:, 0].abs().max() == 0
    assert_close(got, weight.grad, GRAD, "per-sample embedding gradient")
