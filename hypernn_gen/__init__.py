"""hypernn-gen: generate standalone, readable hypernetwork modules for PyTorch and Flax targets.

The package reads as its pipeline:

    load (load.py) -> trace (trace.py, trace_torch.py, trace_flax.py) -> layout (layout.py)
    -> render (render.py, templates/) -> format/verify (verify.py) -> write (write.py)

``hypernn_gen.runtime`` builds the same hypernetworks at run time from a live module.
"""

from ._version import __version__
from .errors import (
    GenerationError,
    HyperNetworkError,
    HypernnGenError,
    OutputError,
    TargetError,
    TargetLoadError,
    TraceError,
)
from .layout import Chunking, Layout, TensorSpec

__all__ = [
    "Chunking",
    "GenerationError",
    "HyperNetworkError",
    "HypernnGenError",
    "Layout",
    "OutputError",
    "TargetError",
    "TargetLoadError",
    "TensorSpec",
    "TraceError",
    "__version__",
]
