"""Per-sample (vmap) execution of real models' calls: outputs that are not tensors, tensors
passed by keyword.

Seen on transformers models (issue 15): GPT-2 and Llama return a ``ModelOutput`` holding a
``DynamicCache`` (an object with tensors, not a pytree), nanoGPT returns ``(logits, None)``,
and transformers passes ``attention_mask=`` by keyword to attention modules that run per sample.
Each test compares against an independent computation: every sample through the plain module
alone with its own weights (``functional_call``), or the plain target on the batch.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from gen_support import hypernetwork_class, import_file
from torch import nn
from torch.func import functional_call

from hypernn_gen.cli import main
from hypernn_gen.kernel import torch as kernel


class Cache:
    """Like transformers' DynamicCache: a plain object (no pytree) holding tensors in a list."""

    def __init__(self) -> None:
        self.layers: list[dict[str, torch.Tensor]] = []
        self.seen = 0


@dataclass
class Output:
    logits: torch.Tensor
    cache: Cache
    extra: None = None


class Several(nn.Module):
    """Returns what real models return: a tensor beside None, a dict, a dataclass with a cache."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor, *, kind: str) -> object:
        y = self.lin(x)
        if kind == "nanogpt":
            return y, None
        if kind == "dict":
            return {"logits": y, "loss": None, "steps": 3, "hidden": [y * 2]}
        cache = Cache()
        cache.layers.append({"keys": y + 1})
        cache.seen = y.shape[-1]
        return Output(y, cache)


def _loop(module: nn.Module, params: dict, x: torch.Tensor, **kwargs: object) -> list:
    return [
        functional_call(module, {n: v[b] for n, v in params.items()}, (x[b : b + 1],), kwargs)
        for b in range(x.shape[0])
    ]


def _params(module: nn.Module, batch: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {n: torch.randn(batch, *p.shape) for n, p in module.named_parameters()}


def test_nanogpt_style_tuple_with_none() -> None:
    module, x = Several(), torch.randn(4, 3)
    params = _params(module, 4)
    out = kernel.run_per_sample(module, params, 4, (x,), {"kind": "nanogpt"})
    assert isinstance(out, tuple) and out[1] is None
    expected = torch.cat([o[0] for o in _loop(module, params, x, kind="nanogpt")])
    torch.testing.assert_close(out[0], expected)


def test_dict_output_keeps_plain_values_and_nested_tensors() -> None:
    module, x = Several(), torch.randn(4, 3)
    params = _params(module, 4)
    out = kernel.run_per_sample(module, params, 4, (x,), {"kind": "dict"})
    assert out["loss"] is None and out["steps"] == 3
    loop = _loop(module, params, x, kind="dict")
    torch.testing.assert_close(out["logits"], torch.cat([o["logits"] for o in loop]))
    torch.testing.assert_close(out["hidden"][0], torch.cat([o["hidden"][0] for o in loop]))


def test_an_object_holding_tensors_is_rebuilt_with_the_batch_first() -> None:
    module, x = Several(), torch.randn(4, 3)
    params = _params(module, 4)
    out = kernel.run_per_sample(module, params, 4, (x,), {"kind": "cache"})
    loop = _loop(module, params, x, kind="cache")
    assert isinstance(out, Output) and isinstance(out.cache, Cache) and out.extra is None
    assert out.cache.seen == 4
    keys = torch.cat([o.cache.layers[0]["keys"] for o in loop])
    torch.testing.assert_close(out.cache.layers[0]["keys"], keys)
    torch.testing.assert_close(out.logits, torch.cat([o.logits for o in loop]))


def test_keyword_tensors_with_the_batch_are_split_per_sample() -> None:
    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4))

        def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            return x * self.w * mask

    module, x = Gate(), torch.randn(3, 4)
    mask = torch.randn(3, 4)
    params = _params(module, 3)
    out = kernel.run_per_sample(module, params, 3, (x,), {"mask": mask})
    expected = torch.cat(
        [
            functional_call(
                module, {"w": params["w"][b]}, (x[b : b + 1],), {"mask": mask[b : b + 1]}
            )
            for b in range(3)
        ]
    )
    torch.testing.assert_close(out, expected)


def test_recorded_flags_decide_and_are_checked() -> None:
    """A shared tensor whose first dimension happens to equal the batch: the flags say shared."""

    class Add(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(2))

        def forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
            return x * self.w + table.sum(0)

    module, x, table = Add(), torch.randn(2, 2), torch.randn(2, 2)
    params = _params(module, 2)
    out = kernel.run_per_sample(module, params, 2, (x,), {"table": table}, (True, False))
    expected = x * params["w"] + table.sum(0)
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="not the 2 inputs .* seen when the file was generated"):
        kernel.run_per_sample(module, params, 2, (x,), {"table": table[:1]}, (True, True))


KWARG_TARGET = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4))  # reduced, not broadcast: runs per sample

        def forward(self, x, mask=None, table=None):
            return x * self.w.cumsum(0) * mask + table.sum(0)


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, 4)
            self.gate = Gate()
            self.out = nn.Linear(4, 3)

        def forward(self, x, mask):
            table = torch.ones(2, 4) * 0.5  # shared: (2, 4) whatever the batch
            return self.out(self.gate(self.inp(x), mask=mask, table=table))


    def make_target():
        return Net()


    example_inputs = (torch.zeros(2, 4), torch.ones(2, 4))
    """
)


