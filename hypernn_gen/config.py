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
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10: tomli, which black (a dependency) requires there
    import tomli as tomllib

from .errors import GenerationError
from .options import BY_KEY, GenerateOptions, convert

__all__ = ["find_pyproject", "load_jobs"]

_PATH_KEYS = ("target", "output", "template_dir")
_KEYS = ("target", *BY_KEY)  #: pyproject keys, from the option schema


def find_pyproject(start: Path | None = None) -> Path | None:
    """The nearest ``pyproject.toml`` at or above ``start`` (default: the working directory)."""
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        candidate = directory / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def _normalise(key: str, where: str) -> str:
    """A pyproject key (``-`` or ``_``) -> its schema key; an unknown one fails with a suggestion."""
    name = key.replace("_", "-")
    if name not in _KEYS:
        close = difflib.get_close_matches(name, _KEYS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(_KEYS)}"
        raise GenerationError(f"{where}: unknown key {key!r}{hint}")
    return name


def _convert(key: str, value: Any, where: str) -> tuple[str, Any]:
    if key == "target":
        if not isinstance(value, str):
            raise GenerationError(f"{where}: target must be a string, got {value!r}")
        return "target", value
    option = BY_KEY[key]
    return option.name, convert(option, value, where)


def load_jobs(pyproject: Path) -> list[GenerateOptions]:
    """The jobs of ``[tool.hypernn-gen]``, defaults applied, paths made relative to the cwd."""
    try:
        data = tomllib.loads(pyproject.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise GenerationError(
            f"{pyproject}: invalid TOML: {exc}; fix that line (https://toml.io)"
        ) from exc
    except UnicodeDecodeError as exc:
        raise GenerationError(
            f"{pyproject} is not UTF-8 (byte {exc.start}); save it as UTF-8, as TOML requires"
        ) from exc
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
    top = f"{pyproject.name} [tool.hypernn-gen]"
    base_values = dict(_convert(_normalise(k, top), v, top) for k, v in defaults.items())
    for i, job in enumerate(jobs):
        where = f"{pyproject.name} [[tool.hypernn-gen.jobs]] #{i + 1}"
        if not isinstance(job, dict):
            raise GenerationError(f"{where}: a job must be a table, got {job!r}")
        merged: dict[str, Any] = dict(base_values)
        for key, value in job.items():
            name, converted = _convert(_normalise(key, where), value, where)
            merged[name] = converted
        if "target" not in merged:
            raise GenerationError(f'{where}: a job needs a target = "path/to/target.py"')
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
