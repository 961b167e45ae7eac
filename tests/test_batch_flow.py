"""Where the batch goes: the fused dynamic path only fuses modules whose inputs carry it.

A fused layer computes sample ``b`` from row ``b`` of its input. GPT-2's position ids ``(1, L)``
and T5's relative-position buckets ``(q, k)`` have no per-sample batch dimension, so fusing the
Embedding that looks them up would read the wrong sample's table: silently wrong numbers. The
planner runs the target on ``meta`` with two batch sizes (``fuse.probe_batch_flow``) and falls
back to the reference (every sample through the whole target) where it cannot prove the fast
path equal to it.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from gen_support import hypernetwork_class, import_file
from torch import nn
from torch.func import functional_call

from hypernn_gen.cli import main
from hypernn_gen.design import design_layout
from hypernn_gen.fuse import PROBE_BATCHES, plan_torch_fusion, probe_batch_flow
from hypernn_gen.trace_torch import trace_module

POS_EMB = textwrap.dedent(
    """
    import torch
    from torch import nn


    class PosEmb(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(10, 4)
            self.pos = nn.Embedding(8, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, ids):
            positions = torch.arange(ids.shape[1]).unsqueeze(0)  # (1, L), shared by every sample
            return self.head(self.tok(ids) + self.pos(positions))


    example_input = torch.zeros(2, 6, dtype=torch.long)
    """
)


class _Pos(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(10, 4)
        self.pos = nn.Embedding(8, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        return self.head(self.tok(ids) + self.pos(positions))


def test_probe_sees_which_inputs_carry_the_batch() -> None:
    flow = probe_batch_flow(_Pos(), (torch.zeros(2, 6, dtype=torch.long),))
    assert flow.error is None
    assert flow.calls["tok"] == ((True,),)
    assert flow.calls["pos"] == ((False,),)  # (1, 6) for every batch size
    assert flow.calls["head"] == ((True,),)
    assert flow.batched_input("tok") and not flow.shared_input("tok")
    assert flow.shared_input("pos") and not flow.batched_input("pos")


def test_probe_reports_a_forward_that_cannot_run_on_meta() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) if bool(x.sum() > 0) else x

    flow = probe_batch_flow(DataDependent(), (torch.zeros(2, 3),))
    assert flow.error is not None and flow.calls == {}


def _plan(module: nn.Module, x: torch.Tensor):
    layout, chunking = design_layout(trace_module(module))
    return plan_torch_fusion(module, layout, chunking, flow=probe_batch_flow(module, (x,)))


class _PosSqueezed(_Pos):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        return self.head(self.tok(ids) + self.pos(positions).squeeze(0))


def test_a_shared_input_whose_output_is_only_broadcast_is_repeated_per_sample() -> None:
    plan = _plan(_Pos(), torch.zeros(2, 6, dtype=torch.long))
    assert [(f.path, f.kind, f.broadcast) for f in plan.fused] == [
        ("tok", "embedding", False),
        ("pos", "embedding", True),  # (1, 6, 4) added to (batch, 6, 4): ids repeated per sample
        ("head", "linear", False),
    ]
    assert plan.reasons == ()


def test_a_module_with_only_shared_inputs_sends_the_whole_target_per_sample() -> None:
    """The output of the shared lookup is squeezed: not provably broadcast, so no guess."""
    plan = _plan(_PosSqueezed(), torch.zeros(2, 6, dtype=torch.long))
    assert plan.fused == ()  # the root, PER_SAMPLE's "", runs every sample alone
    ((path, why),) = plan.reasons
    assert path == "" and why.startswith("pos: none of its inputs has the batch first")
    assert "used by squeeze" in why


def test_a_shared_input_beside_a_batched_one_keeps_that_module_out_of_the_fused_path() -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.bias = nn.Parameter(torch.zeros(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.gate(x, torch.ones(1, 4))

        def gate(self, x: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
            return x * shared + self.bias

    plan = _plan(Mixed(), torch.zeros(2, 4))
    # the root owns ``bias``, used directly: only added to a batched (batch, 4), so it gets one
    # value per sample, shaped (batch, 4); the Linear inside it is fused
    kinds = [(f.path, f.kind) for f in plan.fused]
    assert kinds == [("", "direct"), ("a", "linear")] and plan.fused[0].segments == 2
    assert plan.per_sample == ()
    flow = probe_batch_flow(Mixed(), (torch.zeros(2, 4),))
    assert flow.calls[""] == ((True,),) and flow.calls["a"] == ((True,),)
    assert PROBE_BATCHES[0] != PROBE_BATCHES[1]


def test_generated_file_with_shared_position_ids_equals_each_sample_alone(tmp_path: Path) -> None:
    """Fused, the position table of sample 0 was used for every sample (off by ~10%)."""
    target = tmp_path / "pos_emb.py"
    target.write_text(POS_EMB)
    out = tmp_path / "pos_emb_hyper.py"
    assert main([str(target), "--mode", "dynamic", "--embedding-dim", "8", "-o", str(out)]) == 0
    assert '("pos", "embedding", 1, None, 0, True)' in out.read_text()  # fused, broadcast
    generated = import_file(out)
    torch.manual_seed(0)
    hyper = hypernetwork_class(generated)()
    ids = torch.randint(0, 10, (3, 6))
    with torch.no_grad():
        output, _ = hyper(ids)
        flat = hyper.generate_params(ids)
    assert (flat[0] - flat[1]).abs().max() > 1e-4, "weight sets do not differ: vacuous"
    plain = import_file(target).PosEmb()
    for b in range(ids.shape[0]):
        params = {
            p.path: flat[b, p.offset : p.offset + p.size].view(p.shape) for p in generated.GENERATED
        }
        expected = functional_call(plain, params, (ids[b : b + 1],))
        torch.testing.assert_close(output[b : b + 1], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target", ["seed_mlp.py", "cnn.py"])
def test_zoo_targets_keep_every_layer_fused(target: str) -> None:
    """The probe is conservative, not timid: a plain MLP/CNN still fuses every layer."""
    root = Path(__file__).parents[1] / "generated_examples" / "targets"
    module = import_file(root / target)
    net = module.make_target() if hasattr(module, "make_target") else module.SmallCNN()
    plan = _plan(net, module.example_input)
    assert plan.per_sample == () and len(plan.fused) >= 3
