"""``[tool.hypernn-gen]`` in ``pyproject.toml``: a list of generation jobs.

    [tool.hypernn-gen]
    embedding-dim = 32                 # defaults for every job (any job option)

    [[tool.hypernn-gen.jobs]]
    target = "models/policy.py:make_policy"
    backend = "torch"
    mode = "dynamic"
    input-shape = ["1,8"]
    output = "src/policy_hypernet.py"

``hypernn-gen`` with no target runs every job; ``hypernn-gen --check`` checks every job. Keys
use the CLI's flag names (``-`` or ``_`` both accepted); an unknown key is an error with a
"did you mean" suggestion. Relative paths are relative to the pyproject's directory.
"""

from __future__ import annotations

import difflib
from dataclasses import fields
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10: tomli, which black (a dependency) requires there
    import tomli as tomllib

from .design import parse_widths
from .errors import GenerationError, HypernnGenError
from .generate import GenerateOptions
from .load import parse_input_shape

__all__ = ["find_pyproject", "load_jobs"]

_PATH_KEYS = ("target", "output", "template_dir")
_OPTION_KEYS = tuple(f.name for f in fields(GenerateOptions) if f.name != "extra")
_ALIASES = {"input_shape": "input_shapes"}


def find_pyproject(start: Path | None = None) -> Path | None:
    """The nearest ``pyproject.toml`` at or above ``start`` (default: the working directory)."""
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        candidate = directory / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def _normalise(key: str, where: str) -> str:
    name = key.replace("-", "_")
    name = _ALIASES.get(name, name)
    if name not in _OPTION_KEYS:
        flags = [k.replace("_", "-") for k in _OPTION_KEYS] + ["input-shape"]
        close = difflib.get_close_matches(key.replace("_", "-"), flags, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(flags)}"
        raise GenerationError(f"{where}: unknown key {key!r}{hint}")
    return name


def _convert(name: str, value: Any, where: str) -> Any:
    if name == "input_shapes":
        values = value if isinstance(value, list) else [value]
        return tuple(parse_input_shape(str(v)) for v in values)
    if name in ("generator_hidden", "embedding_hidden", "condition_shape"):
        flag = name.replace("_", "-")
        try:
            if name == "condition_shape":
                text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
                return parse_input_shape(text)
            return parse_widths(value)
        except HypernnGenError as exc:
            raise GenerationError(f"{where}: {flag}: {exc}") from None
    if name in ("include", "exclude"):
        return tuple(value if isinstance(value, list) else [value])
    if name in ("embedding_dim", "num_embeddings", "chunk_dim") and not isinstance(value, int):
        flag = name.replace("_", "-")
        raise GenerationError(f"{where}: {flag} must be an integer, got {value!r}")
    return value


def load_jobs(pyproject: Path) -> list[GenerateOptions]:
    """The jobs of ``[tool.hypernn-gen]``, defaults applied, paths made relative to the cwd."""
    try:
        data = tomllib.loads(pyproject.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise GenerationError(f"{pyproject}: invalid TOML: {exc}") from exc
    section = data.get("tool", {}).get("hypernn-gen")
    if section is None:
        raise GenerationError(
            f"no target given and {pyproject} has no [tool.hypernn-gen] section; pass a target "
            "file (hypernn-gen target.py --backend torch) or add jobs to pyproject.toml"
        )
    base = pyproject.parent
    defaults = {k: v for k, v in section.items() if k != "jobs"}
    jobs = section.get("jobs", [])
    if not isinstance(jobs, list) or not jobs:
        raise GenerationError(f"{pyproject}: [tool.hypernn-gen] lists no [[tool.hypernn-gen.jobs]]")
    result = []
    for i, job in enumerate(jobs):
        where = f"{pyproject.name} [[tool.hypernn-gen.jobs]] #{i + 1}"
        merged: dict[str, Any] = {}
        for source in (defaults, job):
            for key, value in source.items():
                name = _normalise(key, where)
                merged[name] = _convert(name, value, where)
        if "target" not in merged:
            raise GenerationError(f"{where}: a job needs a target = \"path/to/target.py\"")
        for key in _PATH_KEYS:
            if key in merged:
                text = str(merged[key])
                file_part, colon, name = text.partition(":") if key == "target" else (text, "", "")
                path = Path(file_part)
                if not path.is_absolute():
                    path = Path(_rel(base / path))
                merged[key] = path.as_posix() + colon + name
                if key == "output" and text.endswith(("/", "\\")):
                    merged[key] += "/"  # a directory, existing or not: Path() drops the slash
        result.append(GenerateOptions(**merged))
    return result


def _rel(path: Path) -> str:
    import os

    return os.path.relpath(path)
