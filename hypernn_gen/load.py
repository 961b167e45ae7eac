"""Load a target network from ``path/to/target.py[:NAME]`` without allocating its parameters.

The target file is imported under a private module name with its own directory on ``sys.path``
(so ``from model import GPT`` next to it works). ``NAME`` may be a module class (built with no
arguments), a module instance or a zero-argument factory function. Without ``NAME`` the loader
takes a module-level ``target`` or ``make_target``, else the only module class or instance the
file defines.

Frameworks are detected from what the file itself imported (``sys.modules``), so a PyTorch-only
user never needs JAX and vice versa:

* ``torch.nn.Module``  -> ``"torch"``
* ``flax.linen.Module`` -> ``"linen"``
* ``flax.nnx.Module``  -> ``"nnx"``

Factories are called once to learn what they build: on the ``meta`` device for PyTorch and under
``jax.eval_shape`` for JAX, so no parameter memory is allocated.

Example inputs come from ``--input-shape``, a module-level ``example_input(s)`` (positional
arrays), or a module-level ``example_call``: the whole call, ``(args, kwargs)`` (any values:
arrays, PRNG keys, ``nnx.Rngs``, flags such as ``train=False``), or a zero-argument function
returning it (called afresh whenever the call is made, so an ``nnx.Rngs`` is never reused).

Every problem raises :class:`~hypernn_gen.errors.TargetLoadError` with a one-line message that
names the problem and the fix.
"""

from __future__ import annotations

import ast
import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import importlib.util
import inspect
import operator
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, NamedTuple

from .errors import TargetLoadError
from .seeding import seeded_import

__all__ = [
    "DEFAULT_NAMES",
    "EXAMPLE_CALL",
    "INPUT_DTYPES",
    "InputSpec",
    "LoadedTarget",
    "DEFAULT_LOAD_TIMEOUT",
    "guarded_target_code",
    "target_time_limit",
    "load_target",
    "is_example_array",
    "load_time_limit",
    "parse_input_shape",
]

Framework = Literal["torch", "linen", "nnx"]
Kind = Literal["class", "instance", "factory"]

#: dtype names accepted by ``--input-dtype`` (NumPy-style, as layouts spell them).
INPUT_DTYPES = (
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
)

#: module-level names used when the spec gives no ``NAME``, in this order of preference.
DEFAULT_NAMES = ("target", "make_target")

_MODULE_PREFIX = "_hypernn_gen_target_"

#: seconds that importing the target file and building it once may take (``--load-timeout``)
DEFAULT_LOAD_TIMEOUT = 120.0
_LOAD_TIMEOUT: contextvars.ContextVar[float] = contextvars.ContextVar(
    "load_timeout", default=DEFAULT_LOAD_TIMEOUT
)


@contextlib.contextmanager
def load_time_limit(seconds: float | None) -> Iterator[None]:
    """Within the block, :func:`load_target` defaults to ``seconds`` (``0``/``None``: no limit)."""
    token = _LOAD_TIMEOUT.set(float(seconds or 0))
    try:
        yield
    finally:
        _LOAD_TIMEOUT.reset(token)


