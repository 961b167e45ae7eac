"""The examples in examples/ run: each one's --quick mode, in a subprocess, as a user would.

The full runs (real training, the committed figures) are one command each, in each example's
README; these only check that the scripts work end to end and print their metric lines.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.slow


def needs(*modules: str) -> list[pytest.MarkDecorator]:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return [pytest.mark.skip(reason=f"needs {', '.join(missing)}")] if missing else []


# (script, extra arguments, needed modules, lines it must print, figure it writes)
CASES = {
    "digits-torch": (
        "digits/train_torch.py",
        ["--quick"],
        ("torch", "sklearn", "matplotlib"),
        [
            r"^hypernetwork trainable parameters: 6,484$",
            r"^compression ratio: (\d+\.\d+)x",
            r"^test accuracy \(hypernetwork, 6,484 parameters\): \d+\.\d+%$",
            r"^test accuracy \(plain target, 38,282 parameters\): \d+\.\d+%$",
        ],
        "curves_torch.png",
    ),
    "digits-flax": (
        "digits/train_flax.py",
        ["--quick"],
        ("jax", "flax", "optax", "sklearn", "matplotlib"),
        [
            r"^hypernetwork: DigitsCNNHyperNetwork from digits_nnx_static\.py \(generated",
            r"^hypernetwork trainable parameters: 6,484$",
            r"^compression ratio: (\d+\.\d+)x",
            r"^hypernetwork train loss: (\d+\.\d+) \(first 5 steps\) -> (\d+\.\d+)",
            r"^test accuracy \(hypernetwork, 6,484 parameters\): \d+\.\d+%$",
            r"^test accuracy \(plain target, 38,282 parameters\): \d+\.\d+%$",
        ],
        "curves_flax.png",
    ),
    "digits-flax-linen": (
        "digits/train_flax.py",
        ["--quick", "--api", "linen"],
        ("jax", "flax", "optax", "sklearn", "matplotlib"),
        [
            r"^hypernetwork: DigitsCNNHyperNetwork from digits_linen_static\.py \(generated",
            r"^hypernetwork trainable parameters: 6,484$",
            r"^compression ratio: (\d+\.\d+)x",
            r"^hypernetwork train loss: (\d+\.\d+) \(first 5 steps\) -> (\d+\.\d+)",
            r"^test accuracy \(hypernetwork, 6,484 parameters\): \d+\.\d+%$",
            r"^test accuracy \(plain target, 38,282 parameters\): \d+\.\d+%$",
        ],
        "curves_flax_linen.png",
    ),
    "lora-tasks": (
        "lora_tasks/train.py",
        ["--quick"],
        ("torch", "matplotlib", "peft"),
        [
            r"^hypernetwork trainable parameters: 21,640$",
            r"^frozen base parameters: 26,896$",
            r"^eval loss per task \(hypernetwork \(per-task LoRA\)\): [\d., ]+$",
            r"^eval loss per task \(one shared LoRA\): [\d., ]+$",
            r"^eval loss per task \(full fine-tuning \(a model per task\)\): [\d., ]+$",
            r"^task 2 via the PEFT export: (\d+\.\d+) \(hypernetwork: \1\)$",
        ],
        "task_losses.png",
    ),
    "sinusoid": (
        "sinusoid/train_torch.py",
        ["--quick"],
        ("torch", "matplotlib"),
        [
            r"^test MSE \(dynamic hypernetwork\): \d+\.\d+$",
            r"^test MSE \(static MLP\): \d+\.\d+$",
            r"^test MSE \(MLP on \[x, condition\]\): \d+\.\d+$",
        ],
        "predictions_torch.png",
    ),
    "hyper-nn-readme-runtime": (
        "hyper_nn_seed/readme_runtime.py",
        [],
        ("torch",),
        [r"^generated_params: \(69120,\)", r"^readme example: ok$"],
        None,
    ),
    "hyper-nn-readme-generated": (
        "hyper_nn_seed/readme_generated.py",
        [],
        ("torch",),
        [r"^generated_params: \(69120,\)", r"^generated example: ok$"],
        None,
    ),
    "hyper-nn-cartpole": (
        "hyper_nn_seed/reinforce_cartpole.py",
        ["--quick"],
        ("torch", "gymnasium", "matplotlib"),
        [
            r"^hypernetwork trainable parameters: 16,910$",
            r"^evaluation return \(greedy policy, 2 episodes\): \d+\.\d$",
        ],
        "cartpole_returns.png",
    ),
}


@pytest.mark.parametrize(
    "name",
    [pytest.param(name, marks=needs(*case[2])) for name, case in CASES.items()],
)
def test_example_quick_mode(name: str, tmp_path: Path) -> None:
    script, extra, _, patterns, figure = CASES[name]
    args = [sys.executable, str(EXAMPLES / script), *extra]
    if figure is not None:
        args += ["--out-dir", str(tmp_path)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MPLBACKEND": "Agg"}
    done = subprocess.run(
        args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{script} failed:\n{output[-4000:]}"
    for pattern in patterns:
        match = re.search(pattern, done.stdout, flags=re.M)
        assert match, f"{script} did not print a line matching {pattern!r}:\n{done.stdout}"
        if pattern.startswith("^compression ratio"):
            assert float(match.group(1)) > 1
        if pattern.startswith("^hypernetwork train loss"):  # the quick run trains something
            first, last = map(float, match.groups())
            assert last < first, f"{script}: train loss did not decrease ({first} -> {last})"
    if figure is not None:
        assert (tmp_path / figure).stat().st_size > 10_000, f"{script} wrote no {figure}"
