"""A LoRA hypernetwork on a tiny transformers Llama trains under DDP and FSDP2 as in one process.

Two processes (``torchrun --standalone --nproc_per_node 2``, gloo, CPU;
``tests/distributed_lora_worker.py``) train the dynamic LoRA hypernetwork for 5 SGD steps on a
fixed global batch of 8, each rank on its half, under ``DistributedDataParallel`` and under FSDP2
(``fully_shard``; the frozen Llama is sharded with it). The loss is the mean over a rank's rows,
both halves have 4, and each sample's output depends only on its own tokens, condition and the
shared parameters, so the averaged gradient is the whole batch's. Every trainable parameter must
equal a single-process run within ``ATOL``; the frozen base must not move.
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
WORKER = Path(__file__).resolve().with_name("distributed_lora_worker.py")
ATOL, RTOL = 1e-5, 0.0

pytestmark = pytest.mark.slow


def load_worker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_distributed_lora_worker", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("distributed_lora")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    result = subprocess.run(
        [*command, str(WORKER), str(directory)],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return directory


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    worker = load_worker()
    model = worker.build()
    frozen = {k: v.clone() for k, v in model.target.state_dict().items()}
    ids, condition = worker.global_batch()
    worker.train(model, ids, condition)
    assert all(torch.equal(v, frozen[k]) for k, v in model.target.state_dict().items())
    return worker.trainable_parameters(model)


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_lora_hypernetwork_matches_single_process(wrapper: str, runs: Path, reference) -> None:  # noqa: ANN001
    error = runs / f"{wrapper}.error"
    if error.exists():
        pytest.skip(f"{wrapper} could not run here: {error.read_text().strip().splitlines()[-1]}")
    trained = torch.load(runs / f"{wrapper}.pt")
    assert trained.keys() == reference.keys()
    initial = load_worker().trainable_parameters(load_worker().build())
    for name, expected in reference.items():
        if "heads_b" in name:  # they start at 0 and get the first gradients
            assert (expected - initial[name]).abs().max() > 2 * ATOL, name
        torch.testing.assert_close(trained[name], expected, atol=ATOL, rtol=RTOL, msg=name)
    assert any(
        (reference[n] - initial[n]).abs().max() > 2 * ATOL for n in reference if "heads_a" in n
    )
