"""Generated files are byte-identical across fresh processes for every Torch target form."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parents[2]

TARGET = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 16)
            self.b = nn.Linear(16, 4)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))


    instance = Net()  # values drawn at import time


    def factory():
        return Net()

    example_input = torch.zeros(2, 8)
    """
)


def _generate(tmp: Path, name: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "hypernn_gen",
            "generate",
            f"{tmp / 'target.py'}:{name}",
            "-o",
            out.name,
            *extra,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp,
        timeout=300,
    )


@pytest.mark.parametrize("name", ["instance", "Net", "factory"])
def test_two_processes_give_the_same_file_and_check_passes(tmp_path: Path, name: str) -> None:
    (tmp_path / "target.py").write_text(TARGET)
    out = tmp_path / "hyper.py"
    texts = []
    for _ in range(2):  # two fresh processes, same command line
        run = _generate(tmp_path, name, out)
        assert run.returncode == 0, run.stderr
        texts.append(out.read_bytes())
    assert texts[0] == texts[1]
    check = _generate(tmp_path, name, out, "--check")
    assert check.returncode == 0, check.stderr
