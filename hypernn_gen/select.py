"""Choose which parameters the hypernetwork generates: ``--include`` / ``--exclude`` globs.

Patterns are :mod:`fnmatch` globs on dotted parameter paths (``"blocks.*.attn.*"``), matched
case-sensitively so the result is the same on every platform. A trainable parameter is
generated when it matches some ``--include`` pattern (or none were given) and no ``--exclude``
pattern; the rest stay ordinary state of the hypernetwork (``reason="excluded"``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase

from .errors import TraceError
from .layout import Layout

__all__ = ["check_patterns", "path_filter", "selectable_paths"]


def path_filter(
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> Callable[[str], bool] | None:
    """A predicate on parameter paths, or ``None`` when there are no patterns at all.

    ``None`` means "generate every trainable parameter", which is what the tracers do by default.
    """
    include, exclude = tuple(include), tuple(exclude)
    if not include and not exclude:
        return None

    def selected(path: str) -> bool:
        if include and not any(fnmatchcase(path, p) for p in include):
            return False
        return not any(fnmatchcase(path, p) for p in exclude)

    return selected


def selectable_paths(layout: Layout) -> list[str]:
    """Paths of the parameters a predicate decides on: generated ones and excluded ones."""
    return [t.path for t in layout.tensors if t.generated or t.reason == "excluded"]


def check_patterns(
    layout: Layout,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    shown: int = 5,
) -> None:
    """Raise if a pattern matches none of ``layout``'s trainable parameters (a likely typo).

    Raises:
        TraceError: naming the first such pattern and listing a few parameter paths.
    """
    paths = selectable_paths(layout)
    for option, patterns in (("--include", include), ("--exclude", exclude)):
        for pattern in patterns:
            if not any(fnmatchcase(path, pattern) for path in paths):
                listed = ", ".join(paths[:shown]) + (", ..." if len(paths) > shown else "")
                raise TraceError(
                    f"{option} {pattern!r} matches no parameter; parameter paths look like "
                    f"{listed} (run hypernn-gen inspect to list them all)"
                )