class InputSpec(NamedTuple):
    """Shape and NumPy-style dtype name of one example input of the target's forward pass."""

    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class LoadedTarget:
    """A target network found in a Python file, ready to be traced.

    Attributes:
        spec: the spec as given, ``path/to/target.py[:NAME]``.
        path: the target file, resolved.
        name: the module-level name that was used (given or found).
        framework: ``"torch"``, ``"linen"`` or ``"nnx"``.
        kind: ``"class"`` (built with no arguments), ``"instance"`` or ``"factory"``.
        obj: the object bound to ``name``: the class, the instance or the factory function.
        factory: a zero-argument callable that builds a fresh target (with the file's directory
            on ``sys.path`` while it runs); ``None`` for an instance.
        input_specs: shape and dtype of each example input of the forward pass; empty when
            neither ``--input-shape`` nor ``example_input(s)`` in the file gave any.
        example_inputs: the file's own ``example_input(s)`` objects (or ``example_call``'s
            positional arguments), as a tuple; ``None`` when the file defines none or
            ``input_shapes`` overrode them.
        source_module: the imported Python module of the target file.
        example_call: the file's ``example_call`` as a zero-argument function returning a fresh
            ``(args, kwargs)``; ``None`` when the file defines none or ``input_shapes`` overrode
            its positional arguments.
        example_kwargs: the keyword arguments of the file's ``example_call`` (empty without
            one); ``input_shapes`` replace only the positional arguments, these stay.
    """

    spec: str
    path: Path
    name: str
    framework: Framework
    kind: Kind
    obj: Any
    factory: Callable[[], Any] | None
    input_specs: tuple[InputSpec, ...]
    example_inputs: tuple[Any, ...] | None
    source_module: ModuleType
    example_call: Callable[[], tuple[tuple[Any, ...], dict[str, Any]]] | None = None
    example_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def display(self) -> str:
        """``target.py:NAME`` with the file as the user spelled it."""
        return f"{_split_spec(self.spec)[0]}:{self.name}"

    def describe_exception(self, exc: BaseException) -> str:
        """``"ValueError: bad size (target.py line 12)"``: type, first message line, location.

        The location is the innermost traceback frame inside the target file, so the user sees
        the line of *their* code that failed, not a line deep inside the framework.
        """
        return _describe_exception(exc, self.path, _split_spec(self.spec)[0])


def parse_input_shape(text: str) -> tuple[int, ...]:
    """Parse ``--input-shape`` text such as ``"1,8"`` or ``"2, 1, 8, 8"`` into a shape tuple."""
    parts = [p.strip() for p in text.strip().strip("()[]").split(",")]
    if parts and parts[-1] == "":  # a trailing comma, as in "8,"
        parts.pop()
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise TargetLoadError(
            f"bad --input-shape {text!r}: expected comma-separated positive integers, "
            "e.g. --input-shape 1,8 (repeat the option for each input)"
        )
    return shape


