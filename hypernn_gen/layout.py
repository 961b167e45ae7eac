"""The backend-neutral parameter layout: the one model every other part of hypernn-gen reads.

A :class:`Layout` lists every tensor of a target network in a deterministic order. *Generated*
tensors are produced by the hypernetwork and live at ``offset`` in one flat vector; *state*
tensors (buffers, frozen parameters, Flax collections other than ``params``) stay ordinary state
of the hypernetwork. The tracers (``trace_torch``, ``trace_flax``) build layouts; the runtime
library and the generator consume them, so both agree on names, shapes and offsets by
construction.

The hypernetwork's contract with a layout, shared by runtime and generated code:

    raw    = weight_generator(embedding(...)).reshape(..., -1)[..., :flat_size]
    flat   = init_mean + init_std * raw          (per generated tensor, elementwise)
    tensor = flat[..., offset : offset + size].reshape(shape)

``init_mean``/``init_std`` are the target's own default initialisation statistics, so a
generator whose raw output has unit variance reproduces the target's initial scale.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import TraceError

__all__ = ["Chunking", "Layout", "TensorSpec", "checkpoint_digest", "round_stat"]

Role = Literal["generated", "state"]
Key = str | int

LAYOUT_FORMAT_VERSION = 1


#: How a target keeps a tensor out of the generated ones, in its own framework.
_KEEP_OUT = {
    "torch": "mark it frozen (requires_grad=False)",
    "linen": "keep it in a collection other than 'params' (self.variable('consts', ...))",
    "nnx": "make it an nnx.Variable instead of an nnx.Param",
}


def round_stat(x: float, digits: int = 6) -> float:
    """Round an init statistic to ``digits`` significant digits (short, stable constants)."""
    return float(f"{x:.{digits}g}") if x else 0.0


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the target.

    Attributes:
        keys: the path into the target's tree (Torch: the state-dict name split on ``.``; Flax:
            the keys below the collection; NNX list indices stay ``int``).
        shape, dtype: as the target declares them (``dtype`` is a NumPy-style name).
        role: ``"generated"`` or ``"state"``.
        collection: Torch ``"parameter"``/``"buffer"``; Flax the variable collection
            (``"params"``, ``"batch_stats"``, ...).
        offset: start in the flat generated vector, ``-1`` for state.
        fan_in, fan_out: as ``torch.nn.init`` computes them for this shape.
        init_mean, init_std: statistics of the target's default initialisation of this tensor.
        init_source: where those statistics come from (``"normal_"``, ``"measured"``, ``"assumed"``).
        aliases: other paths that share this tensor (tied weights), generated once.
        reason: why a tensor is state (``"buffer"``, ``"frozen"``, ``"collection"``, ``"excluded"``).
    """

    keys: tuple[Key, ...]
    shape: tuple[int, ...]
    dtype: str
    role: Role
    collection: str
    offset: int = -1
    fan_in: int = 1
    fan_out: int = 1
    init_mean: float = 0.0
    init_std: float = 0.0
    init_source: str = "assumed"
    aliases: tuple[tuple[Key, ...], ...] = ()
    reason: str = ""

    @property
    def path(self) -> str:
        """Dotted path, e.g. ``"0.weight"`` or ``"Dense_0.kernel"``."""
        return ".".join(str(k) for k in self.keys)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def generated(self) -> bool:
        return self.role == "generated"

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True)
class Layout:
    """Every tensor of a target, in a deterministic order, with generated offsets.

    Attributes:
        framework: ``"torch"``, ``"linen"`` or ``"nnx"``.
        target_name: the target's class name (used to name generated classes).
        tensors: generated and state tensors, in the target's own order.
        flat_size: length of the flat generated vector (>= the generated parameter count when
            tensors are aligned to chunk boundaries, equal otherwise).
    """

    framework: str
    target_name: str
    tensors: tuple[TensorSpec, ...]
    flat_size: int
    notes: tuple[str, ...] = field(default=(), compare=False)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        framework: str,
        target_name: str,
        tensors: Iterable[TensorSpec],
        notes: Sequence[str] = (),
    ) -> Layout:
        """Assign contiguous offsets to the generated tensors, in order."""
        placed: list[TensorSpec] = []
        offset = 0
        for t in tensors:
            if t.generated:
                placed.append(dataclasses.replace(t, offset=offset))
                offset += t.size
            else:
                placed.append(dataclasses.replace(t, offset=-1))
        layout = cls(framework, target_name, tuple(placed), offset, tuple(notes))
        layout.validate()
        return layout

    def validate(self) -> None:
        keys = [(t.collection, t.path) for t in self.tensors]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            collection, path = dupes[0]
            raise TraceError(
                f"layout lists {path!r} ({collection}) twice; this is a bug in the tracer"
            )
        for t in self.tensors:
            if t.generated and not t.dtype.startswith(("float", "bfloat")):
                raise TraceError(
                    f"parameter {t.path!r} has dtype {t.dtype}; hypernetworks can only generate "
                    f"floating-point parameters: keep it out with --exclude {t.path!r} (it stays "
                    f"a parameter of the target), or {_KEEP_OUT.get(self.framework, _KEEP_OUT['torch'])}"
                )

    # -- views --------------------------------------------------------------------------------

    @property
    def generated(self) -> tuple[TensorSpec, ...]:
        return tuple(t for t in self.tensors if t.generated)

    @property
    def state(self) -> tuple[TensorSpec, ...]:
        return tuple(t for t in self.tensors if not t.generated)

    @property
    def num_generated(self) -> int:
        """Number of generated parameter values (without alignment padding)."""
        return sum(t.size for t in self.generated)

    @property
    def num_state(self) -> int:
        return sum(t.size for t in self.state)

    def find(self, path: str) -> TensorSpec:
        for t in self.tensors:
            if t.path == path:
                return t
        raise KeyError(path)

    # -- serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": LAYOUT_FORMAT_VERSION,
            "framework": self.framework,
            "target": self.target_name,
            "flat_size": self.flat_size,
            "num_generated": self.num_generated,
            "num_state": self.num_state,
            "tensors": [
                {
                    "path": t.path,
                    "keys": list(t.keys),
                    "shape": list(t.shape),
                    "dtype": t.dtype,
                    "size": t.size,
                    "role": t.role,
                    "collection": t.collection,
                    "offset": t.offset,
                    "fan_in": t.fan_in,
                    "fan_out": t.fan_out,
                    "init_mean": t.init_mean,
                    "init_std": t.init_std,
                    "init_source": t.init_source,
                    "aliases": [".".join(map(str, a)) for a in t.aliases],
                    "reason": t.reason,
                }
                for t in self.tensors
            ],
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def digest(self) -> str:
        """A short hash of the structure: paths, shapes, dtypes, roles, offsets.

        Init statistics are left out on purpose: they shape the initial values, not the
        structure, and a target whose custom init changes should not invalidate loaded weights.
        """
        structure = [
            [t.path, list(t.shape), t.dtype, t.role, t.collection, t.offset] for t in self.tensors
        ]
        blob = json.dumps([self.framework, self.flat_size, structure], separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def checkpoint_digest(layout: Layout, chunking: Chunking, mode: str, embedding_dim: int) -> str:
    """What a hypernetwork's saved state carries (``CHECKPOINT_DIGEST`` in generated files, the
    runtime's ``checkpoint_digest``): a short hash of what its values mean, the generated
    tensors' paths, shapes and offsets, the chunking, the mode and the sizes. Two hypernetworks
    whose state dicts have the same shapes but other digests put the same values on other
    tensors. Dtypes, state tensors and init statistics are left out: loading casts, checks
    state shapes itself, and overwrites the initial values."""
    generated = [[t.path, list(t.shape), t.offset] for t in layout.generated]
    sizes = [layout.flat_size, chunking.num_embeddings, chunking.chunk_dim, embedding_dim]
    blob = json.dumps([layout.framework, mode, sizes, generated], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Chunking:
    """How the flat generated vector is split: ``num_embeddings`` chunks of ``chunk_dim`` values.

    ``num_embeddings * chunk_dim >= flat_size``; the tail beyond ``flat_size`` is discarded.
    """

    num_embeddings: int
    chunk_dim: int

    @classmethod
    def resolve(
        cls,
        flat_size: int,
        *,
        num_embeddings: int | None = None,
        chunk_dim: int | None = None,
    ) -> Chunking:
        """Fill in whichever of ``num_embeddings``/``chunk_dim`` is missing.

        With neither, both default to about ``sqrt(flat_size)``, which minimises the
        hypernetwork's own parameter count (``N*D + D*C``) for a given embedding dim.
        """
        if flat_size <= 0:
            raise TraceError("the layout has no generated parameters")
        if num_embeddings is not None and chunk_dim is not None:
            if num_embeddings * chunk_dim < flat_size:
                raise TraceError(
                    f"num_embeddings * chunk_dim = {num_embeddings * chunk_dim} is smaller than the "
                    f"{flat_size} generated values; give only one of them and the other is derived"
                )
            return cls(num_embeddings, chunk_dim)
        for name, value in (("num_embeddings", num_embeddings), ("chunk_dim", chunk_dim)):
            if value is not None and value <= 0:
                raise TraceError(f"{name} must be a positive integer, got {value}")
        if num_embeddings is not None:
            return cls(num_embeddings, math.ceil(flat_size / num_embeddings))
        if chunk_dim is not None:
            return cls(math.ceil(flat_size / chunk_dim), chunk_dim)
        n = math.ceil(math.sqrt(flat_size))
        return cls(n, math.ceil(flat_size / n))

    @property
    def total(self) -> int:
        return self.num_embeddings * self.chunk_dim
