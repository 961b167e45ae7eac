"""Helpers shared by the generator tests: import generated files, find their classes, run the CLI.

Nothing here computes a reference result; the tests build those themselves.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
TARGETS_DIR = REPO / "generated_examples" / "targets"
ZOO_DIR = Path(__file__).resolve().parent / "zoo"
MODES = ("static", "dynamic")

#: The torch targets of generated_examples/targets: how to build one and a batch of inputs.
TORCH_TARGETS = {
    "seed_mlp": ("make_target", lambda b: torch.randn(b, 8)),
    "cnn": ("SmallCNN", lambda b: torch.randn(b, 1, 8, 8)),
    "transformer": ("make_target", lambda b: torch.randint(0, 64, (b, 16))),
}
#: More torch targets, kept under tests/zoo (not in generated_examples): RNNs, nested
#: containers, frozen parameters, Embedding + LayerNorm + BatchNorm1d. The equivalence suite
#: runs over both dictionaries.
ZOO_TARGETS = {
    "rnn": ("RecurrentNet", lambda b: torch.randn(b, 6, 4)),
    "nested": ("Nested", lambda b: torch.randn(b, 6)),
    "frozen": ("make_target", lambda b: torch.randn(b, 5)),
    "normed": ("Normed", lambda b: torch.randint(0, 12, (b, 5))),
}
ALL_TORCH_TARGETS = {**TORCH_TARGETS, **ZOO_TARGETS}


def target_file(name: str) -> Path:
    """Where a torch target of :data:`ALL_TORCH_TARGETS` lives."""
    return (ZOO_DIR if name in ZOO_TARGETS else TARGETS_DIR) / f"{name}.py"


_counter = itertools.count()


def import_file(path: Path, name: str | None = None) -> ModuleType:
    """Import a Python file as a fresh module under a unique name (registered in sys.modules)."""
    name = name or f"_gen_test_{path.stem}_{next(_counter)}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def hypernetwork_class(module: ModuleType) -> type[nn.Module]:
    """The one ``*HyperNetwork`` class a generated file defines."""
    found = [
        v
        for k, v in vars(module).items()
        if k.endswith("HyperNetwork") and isinstance(v, type) and issubclass(v, nn.Module)
    ]
    assert len(found) == 1, f"expected one *HyperNetwork class, found {found}"
    return found[0]


def make_plain_target(name: str) -> nn.Module:
    """A fresh target built from the original file in generated_examples/targets."""
    factory, _ = ALL_TORCH_TARGETS[name]
    module = sys.modules.get(f"_plain_target_{name}") or import_file(
        target_file(name), f"_plain_target_{name}"
    )
    return getattr(module, factory)()


def cli_command() -> list[str]:
    """How to run ``hypernn-gen`` in a subprocess: the console script next to this Python."""
    script = Path(sys.executable).with_name("hypernn-gen")
    if script.exists():
        return [str(script)]
    found = shutil.which("hypernn-gen")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from hypernn_gen.cli import main; sys.exit(main())"]


def run_cli(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``hypernn-gen ARGS`` in a subprocess; text output captured."""
    return subprocess.run(
        [*cli_command(), *args],
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_python(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