def load_target(
    spec: str,
    *,
    input_shapes: Sequence[Sequence[int] | str] | None = None,
    input_dtype: str = "float32",
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
) -> LoadedTarget:
    """Import ``path/to/target.py[:NAME]`` and find the target network in it.

    Args:
        spec: the target file, optionally followed by ``:NAME``.
        input_shapes: one shape per positional input of the forward pass (tuples, or
            ``--input-shape`` text such as ``"1,8"``); overrides the file's ``example_input(s)``
            (or ``example_call``'s positional arguments; its keyword arguments stay).
        input_dtype: dtype of the ``input_shapes`` inputs (one of :data:`INPUT_DTYPES`).
        cwd: directory that a relative path is resolved against (default: the current one).
        timeout: seconds that importing the file and building the target may take (``0``: no
            limit; default: :func:`load_time_limit`'s, else 120; enforced in the main thread).

    While the file is imported and the target built, its stdin reads end of file, what it prints
    goes to stderr (the tool's stdout stays clean for ``--json`` and ``--diff``), and the working
    directory is restored afterwards if it changed it.

    Raises:
        TargetLoadError: the file, the NAME, the target or the example inputs cannot be used.
    """
    file_text, name = _split_spec(spec)
    path = _resolve_file(file_text, cwd)
    shapes = _normalise_shapes(input_shapes)
    if input_dtype not in INPUT_DTYPES:
        raise TargetLoadError(
            f"unknown --input-dtype {input_dtype!r}; use one of {', '.join(INPUT_DTYPES)}"
        )

    if timeout is None:
        timeout = _LOAD_TIMEOUT.get()
    with _guarded(file_text, timeout):
        module = _import_file(path, file_text)
        frameworks = _framework_bases()
        if name is None:
            name = _find_default_name(module, path, file_text, frameworks)
        elif not hasattr(module, name):
            candidates = sorted(_candidates(module, path, frameworks) + _functions(module))
            raise TargetLoadError(
                f"{file_text} has no {name!r}; candidates: {_listing(candidates)}. "
                f"Pass one as {file_text}:NAME"
            )
        obj = getattr(module, name)
        kind, framework, factory = _classify(obj, name, file_text, path, frameworks)
        example_call = _file_example_call(module, file_text, path.parent)
        example_args, example_kwargs = example_call() if example_call else ((), {})
        if example_call is not None and framework == "torch":
            _check_torch_example_values(example_args, example_kwargs, file_text)

    if shapes:
        input_specs = tuple(InputSpec(shape, input_dtype) for shape in shapes)
        example_inputs, example_call = None, None
    elif example_call is not None:
        example_inputs = example_args
        input_specs = tuple(_input_spec(x, file_text) for x in example_args if is_example_array(x))
    else:
        example_inputs = _file_example_inputs(module, file_text)
        input_specs = tuple(_input_spec(x, file_text) for x in example_inputs or ())
    if framework == "linen" and not input_specs:
        raise TargetLoadError(
            f"{file_text}:{name} is a Flax linen module, which needs example inputs to create "
            "its parameters; pass --input-shape 1,8 (once per input) or define example_input "
            "in the target file"
        )
    return LoadedTarget(
        spec=spec,
        path=path,
        name=name,
        framework=framework,
        kind=kind,
        obj=obj,
        factory=factory,
        input_specs=input_specs,
        example_inputs=example_inputs,
        source_module=module,
        example_call=example_call,
        example_kwargs=example_kwargs,
    )


# -- running the target's code --------------------------------------------------------------------


class _LoadTimeout(BaseException):
    """Raised by the alarm; a BaseException so a target's ``except Exception`` cannot eat it."""


@contextlib.contextmanager
def guarded_target_code(
    file_text: str, timeout: float | None = None, *, what: str = "loading"
) -> Iterator[None]:
    """Run the target's own code: stdin at EOF, stdout to stderr, cwd restored, a time limit."""
    saved_cwd = os.getcwd()
    use_alarm = (
        bool(timeout)
        and not _WHOLE_JOB.get()  # inside target_time_limit: its alarm covers this block too
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    previous = None
    if use_alarm:

        def on_alarm(signum: int, frame: object) -> None:
            raise _LoadTimeout

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, float(timeout))  # type: ignore[arg-type]
    saved_stdin = sys.stdin
    try:
        with open(os.devnull) as devnull, contextlib.redirect_stdout(sys.stderr):
            sys.stdin = devnull
            try:
                yield
            finally:
                sys.stdin = saved_stdin
    except _LoadTimeout:
        if not use_alarm:  # the enclosing target_time_limit's alarm: it reports
            raise
        raise TargetLoadError(
            f"{what} {file_text} took longer than {timeout:g} s (an endless loop at import or "
            "in its forward, or a wait for input?); fix the target file, or raise the limit "
            "with --load-timeout SECONDS (0: none)"
        ) from None
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        if os.getcwd() != saved_cwd:
            os.chdir(saved_cwd)


_guarded = guarded_target_code

#: set within :func:`target_time_limit`, whose one alarm covers every guarded block inside it
_WHOLE_JOB: contextvars.ContextVar[bool] = contextvars.ContextVar("whole_job", default=False)


@contextlib.contextmanager
def target_time_limit(spec: str, timeout: float | None = None) -> Iterator[None]:
    """One time limit (``--load-timeout``; default: :func:`load_time_limit`'s) over a whole job
    that runs the target's code: importing and building it, and tracing it, where its forward
    runs (the meta probe, the example call, ``eval_shape``) and may loop just as well."""
    if timeout is None:
        timeout = _LOAD_TIMEOUT.get()
    with guarded_target_code(_split_spec(spec)[0], timeout, what="loading and tracing"):
        token = _WHOLE_JOB.set(True)
        try:
            yield
        finally:
            _WHOLE_JOB.reset(token)