def test_generated_file_splits_keyword_tensors_by_the_probe(tmp_path: Path) -> None:
    """Repro r3: ``mask=`` reached the per-sample module unsplit (wrong shape, no error); the
    shared ``table`` has the batch size 2 as its first dimension, so a shape test would split it."""
    target = tmp_path / "kwarg_net.py"
    target.write_text(KWARG_TARGET)
    out = tmp_path / "kwarg_hyper.py"
    assert main([str(target), "--mode", "dynamic", "--embedding-dim", "8", "-o", str(out)]) == 0
    generated = import_file(out)
    assert generated.BATCHED_INPUTS == {"gate": (True, True, False)}
    torch.manual_seed(0)
    hyper = hypernetwork_class(generated)()
    x, mask = torch.randn(2, 4), torch.randn(2, 4)
    fused, _ = hyper(x, mask)
    flat = hyper.generate_params(x)
    assert (flat[0] - flat[1]).abs().max() > 1e-4, "weight sets do not differ: vacuous"
    plain = import_file(target).Net()
    for b in range(2):
        params = {
            p.path: flat[b, p.offset : p.offset + p.size].view(p.shape) for p in generated.GENERATED
        }
        expected = functional_call(plain, params, (x[b : b + 1], mask[b : b + 1]))
        torch.testing.assert_close(fused[b : b + 1], expected, rtol=1e-5, atol=1e-6)
    materialised, _ = hyper(x, mask, generated_params=flat)
    torch.testing.assert_close(fused, materialised, rtol=1e-5, atol=1e-6)


DROP_PATH = textwrap.dedent(
    '''
    import torch
    from torch import nn


    class DropPath(nn.Module):
        """Stochastic depth as torchvision/timm write it: in-place randomness on a fresh tensor."""

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            y = self.lin(x)
            if self.training:
                y = y * torch.empty(y.shape[0], 1).bernoulli_(0.5) / 0.5
            return y


    example_input = torch.zeros(2, 4)
    '''
)


