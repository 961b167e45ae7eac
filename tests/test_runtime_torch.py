"""Semantics of the torch runtime, each checked against an independent computation.

The reference is almost always the plain target: a deep copy of the user's module with the
hypernetwork's generated tensors loaded into it (``load_state_dict(strict=False)``), run as an
ordinary ``nn.Module``. Nothing here compares against numbers recorded from the runtime itself.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch import nn
from torch.func import functional_call

from hypernn_gen.errors import HyperNetworkError, TraceError
from hypernn_gen.runtime.torch import (
    TorchEmbeddingModule,
    TorchHyperNetwork,
    TorchWeightGenerator,
)

# -- targets and helpers ------------------------------------------------------------------------


def seed_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(8, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 4, bias=False)
    )


def small_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def small_transformer() -> nn.Module:
    return nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)


def bn_cnn() -> nn.Module:
    """A CNN with BatchNorm2d (per-sample batches of one still have H*W values per channel)."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    )


class TiedLM(nn.Module):
    """A tiny language model whose output head *is* the embedding matrix."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


class PartlyFrozen(nn.Module):
    """Trainable, frozen and buffer tensors interleaved."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.frozen = nn.Linear(7, 7)
        self.frozen.requires_grad_(False)
        self.bn = nn.BatchNorm1d(7)
        self.b = nn.Linear(7, 2)
        self.gain = nn.Parameter(torch.ones(2), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.bn(torch.relu(self.frozen(self.a(x))))) * self.gain


def plain_copy(target: nn.Module, hn: TorchHyperNetwork, flat: torch.Tensor) -> nn.Module:
    """The user's target, deep-copied, with weight set ``flat`` and ``hn``'s state loaded."""
    reference = copy.deepcopy(target)
    result = reference.load_state_dict(hn.unflatten_params(flat.detach()), strict=False)
    assert not result.unexpected_keys
    result = reference.load_state_dict(hn.target.state_dict(), strict=False)
    assert not result.unexpected_keys
    reference.train(hn.training)
    return reference


def trainable_names(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.requires_grad]


# -- the seed example and the constructors ------------------------------------------------------


def test_hyper_nn_readme_example_runs_with_only_imports_changed() -> None:
    target_network = nn.Sequential(
        nn.Linear(8, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 4, bias=False)
    )  # noqa: E501

    class StaticEmbeddingModule(TorchEmbeddingModule):
        def __init__(self, embedding_dim: int, num_embeddings: int):
            super().__init__(embedding_dim, num_embeddings)
            self.embedding = nn.Embedding(num_embeddings, embedding_dim)

        def forward(self):
            indices = torch.arange(self.num_embeddings)
            return self.embedding(indices)

    class StaticWeightGenerator(TorchWeightGenerator):
        def __init__(self, embedding_dim: int, hidden_dim: int):
            super().__init__(embedding_dim, hidden_dim)
            self.embedding_network = nn.Sequential(
                nn.Linear(embedding_dim, 32), nn.ReLU(), nn.Linear(32, hidden_dim)
            )  # noqa: E501

        def forward(self, embedding: torch.Tensor) -> torch.Tensor:
            return self.embedding_network(embedding).view(-1)

    hypernetwork = TorchHyperNetwork(
        target_network,
        embedding_module_constructor=StaticEmbeddingModule,
        weight_generator_constructor=StaticWeightGenerator,
        embedding_dim=32,
        num_embeddings=512,
    )  # noqa: E501
    output, generated_params = hypernetwork(torch.zeros((1, 8)))

    assert output.shape == (1, 4)
    assert generated_params.numel() == 69120
    assert generated_params.numel() == sum(p.numel() for p in target_network.parameters())
    assert isinstance(hypernetwork.embedding_module, StaticEmbeddingModule)
    assert isinstance(hypernetwork.weight_generator, StaticWeightGenerator)
    reference = plain_copy(target_network, hypernetwork, generated_params)
    assert torch.equal(output, reference(torch.zeros((1, 8))))