# -- the file -------------------------------------------------------------------------------------


def _split_spec(spec: str) -> tuple[str, str | None]:
    """``"a/b.py:Net"`` -> ``("a/b.py", "Net")``; a colon not after ``.py`` is part of the path."""
    head, sep, tail = spec.rpartition(":")
    if not sep or not head.endswith(".py"):
        return spec, None
    if not tail.isidentifier():
        raise TargetLoadError(
            f"bad target spec {spec!r}: NAME after ':' must be a Python identifier; "
            "write path/to/target.py:NAME"
        )
    return head, tail


def _resolve_file(file_text: str, cwd: str | os.PathLike[str] | None) -> Path:
    base = Path(cwd) if cwd is not None else Path.cwd()
    path = (base / Path(file_text).expanduser()).resolve()
    if not path.exists():
        raise TargetLoadError(
            f"target file {file_text} not found (looked in {path.parent}); "
            "check the path, e.g. hypernn-gen inspect path/to/target.py"
        )
    if path.is_dir():
        raise TargetLoadError(
            f"{file_text} is a directory; pass the Python file that defines the target, "
            "e.g. path/to/target.py"
        )
    if path.suffix != ".py":
        raise TargetLoadError(
            f"{file_text} is not a Python file; pass a .py file that defines the target, "
            "e.g. path/to/target.py[:NAME]"
        )
    return path


@contextlib.contextmanager
def _on_sys_path(directory: Path) -> Iterator[None]:
    """Put ``directory`` first on ``sys.path`` for the duration; restore ``sys.path`` after."""
    saved = list(sys.path)
    sys.path.insert(0, str(directory))
    try:
        yield
    finally:
        sys.path[:] = saved


def _import_file(path: Path, file_text: str) -> ModuleType:
    """Execute the file as a fresh module registered under a name unique to its path.

    The module stays registered in ``sys.modules`` afterwards: dataclasses, Flax and pickling
    look classes up by ``cls.__module__``. Loading the same file again replaces it.
    """
    package, package_root = _package_of(path)
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    module_name = f"{package}.{path.stem}" if package else _MODULE_PREFIX + digest
    module_name = module_name.removesuffix(".__init__")
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - a .py file always has a loader
        raise TargetLoadError(f"cannot import {file_text}; pass a plain Python source file")
    module = importlib.util.module_from_spec(spec)
    try:
        with _on_sys_path(path.parent), _on_sys_path(package_root or path.parent):
            if package:
                importlib.import_module(package)
            sys.modules[module_name] = module
            with seeded_import():  # module-level instances draw the same values each run
                spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(module_name, None)
        where = _relative_to(exc.filename, path, file_text)
        raise TargetLoadError(
            f"syntax error in {where} line {exc.lineno}: {exc.msg}; fix the target file"
        ) from exc
    except (Exception, SystemExit) as exc:
        sys.modules.pop(module_name, None)
        fix = (
            "install the missing package or fix the import"
            if isinstance(exc, ImportError)
            else "fix the target file"
        )
        raise TargetLoadError(
            f"importing {file_text} failed: {_describe_exception(exc, path, file_text)}; {fix}"
        ) from exc
    return module


def _package_of(path: Path) -> tuple[str | None, Path | None]:
    """``("pkg.sub", root)`` when ``path`` uses relative imports and sits in a package.

    The package is found as pytest's rootdir walk does: up through folders that hold an
    ``__init__.py``; ``root`` is the folder above the top one, put on ``sys.path``. A file without
    relative imports is imported on its own, as before.
    """
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError):
        return None, None  # the import itself reports it
    relative = any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree))
    if not relative or not (path.parent / "__init__.py").is_file():
        return None, None
    parts: list[str] = []
    folder = path.parent
    while (folder / "__init__.py").is_file() and folder.name.isidentifier():
        parts.insert(0, folder.name)
        if folder.parent == folder:
            break
        folder = folder.parent
    if not parts:
        return None, None
    return ".".join(parts), folder


