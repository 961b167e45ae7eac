"""Smoke test of ``benchmarks/bench_hypernets.py --quick``: it runs and writes its tables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_hypernets.py"


@pytest.mark.slow
def test_quick_benchmark_writes_tables(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("psutil")
    out = tmp_path / "R.md"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,  # ~25 s on an idle 2-core machine, ~40 s under a load average of 8
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    assert "| seed MLP 8-256-256-4 | 69,120 |" in report  # a table row with figures
    assert "## 1. Dynamic mode, forward+backward" in report
    assert "MISMATCH" not in proc.stderr
    assert report in proc.stdout  # the tables are printed too
