"""The runtime Linen hypernetwork trains with its batch sharded over a jax Mesh like unsharded.

``tests/sharding_jax_worker.py`` runs in a subprocess (``XLA_FLAGS`` must name the 4 host
devices before jax is imported): for ``FlaxHyperNetwork`` in static and dynamic mode, 5 SGD
steps of one jitted train step with the batch sharded over 4 CPU devices
(``NamedSharding(mesh, P("data"))``, parameters replicated) end at the same parameters as the
same step on unsharded arrays, within ``ATOL`` = 1e-6 absolute (measured: 3e-8; every parameter
moves by far more). The compiled sharded step must contain all-reduces: XLA really split the
batch and summed the gradients across devices.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flax")
pytest.importorskip("optax")

WORKER = Path(__file__).resolve().with_name("sharding_jax_worker.py")
REPO = WORKER.parents[1]
ATOL = 1e-6

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    result = subprocess.run(
        [sys.executable, str(WORKER)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {row["mode"]: row for row in rows}


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_batch_sharded_train_step_matches_unsharded(mode: str, results: dict[str, dict]) -> None:
    row = results[mode]
    assert row["devices"] == 4 and row["batch_devices"] == 4, row
    assert row["params_replicated"], row
    assert row["all_reduces"] > 0, row
    assert row["min_moved"] > 100 * ATOL, row
    assert row["max_diff"] <= ATOL, row