def test_target_alone_builds_a_static_hypernetwork() -> None:
    target = small_mlp()
    hn = TorchHyperNetwork(target)
    x = torch.randn(6, 8)
    out, flat = hn(x)
    n_params = sum(p.numel() for p in target.parameters())
    c = hn.hidden_dim  # the default chunking: every tensor from a chunk boundary
    assert hn.mode == "static"
    assert flat.shape == (sum(-(-p.numel() // c) * c for p in target.parameters()),)
    assert hn.num_embeddings * hn.hidden_dim >= n_params
    assert torch.equal(out, plain_copy(target, hn, flat)(x))


@pytest.mark.parametrize("condition_dim", [None, 8])
def test_dynamic_mode_makes_one_weight_set_per_sample(condition_dim: int | None) -> None:
    target = small_mlp()
    hn = TorchHyperNetwork(target, mode="dynamic", condition_dim=condition_dim)
    x = torch.randn(5, 8)
    out, flat = hn(x)
    c = hn.hidden_dim  # the default chunking: every tensor from a chunk boundary
    assert out.shape == (5, 3)
    assert flat.shape == (5, sum(-(-p.numel() // c) * c for p in target.parameters()))
    for b in range(5):
        reference = plain_copy(target, hn, flat[b])
        torch.testing.assert_close(out[b : b + 1], reference(x[b : b + 1]))
    for b in range(1, 5):
        assert not torch.allclose(flat[0], flat[b]), "samples got the same weight set"


def test_dynamic_output_matches_functional_call_per_sample() -> None:
    target = small_cnn()
    hn = TorchHyperNetwork(target, mode="dynamic")
    x = torch.randn(3, 3, 8, 8)
    out, flat = hn(x)
    for b in range(3):
        params = hn.unflatten_params(flat[b].detach())
        expected = functional_call(target, params, (x[b : b + 1],))
        torch.testing.assert_close(out[b : b + 1], expected)


def test_mode_must_be_static_or_dynamic() -> None:
    with pytest.raises(HyperNetworkError, match="'static' or 'dynamic'"):
        TorchHyperNetwork(small_mlp(), mode="per-sample")  # type: ignore[arg-type]


def test_user_constructors_get_the_derived_sizes_and_are_used() -> None:
    calls: dict[str, tuple[int, int]] = {}

    class Table(TorchEmbeddingModule):
        def __init__(self, embedding_dim: int, num_embeddings: int) -> None:
            super().__init__(embedding_dim, num_embeddings)
            calls["embedding"] = (embedding_dim, num_embeddings)
            self.table = nn.Parameter(torch.randn(num_embeddings, embedding_dim))

        def forward(self) -> torch.Tensor:
            return torch.sin(self.table)

    class TwoLayer(TorchWeightGenerator):
        def __init__(self, embedding_dim: int, hidden_dim: int) -> None:
            super().__init__(embedding_dim, hidden_dim)
            calls["generator"] = (embedding_dim, hidden_dim)
            self.net = nn.Sequential(
                nn.Linear(embedding_dim, 20), nn.GELU(), nn.Linear(20, hidden_dim)
            )

        def forward(self, embedding: torch.Tensor) -> torch.Tensor:
            return self.net(embedding)

    target = small_mlp()
    n_params = sum(p.numel() for p in target.parameters())
    hn = TorchHyperNetwork(target, Table, TwoLayer, embedding_dim=12, num_embeddings=7)
    chunk = math.ceil(n_params / 7)
    assert calls == {"embedding": (12, 7), "generator": (12, chunk)}

    out, flat = hn(torch.randn(4, 8))
    # The documented recipe, computed here by hand from the user's own modules.
    raw = hn.weight_generator.net(torch.sin(hn.embedding_module.table)).reshape(-1)[:n_params]
    generated = hn.layout.generated
    scale = torch.cat([s.expand(t.size) for s, t in zip(hn.param_scale, generated, strict=True)])
    shift = torch.cat([s.expand(t.size) for s, t in zip(hn.param_shift, generated, strict=True)])
    torch.testing.assert_close(flat, shift + scale * raw)


def test_user_dynamic_embedding_receives_the_condition() -> None:
    seen: list[torch.Size] = []

    class FromCondition(TorchEmbeddingModule):
        def __init__(self, embedding_dim: int, num_embeddings: int) -> None:
            super().__init__(embedding_dim, num_embeddings)
            self.proj = nn.Linear(8, num_embeddings * embedding_dim)

        def forward(self, condition: torch.Tensor) -> torch.Tensor:
            seen.append(condition.shape)
            return self.proj(condition).view(condition.shape[0], self.num_embeddings, -1)

    target = small_mlp()
    hn = TorchHyperNetwork(target, FromCondition, mode="dynamic", embedding_dim=4)
    x = torch.randn(3, 8)
    out, flat = hn(x)
    assert seen == [x.shape]
    for b in range(3):
        torch.testing.assert_close(out[b : b + 1], plain_copy(target, hn, flat[b])(x[b : b + 1]))


# -- what is generated and what stays state -----------------------------------------------------


def test_generated_tensors_are_exactly_the_trainable_parameters() -> None:
    target = PartlyFrozen()
    hn = TorchHyperNetwork(target)
    assert [t.path for t in hn.layout.generated] == trainable_names(target)
    assert hn.layout.num_generated == sum(p.numel() for p in target.parameters() if p.requires_grad)


def test_frozen_parameters_stay_state_with_their_values() -> None:
    target = PartlyFrozen()
    original = {n: p.detach().clone() for n, p in target.named_parameters() if not p.requires_grad}
    assert set(original) == {"frozen.weight", "frozen.bias", "gain"}
    hn = TorchHyperNetwork(target)
    state = hn.state_dict()
    for name, value in original.items():
        assert torch.equal(state[f"target.{name}"], value)

    optimizer = torch.optim.SGD(hn.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        out, _ = hn(torch.randn(8, 5))
        out.pow(2).mean().backward()
        optimizer.step()
    for name, value in original.items():
        assert torch.equal(hn.state_dict()[f"target.{name}"], value)
    # ... and they are used: the forward equals the plain target (same weights, same state).
    hn.eval()
    x = torch.randn(4, 5)
    out, flat = hn(x)
    assert torch.equal(out, plain_copy(target, hn, flat).eval()(x))


def test_hypernetwork_parameters_hold_no_target_tensor() -> None:
    target = PartlyFrozen()
    hn = TorchHyperNetwork(target)
    target_storages = {p.untyped_storage().data_ptr() for p in target.parameters()}
    assert not any(p.untyped_storage().data_ptr() in target_storages for p in hn.parameters())
    trainable = {n for n, p in hn.named_parameters() if p.requires_grad}
    assert not any(n.startswith("target.") for n in trainable)
    generated = {f"target.{t.path}" for t in hn.layout.generated}
    assert not generated & set(hn.state_dict())
    assert {n for n, _ in hn.named_parameters() if n.startswith("target.")} == {
        "target.frozen.weight",
        "target.frozen.bias",
        "target.gain",
    }


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_tied_weights_are_generated_once_and_stay_tied(mode: str) -> None:
    target = TiedLM()
    assert target.head.weight is target.embed.weight
    hn = TorchHyperNetwork(target, mode=mode)
    assert [t.path for t in hn.layout.generated] == trainable_names(target)
    assert "head.weight" not in [t.path for t in hn.layout.generated]
    assert hn.layout.num_generated == sum(p.numel() for p in target.parameters())

    tokens = torch.randint(0, 11, (3, 5))
    out, flat = hn(tokens)
    weight_sets = [flat] if mode == "static" else list(flat)
    for b, weights in enumerate(weight_sets):
        reference = plain_copy(target, hn, weights)
        assert reference.head.weight is reference.embed.weight
        rows = slice(None) if mode == "static" else slice(b, b + 1)
        torch.testing.assert_close(out[rows], reference(tokens[rows]), rtol=0, atol=1e-6)


def test_complex_parameters_are_refused_with_a_fix() -> None:
    class WithComplex(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 3)
            self.phase = nn.Parameter(torch.zeros(3, dtype=torch.complex64))

    with pytest.raises(TraceError) as info:
        TorchHyperNetwork(WithComplex())
    message = str(info.value)
    assert "'phase'" in message and "complex64" in message
    assert "requires_grad=False" in message

    frozen = WithComplex()
    frozen.phase.requires_grad_(False)
    hn = TorchHyperNetwork(frozen)  # the suggested fix works
    assert [t.path for t in hn.layout.generated] == ["linear.weight", "linear.bias"]


def test_target_without_trainable_parameters_is_refused() -> None:
    target = small_mlp().requires_grad_(False)
    with pytest.raises(TraceError, match=r"no trainable .*requires_grad"):
        TorchHyperNetwork(target)


# -- buffers, dtype, device, train/eval ---------------------------------------------------------


def test_buffers_are_in_the_state_dict() -> None:
    target = bn_cnn()
    hn = TorchHyperNetwork(target)
    state = hn.state_dict()
    for name, buffer in target.named_buffers():
        assert torch.equal(state[f"target.{name}"], buffer)


def test_to_casts_floating_state_and_generated_weights() -> None:
    target = bn_cnn()
    hn = TorchHyperNetwork(target).to(torch.float64)
    for name, value in hn.state_dict().items():
        expected = torch.int64 if name.endswith("num_batches_tracked") else torch.float64
        expected = torch.uint8 if name == "layout_digest" else expected  # 8 bytes, not cast
        assert value.dtype == expected, name
    out, flat = hn(torch.randn(2, 3, 6, 6, dtype=torch.float64))
    assert out.dtype == flat.dtype == torch.float64


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_to_moves_every_tensor_to_the_device(mode: str) -> None:
    hn = TorchHyperNetwork(bn_cnn(), mode=mode, condition_dim=3 * 6 * 6).to("meta")
    assert all(v.device.type == "meta" for v in hn.state_dict().values())
    assert all(b.device.type == "meta" for b in hn.buffers())
    out, flat = hn(torch.empty(2, 3, 6, 6, device="meta"))
    assert out.device.type == flat.device.type == "meta"
    assert out.shape == (2, 3)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_running_stats_update_in_train_and_freeze_in_eval(mode: str) -> None:
    hn = TorchHyperNetwork(bn_cnn(), mode=mode)
    bn = hn.target[1]
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    hn.train()
    hn(torch.randn(4, 3, 6, 6) * 3 + 1)
    assert not torch.equal(bn.running_mean, before["running_mean"])
    assert not torch.equal(bn.running_var, before["running_var"])
    assert int(bn.num_batches_tracked) == 1
    hn.eval()
    after_train = {k: v.clone() for k, v in bn.state_dict().items()}
    hn(torch.randn(4, 3, 6, 6) * 3 + 1)
    for key, value in bn.state_dict().items():
        assert torch.equal(value, after_train[key]), key


def test_static_running_stats_equal_the_plain_target_on_the_same_batch() -> None:
    target = bn_cnn()
    hn = TorchHyperNetwork(target)
    x = torch.randn(6, 3, 6, 6) * 2 - 1
    reference = copy.deepcopy(target)  # untouched buffers, like the hypernetwork's copy
    out, flat = hn(x)
    reference.load_state_dict(hn.unflatten_params(flat.detach()), strict=False)
    expected = reference.train()(x)
    assert torch.equal(out, expected)
    for name, buffer in reference.named_buffers():
        torch.testing.assert_close(hn.target.get_buffer(name), buffer, rtol=0, atol=0)


def test_per_sample_running_stats_are_the_mean_over_per_sample_runs() -> None:
    """batch_norm_stats="sample" (the default, "batch": tests/test_batch_norm_stats.py)."""
    target = bn_cnn()
    hn = TorchHyperNetwork(target, mode="dynamic", batch_norm_stats="sample")
    x = torch.randn(4, 3, 6, 6) * 2 - 1
    out, flat = hn(x)
    means, variances = [], []
    for b in range(4):
        reference = copy.deepcopy(target)
        reference.load_state_dict(hn.unflatten_params(flat[b].detach()), strict=False)
        torch.testing.assert_close(out[b : b + 1], reference.train()(x[b : b + 1]))
        means.append(reference[1].running_mean)
        variances.append(reference[1].running_var)
    torch.testing.assert_close(hn.target[1].running_mean, torch.stack(means).mean(0))
    torch.testing.assert_close(hn.target[1].running_var, torch.stack(variances).mean(0))
    assert int(hn.target[1].num_batches_tracked) == 1


def test_batchnorm_eval_uses_running_stats() -> None:
    target = bn_cnn()
    hn = TorchHyperNetwork(target)
    for _ in range(3):
        hn(torch.randn(8, 3, 6, 6) * 2 + 0.5)
    hn.eval()
    assert not hn.target[1].training
    x = torch.randn(5, 3, 6, 6)
    out, flat = hn(x)
    reference = plain_copy(target, hn, flat)
    assert not reference.training
    assert torch.equal(out, reference(x))
    # Running statistics make each sample independent of the rest of its batch.
    torch.testing.assert_close(hn(x[:1])[0], out[:1])
    reference.train()
    assert not torch.allclose(reference(x), out), "eval output should not use batch statistics"


class DropoutNet(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Linear(8, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 3))


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_train_and_eval_reach_the_target(mode: str) -> None:
    target = DropoutNet()
    hn = TorchHyperNetwork(target, mode=mode)
    x = torch.randn(4, 8)
    hn.train()
    assert all(m.training for m in hn.target.modules())
    first, flat_a = hn(x)
    second, flat_b = hn(x)
    assert torch.equal(flat_a, flat_b)
    assert not torch.allclose(first, second), "dropout inactive in train mode"
    # Like the plain target on a batch, each sample draws its own mask (vmap randomness).
    weights = flat_a if mode == "static" else flat_a[:1].expand_as(flat_a)
    repeated, _ = hn(x[:1].expand(4, 8), generated_params=weights)
    assert not torch.allclose(repeated[0], repeated[1])

    hn.eval()
    assert not any(m.training for m in hn.target.modules())
    out, flat = hn(x)
    assert torch.equal(out, hn(x)[0])
    if mode == "static":
        assert torch.equal(out, plain_copy(target, hn, flat).eval()(x))
    else:
        for b in range(4):
            reference = plain_copy(target, hn, flat[b]).eval()
            torch.testing.assert_close(out[b : b + 1], reference(x[b : b + 1]))


# -- dynamic conditioning and batching ----------------------------------------------------------


def test_condition_input_is_used_instead_of_the_target_input() -> None:
    target = small_mlp()
    hn = TorchHyperNetwork(target, mode="dynamic", condition_dim=5)
    x, other_x = torch.randn(4, 8), torch.randn(4, 8)
    condition, other_condition = torch.randn(4, 5), torch.randn(4, 5)

    out, flat = hn(x, condition=condition)
    _, same = hn(other_x, condition=condition.clone())
    _, changed = hn(x, condition=other_condition)
    assert torch.equal(flat, same)
    assert not torch.allclose(flat, changed)
    for b in range(4):
        torch.testing.assert_close(out[b : b + 1], plain_copy(target, hn, flat[b])(x[b : b + 1]))
    # Without condition=, the target's own input conditions the weights.
    default = TorchHyperNetwork(target, mode="dynamic")
    assert not torch.allclose(default(x)[1], default(other_x)[1])
    assert torch.equal(default(x)[1], default(x.clone())[1])


def test_condition_batch_must_match_the_input_batch() -> None:
    hn = TorchHyperNetwork(small_mlp(), mode="dynamic", condition_dim=5)
    with pytest.raises(HyperNetworkError) as info:
        hn(torch.randn(5, 8), condition=torch.randn(3, 5))
    message = str(info.value)
    assert re.search(r"\b3\b", message) and re.search(r"\b5\b", message), message
    assert "batch" in message


def test_dynamic_generation_and_forward_are_batched(monkeypatch: pytest.MonkeyPatch) -> None:
    from hypernn_gen.kernel import torch as kernel_torch  # the runtime's per-sample code

    real_vmap = kernel_torch.vmap
    vmap_calls = []

    def counting_vmap(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        vmap_calls.append(1)
        return real_vmap(*args, **kwargs)

    monkeypatch.setattr(kernel_torch, "vmap", counting_vmap)
    target = small_mlp()
    hn = TorchHyperNetwork(target, mode="dynamic")
    forwards = []
    hn.target.register_forward_pre_hook(lambda module, args: forwards.append(1))
    x = torch.randn(7, 8)
    out, flat = hn(x)
    assert flat.shape[0] == 7
    assert len(vmap_calls) == 1
    assert len(forwards) == 1, f"target forward ran {len(forwards)} times for a batch of 7"
    torch.testing.assert_close(out[6:], plain_copy(target, hn, flat[6])(x[6:]))


# -- layout round trip --------------------------------------------------------------------------


def test_flat_layout_is_named_parameters_order() -> None:
    target = PartlyFrozen()
    hn = TorchHyperNetwork(target, chunking="flat")  # no padding between tensors
    params = dict(target.named_parameters())
    flat = hn.flatten_params(params)
    expected = torch.cat([p.detach().reshape(-1) for p in target.parameters() if p.requires_grad])
    assert torch.equal(flat, expected)
    unflat = hn.unflatten_params(flat)
    assert list(unflat) == trainable_names(target)
    for name, tensor in unflat.items():
        assert torch.equal(tensor, params[name])


@pytest.mark.parametrize("factory", [seed_mlp, small_cnn, TiedLM, PartlyFrozen])
def test_target_weights_round_trip_through_the_flat_vector(factory) -> None:  # noqa: ANN001
    target = factory().eval()
    x = {
        seed_mlp: lambda: torch.randn(5, 8),
        small_cnn: lambda: torch.randn(5, 3, 8, 8),
        TiedLM: lambda: torch.randint(0, 11, (5, 4)),
        PartlyFrozen: lambda: torch.randn(5, 5),
    }[factory]()
    with torch.no_grad():
        expected = target(x)
    static = TorchHyperNetwork(target).eval()
    flat = static.flatten_params(dict(target.named_parameters()))
    out, returned = static(x, generated_params=flat)
    assert returned is flat
    assert torch.equal(out, expected)

    dynamic = TorchHyperNetwork(target, mode="dynamic").eval()
    out, _ = dynamic(x, generated_params=flat.expand(5, -1))
    torch.testing.assert_close(out, expected)


# -- initialisation -----------------------------------------------------------------------------

INIT_CASES = [
    (seed_mlp, lambda: torch.randn(512, 8)),
    (small_cnn, lambda: torch.randn(32, 3, 12, 12)),
    (small_transformer, lambda: torch.randn(16, 10, 32)),
]


@pytest.mark.parametrize(
    ("factory", "make_input"), INIT_CASES, ids=["seed_mlp", "cnn", "transformer"]
)
def test_default_init_matches_the_target_scale(factory, make_input) -> None:  # noqa: ANN001
    hn = TorchHyperNetwork(factory()).eval()
    fresh = factory().eval()  # an independent draw of the target's own init
    x = make_input()
    with torch.no_grad():
        out, flat = hn(x)
        expected = fresh(x)
    fresh_params = {n: p.detach() for n, p in fresh.named_parameters()}
    checked = 0
    for name, tensor in hn.unflatten_params(flat.detach()).items():
        if tensor.dim() < 2:
            continue
        ratio = float(tensor.std() / fresh_params[name].std())
        assert 0.5 <= ratio <= 2.0, f"{name}: generated std is {ratio:.2f}x the target's"
        checked += 1
    assert checked >= 3
    ratio = float(out.std() / expected.std())
    assert 1 / 3 <= ratio <= 3, f"output std is {ratio:.2f}x the plain target's"


def test_init_statistics_come_from_the_target() -> None:
    target = small_mlp()
    with torch.no_grad():
        target[2].bias.fill_(0.25)
        target[2].weight.mul_(10)
    hn = TorchHyperNetwork(target)
    _, flat = hn(torch.randn(2, 8))
    params = hn.unflatten_params(flat.detach())
    torch.testing.assert_close(params["2.bias"], torch.full((3,), 0.25))
    ratio = float(params["2.weight"].std() / target[2].weight.detach().std())
    assert 0.5 <= ratio <= 2.0


# -- persistence --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_save_and_load_restore_outputs_and_buffers(mode: str, tmp_path) -> None:  # noqa: ANN001
    def build() -> TorchHyperNetwork:
        return TorchHyperNetwork(bn_cnn(), mode=mode, condition_dim=3 * 6 * 6)

    trained = build()
    optimizer = torch.optim.Adam(trained.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        out, _ = trained(torch.randn(4, 3, 6, 6) + 0.5)
        out.pow(2).mean().backward()
        optimizer.step()
    trained.eval()
    x = torch.randn(3, 3, 6, 6)
    expected, expected_flat = trained(x)

    path = tmp_path / "hypernetwork.pt"
    trained.save(str(path))
    fresh = build().eval()
    assert not torch.equal(fresh(x)[0], expected)
    fresh.load(str(path))
    out, flat = fresh(x)
    assert torch.equal(out, expected) and torch.equal(flat, expected_flat)
    assert torch.equal(fresh.target[1].running_mean, trained.target[1].running_mean)
    assert int(fresh.target[1].num_batches_tracked) == 3

    via_state_dict = build().eval()
    via_state_dict.load_state_dict(trained.state_dict())
    assert torch.equal(via_state_dict(x)[0], expected)
    for key, value in trained.state_dict().items():
        assert torch.equal(via_state_dict.state_dict()[key], value), key


# -- errors -------------------------------------------------------------------------------------


def test_embedding_returning_a_non_tensor_is_reported() -> None:
    class Listy(TorchEmbeddingModule):
        def forward(self) -> list:
            return [0.0] * self.num_embeddings

    hn = TorchHyperNetwork(small_mlp(), Listy, embedding_dim=4, num_embeddings=10)
    with pytest.raises(HyperNetworkError) as info:
        hn(torch.randn(2, 8))
    message = str(info.value)
    assert "embedding module returned list" in message
    assert "(10, 4)" in message


def test_generator_making_too_few_values_names_the_count() -> None:
    class Short(TorchWeightGenerator):
        def __init__(self, embedding_dim: int, hidden_dim: int) -> None:
            super().__init__(embedding_dim, hidden_dim)
            self.linear = nn.Linear(embedding_dim, hidden_dim - 1)

        def forward(self, embedding: torch.Tensor) -> torch.Tensor:
            return self.linear(embedding)

    target = small_mlp()
    needed = sum(p.numel() for p in target.parameters())
    hn = TorchHyperNetwork(target, weight_generator_constructor=Short, num_embeddings=10)
    with pytest.raises(HyperNetworkError) as info:
        hn(torch.randn(2, 8))
    message = str(info.value)
    assert f"needs {needed}" in message
    assert f"hidden_dim={hn.hidden_dim}" in message and "num_embeddings=10" in message


@pytest.mark.parametrize(
    ("mode", "shape"),
    [("static", lambda n: (n + 1,)), ("static", lambda n: (2, n)), ("dynamic", lambda n: (n,))],
    ids=["static-long", "static-batched", "dynamic-unbatched"],
)
def test_generated_params_of_the_wrong_shape_are_refused(mode: str, shape) -> None:  # noqa: ANN001
    hn = TorchHyperNetwork(small_mlp(), mode=mode)
    n = hn.layout.flat_size
    bad = torch.zeros(shape(n))
    with pytest.raises(HyperNetworkError) as info:
        hn(torch.randn(2, 8), generated_params=bad)
    message = str(info.value)
    assert str(tuple(bad.shape)) in message
    assert str(n) in message and "flatten_params" in message


# -- gradients ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_gradients_reach_every_hypernetwork_part(mode: str) -> None:
    hn = TorchHyperNetwork(seed_mlp(), mode=mode)
    out, _ = hn(torch.randn(6, 8))
    loss = (out - torch.randn_like(out)).pow(2).mean()
    loss.backward()
    for name, module in (("embedding", hn.embedding_module), ("generator", hn.weight_generator)):
        for pname, p in module.named_parameters():
            assert p.grad is not None, f"{name}.{pname} has no grad"
            assert torch.isfinite(p.grad).all(), f"{name}.{pname}"
            assert p.grad.abs().sum() > 0, f"{name}.{pname} has a zero grad"
    for p in (hn.param_scale, hn.param_shift):
        assert p.grad is not None and torch.isfinite(p.grad).all()
        assert (p.grad != 0).all(), "every generated tensor's scale and shift should learn"
