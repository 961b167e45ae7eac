"""Numerical tolerances for comparing generated, runtime and plain-target computations (fp32).

Every equivalence test takes its tolerances from here, so a change of tolerance is one reviewed
edit. ``STATIC`` covers computations that run the same kernels in the same order (a static
hypernetwork and its runtime twin, a target with its own weights); ``DYNAMIC`` covers per-sample
paths (``vmap``, the fused per-sample layers), which reassociate sums; ``GRAD`` covers gradients
of the hypernetwork's own parameters, which sum over every generated value and every sample.

``atol`` is scaled by the largest magnitude in the expected tensor (at least 1): fp32 rounding
of a sum is relative to the size of its terms, not of each result, so a logit near zero in a
row of logits near 100 (the tiny transformer's) carries an absolute error of about 100 * eps.
"""

from __future__ import annotations

from typing import Any

import torch

#: a static hypernetwork vs its runtime twin or the plain target
STATIC: dict[str, float] = {"rtol": 1e-5, "atol": 1e-6}
#: a dynamic (vmap'd or fused per-sample) hypernetwork vs its twin or a per-sample loop
DYNAMIC: dict[str, float] = {"rtol": 1e-5, "atol": 1e-5}
#: gradients of the hypernetwork's own parameters (sums over all generated values and samples)
GRAD: dict[str, float] = {"rtol": 1e-4, "atol": 1e-5}


def for_mode(mode: str) -> dict[str, float]:
    """The output tolerance for a ``static`` or ``dynamic`` hypernetwork."""
    return STATIC if mode == "static" else DYNAMIC


def assert_close(actual: Any, expected: Any, tol: dict[str, float], msg: str = "") -> None:
    """``torch.testing.assert_close`` with one of the tolerances above, ``atol`` scaled."""
    scale = 1.0
    if isinstance(expected, torch.Tensor) and expected.numel() and expected.is_floating_point():
        scale = max(1.0, expected.detach().abs().max().item())
    torch.testing.assert_close(
        actual,
        expected,
        rtol=tol["rtol"],
        atol=tol["atol"] * scale,
        msg=(lambda m: f"{msg}: {m}") if msg else None,
    )
