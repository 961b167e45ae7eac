"""Worker for tests/test_distributed_torch.py: trains generated hypernetworks under torchrun.

    torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py OUT_DIR GENERATED.py...

For every generated file and every wrapper (``ddp``: DistributedDataParallel; ``fsdp2``:
``torch.distributed.fsdp.fully_shard``), each rank builds the hypernetwork from the same seed,
wraps it, and takes ``STEPS`` SGD steps on its share of one fixed global batch (rank ``r`` of
``W`` gets rows ``r * B / W`` to ``(r + 1) * B / W``; the loss is the mean over its rows). Rank 0
writes the final full parameters to ``OUT_DIR/<stem>-<wrapper>.pt``, or, when the wrapper cannot
run here, ``OUT_DIR/<stem>-<wrapper>.error`` with the exception. The test builds the
single-process reference with :func:`build`, :func:`global_batch` and :func:`train` from here.

Only torch is needed: the generated files do not import hypernn-gen.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import sys
import traceback
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn
from torch.nn import functional as F

STEPS = 5
LR = 1e-3  # SGD on a hypernetwork diverges within 5 steps at 0.1 and at 0.01 here
GLOBAL_BATCH = 8
SEED = 0
WRAPPERS = ("ddp", "fsdp2")


def load(path: str | Path) -> ModuleType:
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"_distributed_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def build(path: str | Path) -> nn.Module:
    """The generated file's ``*HyperNetwork()``, built after ``torch.manual_seed(SEED)``."""
    module = load(path)
    (cls,) = (v for k, v in vars(module).items() if k.endswith("HyperNetwork"))
    torch.manual_seed(SEED)
    return cls()


def global_batch(in_features: int = 8, out_features: int = 4) -> tuple[Tensor, Tensor]:
    """The fixed global batch every run uses: inputs and regression targets."""
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(GLOBAL_BATCH, in_features, generator=generator)
    y = torch.randn(GLOBAL_BATCH, out_features, generator=generator)
    return x, y


def train(model: nn.Module, x: Tensor, y: Tensor, steps: int = STEPS) -> None:
    """``steps`` SGD steps on the mean squared error over ``(x, y)``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(steps):
        optimizer.zero_grad()
        output, _ = model(x)
        F.mse_loss(output, y).backward()
        optimizer.step()


def full_parameters(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter as a plain full tensor (DTensor shards are gathered: a collective)."""
    result = {}
    for name, p in model.named_parameters():
        value = p.full_tensor() if hasattr(p, "full_tensor") else p
        result[name.removeprefix("module.")] = value.detach().clone()
    return result


def run(path: str, wrapper: str, rank: int, world: int) -> dict[str, Tensor]:
    import torch.distributed as dist

    model = build(path)
    if wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped: nn.Module = DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        wrapped = fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    x, y = global_batch()
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    train(wrapped, x[rows], y[rows])
    dist.barrier()
    return full_parameters(model)


def main(out_dir: str, *paths: str) -> int:
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    assert GLOBAL_BATCH % world == 0
    for path in paths:
        for wrapper in WRAPPERS:
            stem = f"{Path(path).stem}-{wrapper}"
            try:
                params = run(path, wrapper, rank, world)
            except Exception:  # noqa: BLE001 - reported to the test, which decides
                if rank == 0:
                    Path(out_dir, f"{stem}.error").write_text(traceback.format_exc())
                continue
            if rank == 0:
                torch.save(params, Path(out_dir, f"{stem}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(*sys.argv[1:]))
