"""Worker for tests/test_distributed_lora.py: a LoRA hypernetwork on a tiny Llama under torchrun.

    torchrun --standalone --nproc_per_node 2 tests/distributed_lora_worker.py OUT_DIR

For each wrapper (``ddp``: DistributedDataParallel; ``fsdp2``: ``fully_shard``), each rank builds
the dynamic LoRA hypernetwork (``TorchHyperNetwork(llama, generate="lora", mode="dynamic")``)
from the same seed, wraps it and takes ``STEPS`` SGD steps on its rows of one fixed global batch
(token ids, one-hot conditions, next-token labels; the loss is the mean over its rows). Rank 0
writes the final trainable parameters to ``OUT_DIR/<wrapper>.pt``, or ``<wrapper>.error``.
The test builds the single-process reference with :func:`build`, :func:`global_batch` and
:func:`train` from here.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

STEPS = 5
LR = 0.5
GLOBAL_BATCH = 8
SEED = 0
WRAPPERS = ("ddp", "fsdp2")
VOCAB, TASKS, LENGTH = 64, 3, 10


def build() -> nn.Module:
    import transformers

    from hypernn_gen.runtime.torch import TorchHyperNetwork

    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(SEED)
    llama = transformers.LlamaForCausalLM(config)
    return TorchHyperNetwork(
        llama, generate="lora", mode="dynamic", condition_shape=(TASKS,), lora_rank=4
    )


def global_batch() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, LENGTH), generator=generator)
    condition = F.one_hot(torch.arange(GLOBAL_BATCH) % TASKS, TASKS).float()
    return ids, condition


def train(model: nn.Module, ids: Tensor, condition: Tensor, steps: int = STEPS) -> None:
    """SGD on the next-token loss of a task-dependent shift of the ids (the task is the label)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=LR)
    labels = (ids + 1 + condition.argmax(1, keepdim=True)) % VOCAB
    for _ in range(steps):
        optimizer.zero_grad()
        output, _ = model(input_ids=ids, condition=condition)
        F.cross_entropy(output.logits.reshape(-1, VOCAB), labels.reshape(-1)).backward()
        optimizer.step()


def trainable_parameters(model: nn.Module) -> dict[str, Tensor]:
    result = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            value = p.full_tensor() if hasattr(p, "full_tensor") else p
            result[name.removeprefix("module.")] = value.detach().clone()
    return result


def run(wrapper: str, rank: int, world: int) -> dict[str, Tensor]:
    import torch.distributed as dist

    model = build()
    if wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped: nn.Module = DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        wrapped = fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    ids, condition = global_batch()
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    train(wrapped, ids[rows], condition[rows])
    dist.barrier()
    return trainable_parameters(model)


def main(out_dir: str) -> int:
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    for wrapper in WRAPPERS:
        try:
            params = run(wrapper, rank, world)
        except Exception:  # noqa: BLE001 - reported to the test, which decides
            if rank == 0:
                Path(out_dir, f"{wrapper}.error").write_text(traceback.format_exc())
            continue
        if rank == 0:
            torch.save(params, Path(out_dir, f"{wrapper}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(*sys.argv[1:]))