def test_in_place_randomness_runs_batched_on_the_fused_path_and_is_refused_per_sample(
    tmp_path: Path,
) -> None:
    """Repro r6: vmap cannot draw different in-place randomness into an unbatched tensor. The
    fused path runs the parameter-free root on the whole batch (one draw per sample, as the
    plain target); the per-sample path refuses in one line naming the fix."""
    target = tmp_path / "drop_path.py"
    target.write_text(DROP_PATH)
    out = tmp_path / "drop_path_hyper.py"
    assert main([str(target), "--mode", "dynamic", "--embedding-dim", "8", "-o", str(out)]) == 0
    generated = import_file(out)
    torch.manual_seed(0)
    hyper = hypernetwork_class(generated)().train()
    with torch.no_grad():
        hyper.embedding_module.modulation[-1].weight.zero_()  # every sample: the same weights
    x = torch.randn(64, 4)
    flat = hyper.generate_params(x).detach()
    plain = import_file(target).DropPath().train()
    params = {
        p.path: flat[0, p.offset : p.offset + p.size].view(p.shape) for p in generated.GENERATED
    }
    torch.manual_seed(5)
    fused, _ = hyper(x)
    torch.manual_seed(5)
    expected = functional_call(plain, params, (x,))
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)
    dropped = (fused == 0).all(1)
    assert 0 < int(dropped.sum()) < 64  # samples drawn apart, not all the same
    with pytest.raises(ValueError, match=r"draws random numbers in place .* eval mode"):
        hyper(x, return_params=True)
    hyper.eval()
    torch.testing.assert_close(hyper(x)[0], hyper(x, return_params=True)[0])


EXAMPLE_CALL = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x, *, attention_mask, scale=None, train=False):
            y = self.lin(x) * attention_mask[..., None]
            return y * scale if scale is not None else y


    def example_call():
        return (torch.zeros(2, 5, 4),), {"attention_mask": torch.ones(2, 5), "train": True}
    """
)


def test_example_call_declares_keywords_and_plain_values(tmp_path: Path) -> None:
    """A forward that needs a keyword-only tensor and a flag (repro r11's torch twin): the file's
    ``example_call`` describes the whole call; the probe resizes the keyword tensor with the
    batch; the generated ``__main__`` makes the same call."""
    target = tmp_path / "masked.py"
    target.write_text(EXAMPLE_CALL)
    out = tmp_path / "masked_dynamic.py"
    assert main([str(target), "--mode", "dynamic", "--embedding-dim", "8", "-o", str(out)]) == 0
    text = out.read_text()
    assert (
        "kwargs = {'attention_mask': torch.randn((2, 5), dtype=torch.float32), 'train': True}"
        in text.replace('"', "'")
    )
    run = subprocess.run(
        [sys.executable, str(out)], capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, run.stderr
    assert "output: (2, 5, 3)" in run.stdout
    assert "fusion:   fused: lin" in text  # the probe ran with the keyword tensor resized
    torch.manual_seed(0)
    hyper = hypernetwork_class(import_file(out))()
    x, mask = torch.randn(3, 5, 4), torch.rand(3, 5)
    fused, _ = hyper(x, attention_mask=mask)
    materialised, _ = hyper(x, attention_mask=mask, return_params=True)
    torch.testing.assert_close(fused, materialised, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("example_call = (torch.zeros(2, 4),)", "not a pair (positional arguments, keyword"),
        ("example_call = ((None,), {})", "needs a tensor/array as its first positional"),
        ("example_call = ((torch.zeros(2, 4),), {'f': object()})", "holds an object in f"),
        (
            "example_call = ((torch.zeros(2, 4),), {})\nexample_input = torch.zeros(2, 4)",
            "defines both example_call and example_input",
        ),
    ],
)
def test_a_bad_example_call_is_one_clear_line(
    tmp_path: Path, source: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "bad_call.py"
    target.write_text(
        "import torch\nfrom torch import nn\n\n\nclass Net(nn.Linear):\n"
        "    def forward(self, x, f=None):\n        return super().forward(x)\n\n\n"
        f"def make_target():\n    return Net(4, 3)\n\n\n{source}\n"
    )
    assert main([str(target), "--mode", "dynamic", "-o", str(tmp_path / "out.py")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