def _relative_to(filename: str | None, path: Path, file_text: str) -> str:
    """The target file as the user spelled it; any other file by its own name."""
    if filename and Path(filename).resolve() == path:
        return file_text
    return filename or file_text


def _describe_exception(exc: BaseException, path: Path, file_text: str) -> str:
    lines = str(exc).strip().splitlines()
    message = lines[0].rstrip(".") if lines else ""
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if _same_file(f.filename, path)]
    if frames:
        text += f" ({file_text} line {frames[-1].lineno})"
    return text


def _same_file(filename: str, path: Path) -> bool:
    try:
        return Path(filename).resolve() == path
    except (OSError, ValueError):
        return False


# -- finding the target ---------------------------------------------------------------------------


def _framework_bases() -> dict[Framework, type]:
    """Module base classes of the frameworks that are already imported (nothing is imported)."""
    bases: dict[Framework, type] = {}
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "nn"):
        bases["torch"] = torch.nn.Module
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None:
        bases["nnx"] = nnx.Module
    linen = sys.modules.get("flax.linen")
    if linen is not None:
        bases["linen"] = linen.Module
    return bases


def _framework_of(obj: Any, frameworks: dict[Framework, type]) -> Framework | None:
    """The framework of a module class or instance, ``None`` for anything else."""
    cls = obj if inspect.isclass(obj) else type(obj)
    for framework, base in frameworks.items():
        if issubclass(cls, base):
            return framework
    return None


def _imported_names(path: Path) -> set[str]:
    """Names the file binds with ``import`` statements (anywhere in the file)."""
    tree = ast.parse(path.read_bytes())  # bytes: a coding line or BOM decides the encoding
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names.add(alias.asname or alias.name.split(".")[0])
    return names


def _candidates(module: ModuleType, path: Path, frameworks: dict[Framework, type]) -> list[str]:
    """Module classes defined in the file and module instances created there, sorted by name."""
    imported = _imported_names(path)
    found: list[str] = []
    seen: set[int] = set()
    for name in sorted(vars(module)):
        value = vars(module)[name]
        if name.startswith("__") or id(value) in seen or _framework_of(value, frameworks) is None:
            continue
        if inspect.isclass(value):
            if value.__module__ != module.__name__:
                continue
        elif name in imported:
            continue
        seen.add(id(value))
        found.append(name)
    return found


def _functions(module: ModuleType) -> list[str]:
    """Public functions defined in the file: possible factories."""
    return [
        name
        for name, value in vars(module).items()
        if inspect.isfunction(value)
        and value.__module__ == module.__name__
        and not name.startswith("_")
    ]


def _listing(names: Sequence[str], limit: int = 8) -> str:
    if not names:
        return "(none)"
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _find_default_name(
    module: ModuleType, path: Path, file_text: str, frameworks: dict[Framework, type]
) -> str:
    defaults = [n for n in DEFAULT_NAMES if hasattr(module, n)]
    if len(defaults) == 1:
        return defaults[0]
    if len(defaults) > 1:
        raise TargetLoadError(
            f"{file_text} defines both {' and '.join(defaults)}; keep one, or pick one with "
            f"{file_text}:NAME"
        )
    candidates = _candidates(module, path, frameworks)
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise TargetLoadError(
            f"{file_text} defines several modules ({', '.join(candidates)}); pick one with "
            f"{file_text}:NAME, e.g. {file_text}:{candidates[0]}, or define make_target()"
        )
    raise TargetLoadError(
        f"{file_text} defines no torch or flax module; define a module class, a module "
        f"instance or make_target() returning one, or pass {file_text}:NAME"
    )


