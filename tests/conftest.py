"""Shared test setup: JAX on the CPU, and a fixed torch seed for every test."""

from __future__ import annotations

import os

import pytest

# Set before any test module imports jax; CI and developer machines have no accelerator.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(autouse=True)
def _torch_seed() -> None:
    """Every test starts from ``torch.manual_seed(0)``, whatever ran before it (xdist too)."""
    try:
        import torch
    except ImportError:  # a Flax-only install
        return
    torch.manual_seed(0)
