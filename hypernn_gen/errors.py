"""Exceptions raised by hypernn-gen.

Every error says what went wrong *and* how to fix it, in one line.

    HypernnGenError                  base class; never raised directly
    ├── TargetError                  the target network cannot be used as given
    │   ├── TargetLoadError          the target file or NAME cannot be loaded
    │   └── TraceError               the target cannot be traced (shapes, inputs, parameters)
    ├── HyperNetworkError            a runtime hypernetwork got bad modules, inputs or weights
    ├── GenerationError              templates, formatting or configuration failed
    └── OutputError                  writing the generated file was refused

The CLI turns any of these into a one-line message and exit code 2.
"""

from __future__ import annotations

__all__ = [
    "GenerationError",
    "HyperNetworkError",
    "HypernnGenError",
    "OutputError",
    "TargetError",
    "TargetLoadError",
    "TraceError",
]


class HypernnGenError(Exception):
    """Base class of every error hypernn-gen raises on purpose."""


class TargetError(HypernnGenError, ValueError):
    """The target network cannot be used as given."""


class TargetLoadError(TargetError):
    """The target file, or the NAME inside it, cannot be loaded."""


class TraceError(TargetError):
    """The target's parameter tree cannot be traced."""


class HyperNetworkError(HypernnGenError, ValueError):
    """A hypernetwork got a bad embedding, weight generator, input or weight vector."""


class GenerationError(HypernnGenError):
    """Rendering, checking or formatting the generated source failed."""


class OutputError(HypernnGenError):
    """Writing the generated file was refused (a hand-edited file, say)."""
