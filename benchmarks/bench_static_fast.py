"""Static fast path vs the materialising path and an older file (issue 18), one thread.

    python benchmarks/bench_static_fast.py NEW.py OLD.py 64,8

Both files are generated static Torch hypernetworks of the same target (``make_target``); OLD
loads NEW's state. Forward+backward (``output.square().mean()``), interleaved, CPU time per step
(``time.thread_time``) medians of 300 rounds, ratios to the target alone.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time

import torch


def load(path: str, name: str):  # noqa: ANN201
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    torch.set_num_threads(1)
    new, old = load(sys.argv[1], "new"), load(sys.argv[2], "old")
    shape = tuple(int(v) for v in sys.argv[3].split(","))
    torch.manual_seed(0)
    [new_cls] = [v for k, v in vars(new).items() if k.endswith("HyperNetwork")]
    [old_cls] = [v for k, v in vars(old).items() if k.endswith("HyperNetwork")]
    target, fast, previous = new.make_target(), new_cls(), old_cls()
    previous.load_state_dict(fast.state_dict())
    x = torch.randn(*shape)
    candidates = {
        "target": (target, lambda: target(x)),
        "old file": (previous, lambda: previous(x)[0]),
        "new, default call": (fast, lambda: fast(x)[0]),
        "new, return_params=True": (fast, lambda: fast(x, return_params=True)[0]),
    }
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(300):
        for name, (module, call) in candidates.items():
            start = time.thread_time()
            call().square().mean().backward()
            times[name].append(time.thread_time() - start)
            module.zero_grad(set_to_none=True)
    base = statistics.median(times["target"])
    for name, values in times.items():
        ms = statistics.median(values)
        print(f"{name:24s} {ms * 1e3:.3f} ms  {ms / base:.2f}x")


if __name__ == "__main__":
    main()
