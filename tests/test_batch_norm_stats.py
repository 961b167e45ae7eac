"""Dynamic BatchNorm in training: conditional BatchNorm by default, per-sample statistics on request.

``--batch-norm-stats batch`` (the default; the runtime's ``batch_norm_stats=``): every BatchNorm
normalises with the whole batch's statistics, as the plain target on the batch, then applies
each sample's own weight and bias; the running statistics move as the plain target's. So with
identical per-sample weights the dynamic module equals the plain target on the batch, and a 1x1
feature map (ResNet-18 on small images) trains. ``sample``: each sample normalised alone.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import ModuleType

import pytest
import torch
from gen_support import hypernetwork_class, import_file
from tolerances import DYNAMIC, GRAD, assert_close
from torch import nn

from hypernn_gen.cli import main
from hypernn_gen.errors import HyperNetworkError
from hypernn_gen.runtime.torch import TorchHyperNetwork

TARGET = '''
import torch
from torch import nn


class Net(nn.Module):
    """Conv-BN down to a 1x1 map, a BatchNorm2d there (momentum=None), BatchNorm1d at the end
    (or a 2x2 map, momentum 0.1 and no BatchNorm1d: what per-sample statistics can run)."""

    def __init__(self, one_by_one: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.down = nn.Conv2d(4, 4, 4 if one_by_one else 3)  # 4x4 -> 1x1 (or 2x2)
        self.bn_small = nn.BatchNorm2d(4, momentum=None if one_by_one else 0.1)
        self.head = nn.Linear(4, 3)
        self.bn1d = nn.BatchNorm1d(3) if one_by_one else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.bn_small(self.down(x))).mean((2, 3))
        return self.bn1d(self.head(x))


def make_target() -> nn.Module:
    return Net({one_by_one})


example_input = torch.randn(4, 2, 4, 4)
'''


def _generate(tmp_path: Path, name: str, *flags: str, one_by_one: bool = True) -> ModuleType:
    target = tmp_path / f"{name}_target.py"
    target.write_text(TARGET.replace("{one_by_one}", str(one_by_one)))
    out = tmp_path / f"{name}_dynamic.py"
    assert main([str(target), "--mode", "dynamic", *flags, "-o", str(out)]) == 0
    return import_file(out)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModuleType]:
    tmp = tmp_path_factory.mktemp("bn_stats")
    return {
        "batch": _generate(tmp, "batch"),
        "sample": _generate(tmp, "sample", "--batch-norm-stats", "sample", one_by_one=False),
    }


def _x(batch: int = 5) -> torch.Tensor:
    return torch.randn(batch, 2, 4, 4, generator=torch.Generator().manual_seed(3))


def _loaded(plain: nn.Module, hyper: nn.Module, flat: torch.Tensor) -> nn.Module:
    model = copy.deepcopy(plain)
    model.load_state_dict(hyper.unflatten_params(flat.detach()), strict=False)
    return model


def _buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in module.named_buffers() if not k.startswith("fused_index")}


def test_the_default_is_conditional_batch_norm(files: dict[str, ModuleType]) -> None:
    module = files["batch"]
    assert module.BATCH_NORM_STATS == "batch"
    assert {f[0]: f[1] for f in module.FUSED if "bn" in f[0]} == dict.fromkeys(
        ("bn", "bn_small", "bn1d"), "batch_norm"
    )


def test_identical_weights_equal_the_plain_target_on_the_batch(
    files: dict[str, ModuleType],
) -> None:
    """Two training steps with a 1x1 feature map: the target's own weights for every sample
    (materialising path), and identical generated weights for every sample (fused path: the
    embedding's modulation output zeroed), both against the plain target on the batch."""
    module = files["batch"]
    torch.manual_seed(0)
    plain = module.make_target().train()
    hyper = hypernetwork_class(module)(copy.deepcopy(plain)).train()
    reference = copy.deepcopy(plain)
    for step in range(2):
        x = _x()
        flat = hyper.flatten_params(dict(plain.named_parameters())).expand(len(x), -1)
        out, _ = hyper(x, generated_params=flat)
        assert_close(out, reference(x), DYNAMIC, f"step {step}: materialising path")
        for name, value in _buffers(reference).items():
            assert_close(_buffers(hyper.target)[name], value, DYNAMIC, f"step {step}: {name}")
    assert reference.bn_small.num_batches_tracked.item() == 2

    fused = hypernetwork_class(module)().train()
    with torch.no_grad():
        fused.embedding_module.modulation[-1].weight.zero_()  # scales 1: one weight set for all
    x = _x()
    g = fused.generate_params(x)
    assert torch.equal(g, g[:1].expand_as(g))
    expected = _loaded(module.make_target(), fused, g[0]).train()
    out, none = fused(x)
    assert none is None  # the fused path built no per-sample weights
    assert_close(out, expected(x), DYNAMIC, "fused path")
    for name, value in _buffers(expected).items():
        assert_close(_buffers(fused.target)[name], value, DYNAMIC, f"fused: {name}")


def test_fused_equals_the_materialising_path_with_different_weights(
    files: dict[str, ModuleType],
) -> None:
    module = files["batch"]
    torch.manual_seed(1)
    fused = hypernetwork_class(module)().train()
    materialising = copy.deepcopy(fused)
    x = _x(3)
    out, _ = fused(x)
    ref, g = materialising(x, return_params=True)
    assert g is not None and not torch.equal(g[0], g[1])
    assert_close(out, ref, DYNAMIC, "output")
    w = torch.randn_like(ref)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    theirs = dict(materialising.named_parameters())
    for name, p in fused.named_parameters():
        if not p.numel():  # the target's empty anchor parameter (device and dtype)
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert_close(p.grad, theirs[name].grad, GRAD, f"grad of {name}")
    for name, value in _buffers(materialising.target).items():
        assert_close(_buffers(fused.target)[name], value, DYNAMIC, name)


def test_per_sample_statistics_on_request(files: dict[str, ModuleType], tmp_path: Path) -> None:
    """``sample``: each sample's output is what it gets through the target alone (a batch of
    one), on the fused and the materialising path; a 1x1 map is refused with the reason."""
    module = files["sample"]
    assert module.BATCH_NORM_STATS == "sample"
    torch.manual_seed(2)
    hyper = hypernetwork_class(module)().train()
    x = _x(3)
    with torch.no_grad():
        out, _ = hyper(x)
        ref, g = copy.deepcopy(hyper)(x, return_params=True)
    assert_close(out, ref, DYNAMIC, "fused vs materialising")
    for b in range(len(x)):
        alone = _loaded(module.make_target(), hyper, g[b]).train()
        with torch.no_grad():
            assert_close(out[b : b + 1], alone(x[b : b + 1]), DYNAMIC, f"sample {b}")

    one_by_one = _generate(tmp_path, "sample1x1", "--batch-norm-stats", "sample")
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        hypernetwork_class(one_by_one)().train()(x)


def test_the_runtime_keyword_matches_the_generated_files(files: dict[str, ModuleType]) -> None:
    x = _x(3)
    for stats, module in files.items():
        torch.manual_seed(4)
        plain = module.make_target().train()
        hyper = hypernetwork_class(module)(copy.deepcopy(plain)).train()
        runtime = TorchHyperNetwork(
            copy.deepcopy(plain),
            mode="dynamic",
            condition_shape=(2, 4, 4),
            embedding_dim=module.EMBEDDING_DIM,  # the default chunking, as the CLI's
            batch_norm_stats=stats,
        ).train()
        hyper.load_state_dict(runtime.state_dict())
        out, _ = hyper(x)
        theirs, _ = runtime(x)
        assert_close(out, theirs, DYNAMIC, f"{stats}: output")
        for name, value in _buffers(runtime.target).items():
            assert_close(_buffers(hyper.target)[name], value, DYNAMIC, f"{stats}: {name}")
    with pytest.raises(HyperNetworkError, match="batch_norm_stats must be 'batch' or 'sample'"):
        TorchHyperNetwork(nn.BatchNorm1d(3), mode="dynamic", batch_norm_stats="mean")


def test_an_unknown_value_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    target = tmp_path / "t.py"
    target.write_text(TARGET.replace("{one_by_one}", "True"))
    args = [str(target), "--mode", "dynamic", "--batch-norm-stats", "mean", "-o", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--batch-norm-stats" in err and "'mean'" in err and "batch, sample" in err