def _classify(
    obj: Any,
    name: str,
    file_text: str,
    path: Path,
    frameworks: dict[Framework, type],
) -> tuple[Kind, Framework, Callable[[], Any] | None]:
    """Kind, framework and zero-argument factory of the object bound to ``name``."""
    shown = f"{file_text}:{name}"
    framework = _framework_of(obj, frameworks)
    if framework is not None and not inspect.isclass(obj):
        _refuse_lazy(obj, shown)
        return "instance", framework, None
    if framework is not None:
        _require_no_arguments(obj, shown, f"{name}()", file_text)
        return "class", framework, _in_directory(obj, path.parent)
    if inspect.isclass(obj) or not callable(obj):
        what = f"the class {obj.__name__}" if inspect.isclass(obj) else article(type(obj).__name__)
        raise TargetLoadError(
            f"{shown} is {what}, not a torch or flax module class, module instance or "
            f"zero-argument factory; point NAME at one of those, e.g. {file_text}:make_target"
        )
    _require_no_arguments(obj, shown, f"{name}()", file_text)
    factory = _in_directory(obj, path.parent)
    try:
        built = _build_abstractly(factory)
    except Exception as exc:
        fix = build_fix(exc, "fix the factory so it builds the target with no arguments")
        raise TargetLoadError(
            f"calling {name}() failed: {_describe_exception(exc, path, file_text)}; {fix}"
        ) from exc
    framework = _framework_of(built, frameworks)
    if framework is None or inspect.isclass(built):
        what = f"the class {built.__name__}" if inspect.isclass(built) else type(built).__name__
        raise TargetLoadError(
            f"{name}() returned {what}, not a torch or flax module instance; "
            "make the factory return the module instance"
        )
    _refuse_lazy(built, shown)
    return "factory", framework, factory


_DEVICE_WORDS = ("cuda", "nvidia", "cannot copy out of meta tensor", "mps", "xla device")


def build_fix(exc: BaseException, default: str) -> str:
    """The fix to name when building the target raised ``exc``: specific when it can be.

    A lazy module (``nn.LazyLinear``) has no shapes until it runs; a ``.cuda()`` or
    ``device="cuda"`` in the builder cannot work on the ``meta`` device the tool builds on.
    """
    text = str(exc).lower()
    if "uninitialized parameter" in text or "lazy" in text:
        return (
            "the target uses a lazy module (nn.LazyLinear, nn.LazyConv2d, ...) whose shapes are "
            "unknown until it runs; give in_features/in_channels, e.g. nn.Linear(4, 3)"
        )
    if any(word in text for word in _DEVICE_WORDS):
        return (
            "the target moves itself to a device (.cuda(), .to('cuda'), device='cuda'); build it "
            "on the CPU (hypernn-gen builds on 'meta') and move the hypernetwork after, e.g. "
            "HyperNet().to(device)"
        )
    return default


