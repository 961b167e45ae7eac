"""Per-task LoRA from a task id: a generated dynamic LoRA hypernetwork on a frozen tiny LM.

1. Pretrain the tiny LM (target.py) on the base task: predict each token's image under the
   permutation ``perm[0]`` (the input tokens are random, so only the mapping is learnt).
2. Adapt it to 4 new tasks, each another permutation, from the same inputs: the input does not
   say which task it is, so one adapter cannot serve them all. Three ways, same step budget:
   * the generated **dynamic LoRA hypernetwork** (``lm_lora_dynamic.py``, rank 4), conditioned
     on the one-hot task id: one adapter set per sample, one generator for every layer;
   * **one shared LoRA** (``peft``, rank 4, the same layers) trained on all tasks;
   * **full fine-tuning**, one copy of the whole model per task (4 models).
3. Export task 2's adapters as a PEFT LoRA, load them with ``peft`` and check the loss.

    python examples/lora_tasks/train.py            # a few CPU minutes, writes task_losses.png
    python examples/lora_tasks/train.py --quick    # a few steps, no checks (what the tests run)
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
TASKS = 4


def load(name: str):  # noqa: ANN201 - a module from this folder
    spec = importlib.util.spec_from_file_location(f"lora_tasks_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


target = load("target")
generated = load("lm_lora_dynamic")
VOCAB, CONTEXT = target.VOCAB, target.CONTEXT
PERMS = torch.stack(
    [torch.randperm(VOCAB, generator=torch.Generator().manual_seed(t)) for t in range(TASKS + 1)]
)


def batch(size: int, gen: torch.Generator, task: int | None = None):  # noqa: ANN201
    """Random tokens, their task ids (1..TASKS, or ``task``) and targets: each token mapped by its
    task's permutation."""
    tokens = torch.randint(0, VOCAB, (size, CONTEXT), generator=gen)
    if task is None:
        tasks = torch.randint(1, TASKS + 1, (size,), generator=gen)
    else:
        tasks = torch.full((size,), task)
    return tokens, tasks, PERMS[tasks[:, None], tokens]


def one_hot(tasks: torch.Tensor) -> torch.Tensor:
    return F.one_hot(tasks - 1, TASKS).float()


def loss_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))


