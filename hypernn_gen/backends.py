"""The backend table: per target framework (torch, linen, nnx) what traces, fuses, renders and runs it.

:data:`FRAMEWORKS` maps a :attr:`LoadedTarget.framework <hypernn_gen.load.LoadedTarget>` to its
:class:`Backend`; ``--backend`` names a family (``torch`` or ``flax``) and :func:`backend_for`
checks it against the target's framework. Everything framework-specific is stored as a dotted
``"module:attribute"`` name and imported on use, so a PyTorch-only user never imports JAX (and
this module imports no framework, no tracer and not :mod:`hypernn_gen.load`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from .errors import GenerationError, TraceError

__all__ = ["FAMILIES", "FRAMEWORKS", "Backend", "backend_for", "framework_backend"]


@dataclass(frozen=True)
class Backend:
    """One target framework."""

    framework: str  #: ``torch``, ``linen`` or ``nnx`` (what load.py detects)
    family: str  #: the ``--backend`` value: ``torch`` or ``flax``
    tracer: str  #: ``module:function(loaded, include) -> Layout``
    fusion_planner: str  #: ``module:function(loaded, layout, chunking, *, linear_generator)``
    template: str  #: the entry template, relative to the template directory
    kernel_module: str  #: the fused-kernel module (dotted name; imported by the runtime only)
    runtime_class: str  #: ``module:Class`` of the runtime library's hypernetwork

    def load(self, attribute: str) -> Any:
        """Import the ``module:name`` stored in field ``attribute`` (``tracer``, ...)."""
        module, _, name = getattr(self, attribute).partition(":")
        return getattr(importlib.import_module(module), name)


FRAMEWORKS: dict[str, Backend] = {
    "torch": Backend(
        framework="torch",
        family="torch",
        tracer="hypernn_gen.trace:_trace_torch",
        fusion_planner="hypernn_gen.generate:_plan_torch",
        template="torch/hypernetwork.py.jinja",
        kernel_module="hypernn_gen.kernel.torch",
        runtime_class="hypernn_gen.runtime.torch:TorchHyperNetwork",
    ),
    "linen": Backend(
        framework="linen",
        family="flax",
        tracer="hypernn_gen.trace:_trace_linen",
        fusion_planner="hypernn_gen.generate:_plan_linen",
        template="linen/hypernetwork.py.jinja",
        kernel_module="hypernn_gen.kernel.linen",
        runtime_class="hypernn_gen.runtime.flax:FlaxHyperNetwork",
    ),
    "nnx": Backend(
        framework="nnx",
        family="flax",
        tracer="hypernn_gen.trace:_trace_nnx",
        fusion_planner="hypernn_gen.generate:_plan_nnx",
        template="nnx/hypernetwork.py.jinja",
        kernel_module="hypernn_gen.kernel.nnx",
        runtime_class="hypernn_gen.runtime.flax:NNXHyperNetwork",
    ),
}
#: the ``--backend`` choices, in order
FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(b.family for b in FRAMEWORKS.values()))


def framework_backend(framework: str, display: str = "the target") -> Backend:
    """The table row of a detected framework; an unknown one is a :class:`TraceError`."""
    try:
        return FRAMEWORKS[framework]
    except KeyError:
        raise TraceError(
            f"unknown framework {framework!r} for {display}; "
            "targets must be torch, flax linen or flax nnx modules"
        ) from None


def backend_for(framework: str, requested: str | None, display: str) -> Backend:
    """The row for ``framework``, checking ``--backend requested`` (``None``: any) against it."""
    backend = framework_backend(framework, display)
    if requested is not None and requested not in FAMILIES:
        raise GenerationError(f"unknown --backend {requested!r}; choose {' or '.join(FAMILIES)}")
    if requested is not None and requested != backend.family:
        raise GenerationError(
            f"{display} is a {framework} target but --backend {requested} was given; use "
            f"--backend {backend.family}"
        )
    return backend