def _lazy_parameters(built: Any) -> list[str]:
    """Names of uninitialised (lazy) parameters of a torch module; empty for anything else."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(built, torch.nn.Module):
        return []
    lazy = torch.nn.parameter.UninitializedParameter
    return [n for n, p in built.named_parameters() if isinstance(p, lazy)]


def _refuse_lazy(built: Any, shown: str) -> None:
    lazy = _lazy_parameters(built)
    if lazy:
        raise TargetLoadError(
            f"{shown} has uninitialised lazy parameters ({_listing(lazy, 3)}): their shapes are "
            "unknown until the module runs; give in_features/in_channels, e.g. nn.Linear(4, 3) "
            "instead of nn.LazyLinear(3)"
        )


def article(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def _require_no_arguments(obj: Any, shown: str, call: str, file_text: str) -> None:
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    try:
        parameters = list(inspect.signature(obj).parameters.values())
        if inspect.isclass(obj) and all(p.kind in variadic for p in parameters):
            # a metaclass __call__(*args, **kwargs) (flax.nnx) hides __init__'s signature
            parameters = list(inspect.signature(obj.__init__).parameters.values())[1:]
    except (TypeError, ValueError):  # builtins without a signature: find out when it is called
        return
    required = [
        p.name
        for p in parameters
        if p.default is inspect.Parameter.empty and p.kind not in variadic
    ]
    if required:
        raise TargetLoadError(
            f"{call} needs arguments ({', '.join(required)}), but {shown} must build with none; "
            "pass a zero-argument factory make_target() or a module instance, e.g. "
            f"{file_text}:make_target"
        )


def _in_directory(factory: Callable[[], Any], directory: Path) -> Callable[[], Any]:
    """Wrap ``factory`` so imports it makes lazily resolve next to the target file.

    It also runs guarded like the import: stdin at EOF, prints to stderr, the cwd restored.
    """

    @functools.wraps(factory)
    def build() -> Any:
        with _on_sys_path(directory), guarded_target_code(str(directory)):
            return factory()

    return build


def _build_abstractly(factory: Callable[[], Any]) -> Any:
    """Call ``factory`` without allocating parameter memory, to learn what it builds.

    PyTorch modules are built on the ``meta`` device, JAX ones under ``jax.eval_shape`` (their
    arrays are abstract). A factory that cannot run under ``jax.eval_shape`` (it mutates an
    ``nnx.Rngs`` created outside, say) is called for real instead; so is one that reads values
    on ``meta`` (``torch.linspace(...).tolist()``, as timm's drop-path rates do), on the CPU
    under a fixed seed, as the tracer does. If that fails too, its error is the one reported
    (``.cuda()`` fails on meta and on a CPU-only build alike); parameters it puts on another
    device are refused with the meta error (the device advice).
    """
    try:
        return _build_on_meta(factory)
    except Exception as exc:
        torch = sys.modules.get("torch")
        if torch is None or "meta" not in str(exc).lower():
            raise
        with seeded_import():
            built = factory()
        if isinstance(built, torch.nn.Module) and any(
            t.device.type != "cpu" for t in (*built.parameters(), *built.buffers())
        ):
            raise exc from None
        return built


def _build_on_meta(factory: Callable[[], Any]) -> Any:
    torch = sys.modules.get("torch")
    jax = sys.modules.get("jax")
    with torch.device("meta") if torch is not None else contextlib.nullcontext():
        if jax is None:
            return factory()
        built: list[Any] = []
        try:
            jax.eval_shape(lambda: built.append(factory()))
        except Exception as exc:
            if not type(exc).__module__.startswith(("jax", "flax")):
                raise
            return factory()
        return built[0]


# -- example inputs -------------------------------------------------------------------------------


def _normalise_shapes(shapes: Sequence[Sequence[int] | str] | None) -> list[tuple[int, ...]]:
    result = []
    for shape in shapes or ():
        if isinstance(shape, str):
            result.append(parse_input_shape(shape))
            continue
        try:
            dims = tuple(operator.index(d) for d in shape)
        except TypeError:
            dims = ()
        if not dims or any(d <= 0 for d in dims):
            raise TargetLoadError(
                f"bad input shape {shape!r}: expected a tuple of positive integers such as "
                "(1, 8), or --input-shape 1,8"
            )
        result.append(dims)
    return result


EXAMPLE_CALL = "example_call"


def is_example_array(x: Any) -> bool:
    """An array-like example input with a shape and a numeric dtype (not a typed PRNG key)."""
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    return shape is not None and dtype is not None and "key<" not in str(dtype)


def _file_example_call(
    module: ModuleType, file_text: str, directory: Path
) -> Callable[[], tuple[tuple[Any, ...], dict[str, Any]]] | None:
    """``example_call`` as a checked zero-argument function returning ``(args, kwargs)``."""
    if not hasattr(module, EXAMPLE_CALL):
        return None
    clash = [n for n in ("example_input", "example_inputs") if hasattr(module, n)]
    if clash:
        raise TargetLoadError(
            f"{file_text} defines both {EXAMPLE_CALL} and {clash[0]}; keep one ({EXAMPLE_CALL} "
            "holds the whole call: (args, kwargs))"
        )
    value = getattr(module, EXAMPLE_CALL)
    make = _in_directory(value, directory) if callable(value) else (lambda: value)

    def call() -> tuple[tuple[Any, ...], dict[str, Any]]:
        try:
            made = make()
        except Exception as exc:
            raise TargetLoadError(
                f"calling {EXAMPLE_CALL}() in {file_text} failed: "
                f"{_describe_exception(exc, Path(module.__file__ or file_text), file_text)}; "
                "fix the function"
            ) from exc
        ok = (
            isinstance(made, (tuple, list))
            and len(made) == 2
            and isinstance(made[0], (tuple, list))
            and isinstance(made[1], dict)
            and all(isinstance(k, str) for k in made[1])
        )
        if not ok:
            raise TargetLoadError(
                f"{EXAMPLE_CALL} in {file_text} is {article(type(made).__name__)}, not a pair "
                f"(positional arguments, keyword arguments); write {EXAMPLE_CALL} = "
                f'((x,), {{"train": False}}) or a function returning it'
            )
        if not made[0] or not is_example_array(made[0][0]):
            raise TargetLoadError(
                f"{EXAMPLE_CALL} in {file_text} needs a tensor/array as its first positional "
                f"argument (the conditioning input, batch first); write {EXAMPLE_CALL} = "
                f'((x,), {{"train": False}})'
            )
        return tuple(made[0]), dict(made[1])

    return call


#: What a Torch ``example_call`` may hold besides tensors (in tuples, lists and dicts): the
#: values a generated ``__main__`` can write out as Python literals.
_PLAIN_VALUES = (type(None), bool, int, float, str)


def _unsupported_leaf(value: Any, depth: int = 0) -> Any:
    """The first value in ``value`` that is neither a tensor nor a plain literal, else ``None``."""
    if is_example_array(value) or isinstance(value, _PLAIN_VALUES):
        return None
    if isinstance(value, (tuple, list, dict)) and depth < 8:
        items = value.values() if isinstance(value, dict) else value
        bad = (_unsupported_leaf(v, depth + 1) for v in items)
        return next((b for b in bad if b is not None), None)
    return value


def _check_torch_example_values(args: tuple, kwargs: dict, file_text: str) -> None:
    """Refuse example-call values the generated Torch ``__main__`` cannot write out."""
    for where, item in [*((f"argument {i}", a) for i, a in enumerate(args)), *kwargs.items()]:
        bad = _unsupported_leaf(item)
        if bad is not None:
            raise TargetLoadError(
                f"example_call in {file_text} holds {article(type(bad).__name__)} in {where}; "
                "use tensors, None, bools, numbers, strings, or tuples/lists/dicts of them"
            )


def _file_example_inputs(module: ModuleType, file_text: str) -> tuple[Any, ...] | None:
    names = [n for n in ("example_input", "example_inputs") if hasattr(module, n)]
    if len(names) > 1:
        raise TargetLoadError(
            f"{file_text} defines both example_input and example_inputs; keep one"
        )
    if not names:
        return None
    value = getattr(module, names[0])
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _input_spec(value: Any, file_text: str) -> InputSpec:
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is None or dtype is None:
        raise TargetLoadError(
            f"example_input in {file_text} holds {article(type(value).__name__)}, not a tensor or "
            "array; set it to a tensor/array (or a tuple of them), or pass --input-shape 1,8"
        )
    return InputSpec(tuple(int(s) for s in shape), str(dtype).removeprefix("torch."))