def train(params, step, steps: int, lr: float) -> list[float]:  # noqa: ANN001
    optimizer = torch.optim.Adam(params, lr=lr)
    losses = []
    for i in range(steps):
        loss = step(i)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def task_losses(predict, tasks: range = range(1, TASKS + 1)) -> list[float]:  # noqa: ANN001
    """Eval loss of ``predict(tokens, tasks) -> logits`` on 256 fresh sequences per task."""
    gen = torch.Generator().manual_seed(123)
    out = []
    for task in tasks:
        tokens, tasks, labels = batch(256, gen, task)
        out.append(loss_of(predict(tokens, tasks), labels).item())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps, no checks")
    parser.add_argument("--out-dir", type=Path, default=HERE, help="where task_losses.png goes")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    pre_steps, steps = (5, 5) if args.quick else (600, 800)
    gen = torch.Generator().manual_seed(1)

    # 1. the pretrained model: task 0's mapping
    base = target.make_target()

    def pretrain(i: int) -> torch.Tensor:
        tokens, _, labels = batch(64, gen, task=0)
        return loss_of(base(tokens), labels)

    train(base.parameters(), pretrain, pre_steps, 3e-3)
    base.eval()
    (pretrained,) = task_losses(lambda t, _: base(t), range(1))
    new = task_losses(lambda t, _: base(t))
    print(
        f"pretrained base: loss {pretrained:.4f} on its task, {sum(new) / TASKS:.4f} on the new ones"
    )

    # 2a. the generated dynamic LoRA hypernetwork, conditioned on the task id
    hyper = generated.TargetHyperNetwork(base)
    trainable = [p for p in hyper.parameters() if p.requires_grad]
    print(f"hypernetwork trainable parameters: {sum(p.numel() for p in trainable):,}")
    print(f"frozen base parameters: {sum(p.numel() for p in hyper.target.parameters()):,}")

    def hyper_step(i: int) -> torch.Tensor:
        tokens, tasks, labels = batch(64, gen)
        return loss_of(hyper(tokens, condition=one_hot(tasks))[0], labels)

    curves = {"hypernetwork (per-task LoRA)": train(trainable, hyper_step, steps, 3e-3)}
    hyper.eval()
    final = {
        "hypernetwork (per-task LoRA)": task_losses(lambda t, k: hyper(t, condition=one_hot(k))[0])
    }

    # 2b. one shared LoRA (peft) on the same layers
    import peft

    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=[a.path for a in generated.ADAPTERS])
    shared = peft.get_peft_model(copy.deepcopy(base), config)

    def shared_step(i: int) -> torch.Tensor:
        tokens, _, labels = batch(64, gen)
        return loss_of(shared(tokens), labels)

    shared_params = [p for p in shared.parameters() if p.requires_grad]
    print(f"shared LoRA trainable parameters: {sum(p.numel() for p in shared_params):,}")
    curves["one shared LoRA"] = train(shared_params, shared_step, steps, 3e-3)
    shared.eval()
    final["one shared LoRA"] = task_losses(lambda t, _: shared(t))

    # 2c. full fine-tuning: one copy of the model per task, the same steps in all
    copies = [copy.deepcopy(base).train() for _ in range(TASKS)]
    per_task = max(1, steps // TASKS)
    full_curve: list[float] = []
    for task, model in enumerate(copies, start=1):

        def full_step(i: int, model=model, task=task) -> torch.Tensor:  # noqa: ANN001
            tokens, _, labels = batch(64, gen, task)
            return loss_of(model(tokens), labels)

        full_curve += train(model.parameters(), full_step, per_task, 3e-3)
        model.eval()
    curves["full fine-tuning (a model per task)"] = full_curve
    final["full fine-tuning (a model per task)"] = task_losses(
        lambda t, k: torch.stack([copies[int(j) - 1](t[i : i + 1])[0] for i, j in enumerate(k)])
    )

    for name, losses in final.items():
        print(f"eval loss per task ({name}): " + ", ".join(f"{x:.4f}" for x in losses))

    # 3. task 2's adapters as a PEFT LoRA, loaded by peft onto a fresh copy of the base
    with tempfile.TemporaryDirectory() as tmp:
        hyper.save_peft(tmp, condition=one_hot(torch.tensor([2])))
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp).eval()
        exported = task_losses(lambda t, _: loaded(t))[1]
    print(
        f"task 2 via the PEFT export: {exported:.4f} (hypernetwork: {final['hypernetwork (per-task LoRA)'][1]:.4f})"
    )

    plot(curves, final, args.out_dir / "task_losses.png")
    print("wrote task_losses.png")
    if args.quick:
        return 0
    ok = abs(exported - final["hypernetwork (per-task LoRA)"][1]) < 1e-4
    hyper_mean = sum(final["hypernetwork (per-task LoRA)"]) / TASKS
    shared_mean = sum(final["one shared LoRA"]) / TASKS
    ok = ok and hyper_mean < 0.5 * shared_mean
    print(
        f"check: mean task loss {hyper_mean:.4f} (hypernetwork) vs {shared_mean:.4f} (shared LoRA): {'ok' if ok else 'FAILED'}"
    )
    return 0 if ok else 1


def plot(curves: dict, final: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, losses in curves.items():
        window = max(1, len(losses) // 40)
        smooth = [
            sum(losses[max(0, i - window) : i + 1]) / len(losses[max(0, i - window) : i + 1])
            for i in range(len(losses))
        ]
        left.plot(smooth, label=name)
    left.set_xlabel("training step (full fine-tuning: the 4 models one after another)")
    left.set_ylabel("training loss (cross-entropy)")
    left.set_yscale("log")
    left.legend()
    width = 0.8 / len(final)
    for j, (name, losses) in enumerate(final.items()):
        right.bar([t + j * width for t in range(TASKS)], losses, width, label=name)
    right.set_xticks(
        [t + 0.4 - width / 2 for t in range(TASKS)], [f"task {t + 1}" for t in range(TASKS)]
    )
    right.set_ylabel("eval loss")
    right.set_yscale("log")
    right.set_title("per-task eval loss after adaptation")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
