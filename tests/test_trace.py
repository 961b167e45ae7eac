"""trace_target / trace_selected: layouts agree with each framework's own parameter listing."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import torch

from hypernn_gen.errors import TraceError
from hypernn_gen.layout import Layout
from hypernn_gen.load import load_target
from hypernn_gen.select import check_patterns, path_filter
from hypernn_gen.trace import trace_selected, trace_target

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ROOT / "generated_examples" / "targets"


def write(directory: Path, name: str, source: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(source).lstrip())
    return path


def trace(spec: str | Path, **kwargs: object) -> Layout:
    include = kwargs.pop("include", None)
    return trace_target(load_target(str(spec), **kwargs), include=include)


def trace_error(spec: str | Path, **kwargs: object) -> str:
    with pytest.raises(TraceError) as info:
        trace(spec, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def assert_contiguous(layout: Layout) -> None:
    offset = 0
    for t in layout.generated:
        assert t.offset == offset, t.path
        offset += t.size
    assert layout.flat_size == offset == layout.num_generated
    assert all(t.offset == -1 for t in layout.state)


# -- torch ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("file", ["seed_mlp.py", "cnn.py", "transformer.py"])
def test_torch_layout_matches_named_parameters_and_buffers(file: str) -> None:
    loaded = load_target(str(TARGETS / file))
    layout = trace_target(loaded)
    real = loaded.factory()  # small targets: a real build is the reference
    params = dict(real.named_parameters())  # tied parameters once, under their first name
    buffers = dict(real.named_buffers())

    assert [t.path for t in layout.generated] == list(params)
    assert [t.path for t in layout.state] == list(buffers)
    for t in layout.tensors:
        ref = params.get(t.path, buffers.get(t.path))
        assert t.shape == tuple(ref.shape), t.path
        assert t.dtype == str(ref.dtype).removeprefix("torch."), t.path
        assert t.size == ref.numel()
        assert t.collection == ("parameter" if t.path in params else "buffer")
        assert t.reason == ("" if t.generated else "buffer")
    assert layout.num_generated == sum(p.numel() for p in real.parameters())
    assert layout.num_state == sum(b.numel() for b in real.buffers())
    assert_contiguous(layout)
    assert layout.framework == "torch"
    assert layout.target_name == type(real).__name__


def test_tied_embedding_is_generated_once_with_its_alias() -> None:
    loaded = load_target(str(TARGETS / "transformer.py"))
    layout = trace_target(loaded)
    all_names = [n for n, _ in loaded.factory().named_parameters(remove_duplicate=False)]
    assert "head.weight" in all_names and "head.weight" not in [t.path for t in layout.tensors]
    embedding = layout.find("tok_emb.weight")
    assert embedding.aliases == (("head", "weight"),)
    assert layout.num_generated == 15_328  # 2,048 embedding values counted once


def test_init_statistics_are_recorded_without_values() -> None:
    layout = trace(TARGETS / "seed_mlp.py")
    first = layout.find("0.weight")
    # kaiming_uniform_(a=sqrt(5)) on fan_in 8: std = gain / sqrt(fan_in) = sqrt(1/3) / sqrt(8)
    assert first.init_source == "kaiming_uniform_"
    assert first.init_std == pytest.approx(1 / math.sqrt(24), rel=1e-5)
    assert layout.find("0.bias").init_source == "uniform_"


def test_tracing_builds_on_the_meta_device(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "big.py",
        """
        from torch import nn
        devices = []

        def make_target():
            layer = nn.Linear(4096, 4096)  # 64 MiB if it were real
            devices.append(layer.weight.device.type)
            return layer
        """,
    )
    loaded = load_target(str(path), input_shapes=[(2, 4096)])
    layout = trace_target(loaded)
    assert layout.num_generated == 4096 * 4096 + 4096
    assert loaded.source_module.devices and set(loaded.source_module.devices) == {"meta"}


def test_frozen_parameters_and_buffers_are_state(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "frozen.py",
        """
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = nn.Linear(4, 8)
                self.embed.weight.requires_grad_(False)
                self.head = nn.Linear(8, 2)
                self.register_buffer("scale", torch.ones(8))
        """,
    )
    layout = trace(path)
    frozen = layout.find("embed.weight")
    assert (frozen.role, frozen.reason, frozen.offset) == ("state", "frozen", -1)
    assert layout.find("scale").reason == "buffer"
    assert [t.path for t in layout.generated] == ["embed.bias", "head.weight", "head.bias"]
    assert layout.flat_size == 8 + 16 + 2
    assert_contiguous(layout)


def test_instance_is_traced_from_its_init_distribution_and_left_untouched(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "live.py",
        """
        import torch
        from torch import nn
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5))
        example_input = torch.zeros(4, 3)
        """,
    )
    loaded = load_target(str(path))
    before = {k: v.clone() for k, v in loaded.obj.state_dict().items()}
    layout = trace_target(loaded)
    # nn.Linear's default draw, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), not this draw's sample std
    # (trace_instance; measured values only where the values disagree: tests/test_reproducible.py)
    assert layout.find("0.weight").init_source == "kaiming_uniform_"
    assert layout.find("0.weight").init_std == pytest.approx(
        1 / math.sqrt(3) / math.sqrt(3), rel=1e-5
    )
    assert layout.find("0.weight").init_std != pytest.approx(
        float(loaded.obj[0].weight.detach().std(unbiased=False)), rel=1e-4
    )
    after = loaded.obj.state_dict()
    assert all(
        after[k].device.type == "cpu" and torch.equal(after[k], v) for k, v in before.items()
    )
    assert [t.path for t in layout.state] == [n for n, _ in loaded.obj.named_buffers()]


def test_include_predicate_keeps_rejected_parameters_as_state() -> None:
    layout = trace(TARGETS / "seed_mlp.py", include=lambda p: p.startswith("2."))
    assert [t.path for t in layout.generated] == ["2.weight", "2.bias"]
    excluded = [t.path for t in layout.state if t.reason == "excluded"]
    assert excluded == ["0.weight", "0.bias", "4.weight"]
    assert_contiguous(layout)


def test_trace_selected_with_globs() -> None:
    loaded = load_target(str(TARGETS / "transformer.py"))
    layout = trace_selected(loaded, include=["block.*"], exclude=["*.bias"])
    generated = [t.path for t in layout.generated]
    assert generated and all(p.startswith("block.") and not p.endswith(".bias") for p in generated)
    assert layout.find("tok_emb.weight").reason == "excluded"
    assert layout.find("block.causal_mask").reason == "buffer"


def test_path_filter() -> None:
    assert path_filter([], []) is None
    keep = path_filter(["blocks.*"], ["*.bias"])
    assert keep("blocks.0.weight") and not keep("blocks.0.bias") and not keep("head.weight")
    assert path_filter([], ["head.*"])("blocks.0.weight")
    assert not path_filter(["Dense_*"], [])("dense_0.kernel")  # case-sensitive everywhere


def test_unmatched_pattern_names_the_pattern_and_some_paths() -> None:
    layout = trace(TARGETS / "seed_mlp.py")
    with pytest.raises(TraceError) as info:
        check_patterns(layout, include=["0.*"], exclude=["layers.*"])
    assert str(info.value) == (
        "--exclude 'layers.*' matches no parameter; parameter paths look like 0.weight, 0.bias, "
        "2.weight, 2.bias, 4.weight (run hypernn-gen inspect to list them all)"
    )
    loaded = load_target(str(TARGETS / "cnn.py"))
    with pytest.raises(
        TraceError, match=r"^--include 'running_\*' matches no parameter; .*, \.\.\."
    ):
        trace_selected(loaded, include=["running_*"])  # buffers are not parameters


def test_input_shape_that_does_not_fit() -> None:
    message = trace_error(TARGETS / "seed_mlp.py", input_shapes=[(1, 9)])
    assert message.startswith("input shape (1, 9) does not fit the target: RuntimeError: ")
    assert "[1, 9] X [8, 256]" in message
    assert message.endswith("; pass the shapes the target's forward expects with --input-shape")


def test_several_input_shapes_that_do_not_fit() -> None:
    message = trace_error(TARGETS / "seed_mlp.py", input_shapes=[(1, 8), (1, 8)])
    assert message.startswith("input shapes (1, 8), (1, 8) do not fit the target: TypeError")


def test_input_dtype_is_used_for_the_check() -> None:
    message = trace_error(TARGETS / "transformer.py", input_shapes=[(2, 16)])  # float32 ids
    assert message.startswith("input shape (2, 16) does not fit the target")
    layout = trace(TARGETS / "transformer.py", input_shapes=[(2, 16)], input_dtype="int64")
    assert layout.notes == ()


def test_forward_that_cannot_run_on_meta_gives_a_note(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "datadep.py",
        """
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(2, 2)

            def forward(self, x):
                if x.sum() > 0:  # needs values
                    return x
                return self.fc(x)

        example_input = torch.zeros(1, 2)
        """,
    )
    layout = trace(path)
    assert len(layout.notes) == 1
    assert layout.notes[0].startswith("input shape (1, 2) not checked: the forward pass cannot run")
    assert f"({path} line 10)" in layout.notes[0]


def test_no_trainable_parameters(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "allfrozen.py",
        """
        from torch import nn
        def make_target():
            net = nn.Linear(2, 2)
            net.requires_grad_(False)
            return net
        """,
    )
    message = trace_error(path)
    assert "no trainable floating-point parameters to generate" in message
    assert "requires_grad" in message
    message = trace_error(TARGETS / "seed_mlp.py", include=lambda p: False)
    assert "no trainable floating-point parameters" in message and "include/exclude" in message


def test_constructor_failing_during_trace(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "flaky.py",
        """
        from torch import nn
        calls = []

        def make_target():
            calls.append(1)
            if len(calls) > 1:
                raise RuntimeError("only builds once")
            return nn.Linear(2, 2)
        """,
    )
    message = trace_error(path)
    assert message == (
        f"building {path}:make_target failed: RuntimeError: only builds once ({path} line 7); "
        "fix the target so that it builds with no arguments"
    )


# -- Flax -----------------------------------------------------------------------------------------


def _flat(tree: dict, prefix: tuple = ()) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, (*prefix, key)))
        else:
            out[".".join(map(str, (*prefix, key)))] = value
    return out


def _shape_dtype(x: object) -> tuple[tuple[int, ...], str]:
    return tuple(x.shape), str(x.dtype)


@pytest.mark.parametrize("file", ["linen_mlp.py", "linen_cnn.py", "linen_transformer.py"])
def test_linen_layout_matches_eval_shape_of_init(file: str) -> None:
    pytest.importorskip("hypernn_gen.trace_flax")
    import jax
    from flax.core import meta, unfreeze

    loaded = load_target(str(TARGETS / file))
    layout = trace_target(loaded)
    module = loaded.factory() if loaded.factory else loaded.obj
    variables = jax.eval_shape(module.init, jax.random.key(0), *loaded.example_inputs)
    variables = unfreeze(meta.unbox(variables))
    params = {p: _shape_dtype(v) for p, v in _flat(variables.pop("params")).items()}
    others = {
        (collection, p): _shape_dtype(v)
        for collection, tree in variables.items()
        for p, v in _flat(tree).items()
    }

    assert {t.path: (t.shape, t.dtype) for t in layout.generated} == params
    assert {(t.collection, t.path): (t.shape, t.dtype) for t in layout.state} == others
    assert all(t.collection == "params" for t in layout.generated)
    assert all(t.reason == "collection" for t in layout.state)
    assert_contiguous(layout)
    assert layout.framework == "linen"


def test_linen_tied_embedding_counted_once() -> None:
    pytest.importorskip("hypernn_gen.trace_flax")
    layout = trace(TARGETS / "linen_transformer.py")
    embeddings = [t for t in layout.generated if t.path.endswith("embedding")]
    assert [(t.path, t.shape) for t in embeddings] == [("Embed_0.embedding", (64, 32))]
    assert layout.num_generated == 15_328


def test_linen_batch_stats_are_state() -> None:
    pytest.importorskip("hypernn_gen.trace_flax")
    layout = trace(TARGETS / "linen_cnn.py")
    stats = {(t.collection, t.path) for t in layout.state}
    assert stats == {("batch_stats", "BatchNorm_0.mean"), ("batch_stats", "BatchNorm_0.var")}


def test_linen_input_shape_that_does_not_fit() -> None:
    pytest.importorskip("hypernn_gen.trace_flax")
    message = trace_error(
        TARGETS / "linen_transformer.py", input_shapes=[(2, 17)], input_dtype="int32"
    )
    assert "(2, 17)" in message and "Incompatible shapes" in message


@pytest.mark.parametrize("file", ["nnx_mlp.py", "nnx_cnn.py", "nnx_transformer.py"])
def test_nnx_layout_matches_nnx_state(file: str) -> None:
    pytest.importorskip("hypernn_gen.trace_flax")
    from flax import nnx

    loaded = load_target(str(TARGETS / file))
    layout = trace_target(loaded)
    abstract = nnx.eval_shape(loaded.factory)

    def listing(kind: type) -> dict[str, tuple[tuple[int, ...], str]]:
        return {
            ".".join(map(str, path)): _shape_dtype(var.get_value())
            for path, var in nnx.to_flat_state(nnx.state(abstract, kind))
        }

    assert {t.path: (t.shape, t.dtype) for t in layout.generated} == listing(nnx.Param)
    state = {t.path: (t.shape, t.dtype) for t in layout.state}
    batch_stats = listing(nnx.BatchStat)
    assert {p: state[p] for p in batch_stats} == batch_stats
    assert not set(state) & set(listing(nnx.Param))
    assert_contiguous(layout)
    assert layout.framework == "nnx"


def test_nnx_instance(tmp_path: Path) -> None:
    pytest.importorskip("hypernn_gen.trace_flax")
    path = write(
        tmp_path,
        "nnx_live.py",
        """
        from flax import nnx
        net = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
        """,
    )
    loaded = load_target(str(path))
    assert loaded.kind == "instance"
    layout = trace_target(loaded)
    assert [(t.path, t.shape) for t in layout.generated] == [("bias", (2,)), ("kernel", (3, 2))]
    assert layout.find("kernel").init_source == "measured"
