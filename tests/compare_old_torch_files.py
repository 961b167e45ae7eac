"""Compare committed Torch files against copies of older ones: same state dict, same inputs ->
outputs and gradients equal to float rounding. Usage:

    python tests/compare_old_torch_files.py OLD_ROOT   # OLD_ROOT holds the old files, same paths

e.g. OLD_ROOT made with `git show main:generated_examples/seed_mlp_torch_dynamic.py > ...`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def compare(old_path: Path, new_path: Path) -> float:
    old, new = load(old_path, "old_" + new_path.stem), load(new_path, "new_" + new_path.stem)
    cls = next(k for k in vars(new) if k.endswith("HyperNetwork"))
    torch.manual_seed(0)
    a = getattr(new, cls)()
    b = getattr(old, cls)()
    b.load_state_dict(a.state_dict())
    if any(isinstance(m, torch.nn.Dropout) for m in a.modules()):
        a.eval(), b.eval()  # dropout draws differ between two modules
    source = new_path.read_text()
    # the __main__ block's inputs line, evaluated in the module's namespace
    line = next(s.strip() for s in source.splitlines() if s.strip().startswith("inputs = ("))
    torch.manual_seed(1)
    scope = dict(vars(new))
    exec(line, scope)
    inputs = tuple(x.repeat(3, *(1,) * (x.dim() - 1)) for x in scope["inputs"])
    if any(x.is_floating_point() for x in inputs):
        inputs = tuple(torch.randn_like(x) if x.is_floating_point() else x for x in inputs)
    worst = 0.0
    for kwargs in ({}, {"return_params": True}) if "CONDITION_SHAPE" in vars(new) else ({},):
        outs = []
        for h in (a, b):
            h.zero_grad()
            out, _ = h(*inputs, **kwargs)
            out.float().square().sum().backward()
            outs.append((out.detach(), {k: p.grad.clone() for k, p in h.named_parameters()}))
        (oa, ga), (ob, gb) = outs
        torch.testing.assert_close(oa, ob, rtol=1e-5, atol=1e-6)
        for k in ga:
            torch.testing.assert_close(ga[k], gb[k], rtol=1e-4, atol=1e-6)
        worst = max(worst, (oa - ob).abs().max().item())
    return worst


def main() -> None:
    old_root = Path(sys.argv[1])
    for old in sorted(old_root.rglob("*_torch_*.py")):
        new = ROOT / old.relative_to(old_root)
        print(f"{new.relative_to(ROOT)}: ", end="", flush=True)
        print(f"max |output difference| {compare(old, new):.3g}")


if __name__ == "__main__":
    main()
