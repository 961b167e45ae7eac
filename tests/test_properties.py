"""Property-based: random small MLP and CNN targets, generated static and dynamic.

Each example writes a target file, generates both modes with :func:`hypernn_gen.generate.generate`,
imports the results and checks that (a) the generated hypernetwork and its runtime twin
(TorchHyperNetwork) give the same outputs after a state-dict transfer, and (b) the target's own
parameters, fed through the layout (flatten_params -> generated_params), reproduce the plain
target. A shrunk failure shows the target's source (``note``).
"""

from __future__ import annotations

import copy
import itertools
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from gen_support import hypernetwork_class, import_file
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from tolerances import assert_close, for_mode
from torch import nn

from hypernn_gen.generate import GenerateOptions, generate
from hypernn_gen.runtime.torch import TorchHyperNetwork

SETTINGS = settings(
    max_examples=10,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
ACTIVATIONS = {"tanh": "nn.Tanh()", "relu": "nn.ReLU()", "gelu": "nn.GELU()"}
BATCH = 3
_files = itertools.count()


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread per test process: pytest -n 2 on 2 cores would oversubscribe them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@st.composite
def mlp_sources(draw: st.DrawFn) -> tuple[str, tuple[int, ...]]:
    depth = draw(st.integers(1, 3))
    widths = draw(st.lists(st.integers(1, 32), min_size=depth + 1, max_size=depth + 1))
    layers = []
    for i in range(depth):
        bias = draw(st.booleans())
        layers.append(f"nn.Linear({widths[i]}, {widths[i + 1]}, bias={bias})")
        if i < depth - 1:
            layers.append(ACTIVATIONS[draw(st.sampled_from(sorted(ACTIVATIONS)))])
    return _source(layers, (BATCH, widths[0])), (BATCH, widths[0])


@st.composite
def cnn_sources(draw: st.DrawFn) -> tuple[str, tuple[int, ...]]:
    depth = draw(st.integers(1, 2))
    channels = draw(st.lists(st.integers(1, 4), min_size=depth + 1, max_size=depth + 1))
    layers = []
    for i in range(depth):
        kernel = draw(st.integers(1, 3))
        bias = draw(st.booleans())
        layers.append(f"nn.Conv2d({channels[i]}, {channels[i + 1]}, {kernel}, bias={bias})")
        if i < depth - 1:
            layers.append(ACTIVATIONS[draw(st.sampled_from(sorted(ACTIVATIONS)))])
    shape = (BATCH, channels[0], 6, 6)
    return _source(layers, shape), shape


def _source(layers: list[str], shape: tuple[int, ...]) -> str:
    body = ",\n        ".join(layers)
    return (
        '"""A random target for the property tests."""\n\n'
        "import torch\n"
        "from torch import nn\n\n\n"
        "def make_target() -> nn.Module:\n"
        f"    return nn.Sequential(\n        {body},\n    )\n\n\n"
        f"example_input = torch.zeros{shape}\n"
    )


def check_target(source: str, shape: tuple[int, ...]) -> None:
    note(f"target file:\n{source}")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        target_file = directory / f"target_{next(_files)}.py"
        target_file.write_text(source)
        namespace: dict = {}
        exec(compile(source, str(target_file), "exec"), namespace)  # the plain target
        plain = namespace["make_target"]()
        x = torch.randn(shape)

        for mode in ("static", "dynamic"):
            out = directory / f"{target_file.stem}_{mode}.py"
            result = generate(GenerateOptions(target=str(target_file), mode=mode, output=str(out)))
            out.write_text(result.text)
            module = import_file(out)
            tol = for_mode(mode)

            hyper = hypernetwork_class(module)(copy.deepcopy(plain))
            runtime = TorchHyperNetwork(
                copy.deepcopy(plain),
                mode=mode,
                condition_dim=math.prod(shape[1:]) if mode == "dynamic" else None,
                embedding_dim=32,  # the default chunking, as the generator's
            )
            assert set(hyper.state_dict()) == set(runtime.state_dict())
            hyper.load_state_dict(runtime.state_dict())
            with torch.no_grad():
                ours, theirs = hyper(x)[0], runtime(x)[0]
                note(f"{mode}: max |generated - runtime| = {(ours - theirs).abs().max():.3g}")
                assert_close(ours, theirs, tol, f"{mode}: generated vs runtime")

                flat = hyper.flatten_params(dict(plain.named_parameters()))
                assert flat.shape == (module.FLAT_SIZE,)
                weights = flat if mode == "static" else flat.repeat(BATCH, 1)
                reference = plain(x)
                assert_close(
                    hyper(x, generated_params=weights)[0], reference, tol, f"{mode}: round trip"
                )


@pytest.mark.slow
@SETTINGS
@given(mlp_sources())
def test_random_mlps(example: tuple[str, tuple[int, ...]]) -> None:
    check_target(*example)


@pytest.mark.slow
@SETTINGS
@given(cnn_sources())
def test_random_cnns(example: tuple[str, tuple[int, ...]]) -> None:
    check_target(*example)


def test_strategies_produce_buildable_targets() -> None:
    """The target sources are valid and match their example shapes (guards the strategies)."""
    namespace: dict = {}
    source = _source(
        ["nn.Linear(3, 2, bias=False)", "nn.GELU()", "nn.Linear(2, 1, bias=True)"], (2, 3)
    )
    exec(source, namespace)
    model = namespace["make_target"]()
    assert isinstance(model, nn.Sequential) and model(namespace["example_input"]).shape == (2, 1)
