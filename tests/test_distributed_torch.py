"""Generated hypernetworks train under torch.distributed exactly like in one process.

The seed MLP's static and dynamic hypernetworks are generated into a temporary directory with the
real CLI, then trained by two processes started with ``torchrun --standalone --nproc_per_node 2``
(gloo, CPU; ``tests/distributed_worker.py``) for 5 SGD steps on a fixed global batch of 8, each
rank on its half, once under ``DistributedDataParallel`` and once under FSDP2 (``fully_shard``).
The loss is the mean over a rank's samples and both halves have 4, so the gradient averaged over
the ranks is the gradient of the mean loss over the whole batch. That holds in dynamic mode too:
every sample's output depends only on its own input and the shared parameters. After the 5 steps
every parameter must equal a single-process run on the whole batch within ``ATOL`` = 1e-6,
absolute (float32: the ranks sum their halves in another order than one process does).

One torchrun launch runs all four cases (process start-up dominates: ~15 s for two processes on
two cores). FSDP2 is attempted at run time; if it fails here, its cases skip with the error.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().with_name("distributed_worker.py")
SEED_MLP = REPO / "generated_examples" / "targets" / "seed_mlp.py"
MODES = ("static", "dynamic")
# Measured here: at most 3e-8 apart. Every parameter moves by more than 2 * ATOL in the 5 steps
# (the least, the dynamic embedding's first modulation layer, by 4.5e-6), so a wrong gradient
# average, a missed step or a rank's stale copy would fail.
ATOL, RTOL = 1e-6, 0.0

pytestmark = pytest.mark.slow


def load_worker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_distributed_worker", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hypernn_gen(*args: str) -> None:
    """The real CLI, in a subprocess (the console script next to this Python when installed)."""
    script = Path(sys.executable).with_name("hypernn-gen")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "hypernn_gen"]
    result = subprocess.run(
        [*command, *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Generate both modes, train them under torchrun once; the generated file per mode."""
    directory = tmp_path_factory.mktemp("distributed")
    files = {}
    for mode in MODES:
        files[mode] = directory / f"seed_mlp_torch_{mode}.py"
        hypernn_gen(str(SEED_MLP), "--mode", mode, "-o", str(files[mode]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # torchrun is `python -m torch.distributed.run`; this way it is the same interpreter.
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    result = subprocess.run(
        [*command, str(WORKER), str(directory), *(str(files[m]) for m in MODES)],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return files


def reference(path: Path) -> dict[str, torch.Tensor]:
    """One process, the whole global batch, the same seed, steps and optimiser."""
    worker = load_worker()
    model = worker.build(path)
    x, y = worker.global_batch()
    worker.train(model, x, y)
    return {name: p.detach() for name, p in model.named_parameters()}


def check(result: Path, path: Path) -> None:
    error = result.with_suffix(".error")
    if error.exists():
        lines = error.read_text().strip().splitlines()
        pytest.skip(f"{result.stem} could not run here: {lines[-1]}")
    trained = torch.load(result)
    expected = reference(path)
    assert trained.keys() == expected.keys()
    worker = load_worker()
    initial = worker.build(path)
    for name, p0 in initial.named_parameters():
        if not p0.requires_grad:  # the frozen zero-size anchor of a fully generated target
            continue
        moved = (expected[name] - p0.detach()).abs().max().item()
        assert moved > 2 * ATOL, f"{name} moved only {moved:.1e} in {worker.STEPS} steps"
        torch.testing.assert_close(
            trained[name],
            expected[name],
            atol=ATOL,
            rtol=RTOL,
            msg=lambda m, name=name: f"{name}: {m}",
        )


@pytest.mark.parametrize("mode", MODES)
def test_ddp_matches_single_process(mode: str, runs: dict[str, Path]) -> None:
    path = runs[mode]
    check(path.with_name(f"{path.stem}-ddp.pt"), path)


@pytest.mark.parametrize("mode", MODES)
def test_fsdp2_matches_single_process(mode: str, runs: dict[str, Path]) -> None:
    path = runs[mode]
    check(path.with_name(f"{path.stem}-fsdp2.pt"), path)
