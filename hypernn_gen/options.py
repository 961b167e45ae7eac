"""The one option schema: every generation option is one :class:`Option` row of :data:`OPTIONS`.

From the table come :class:`GenerateOptions` (the dataclass), the argparse flags
(:func:`add_option_arguments`), the pyproject conversion (:func:`convert`, used by
:mod:`hypernn_gen.config`), the regeneration command (:func:`command_args`) and the checks
(:func:`check_options`, and :func:`check_sizes` once the layout is known). A new option is one
row (plus whatever consumes it).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .adapters import GENERATES
from .design import (
    BATCH_NORM_STATS,
    CHUNKINGS,
    GRADIENT_SCALINGS,
    INIT_SCHEMES,
    check_hidden,
    parse_widths,
)
from .errors import GenerationError, HypernnGenError
from .load import INPUT_DTYPES, parse_input_shape
from .verify import FORMATTERS

__all__ = [
    "BACKENDS",
    "DEFAULT_EMBEDDING_HIDDEN",
    "MODES",
    "OPTIONS",
    "GenerateOptions",
    "Option",
    "add_option_arguments",
    "check_options",
    "check_sizes",
    "command_args",
    "context_options",
    "convert",
    "header_options",
    "options_from_namespace",
]

BACKENDS = ("torch", "flax")
MODES = ("static", "dynamic")
DEFAULT_EMBEDDING_HIDDEN = (64,)  #: hidden widths of the dynamic embedding network
#: a hypernetwork this many times larger than its target's generated values is refused
MAX_SIZE_RATIO = 1000
MAX_PADDING_FRACTION = 0.5  #: ... and so is a chunking where padding is most of the output
MIN_PADDING_REFUSED = 1024  #: ... once that padding is more than this many values

# kinds: how a value is written on the command line / in TOML and converted to the field's type
#   str, int, choice, widths (64,64 | [64, 64] | none), shape (3 | 4,4 | [4, 4]),
#   shapes (repeatable --input-shape), globs (repeatable strings), path, float


@dataclass(frozen=True)
class Option:
    """One generation option: its field, flag, kind, default and help."""

    name: str  #: the GenerateOptions field (pyproject key: the same with ``-``)
    kind: str
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    flag: str | None = None  #: default ``--<name with ->``
    short: str | None = None
    dynamic_only: bool = False  #: only meaningful with --mode dynamic
    always: bool = False  #: always written into the regeneration command
    exclusive: str | None = None  #: options sharing a group name exclude each other
    target_arg: bool = False  #: shapes the layout (inspect takes it too), next to TARGET
    layout_arg: bool = False  #: shapes the layout and chunking: inspect takes it too
    key: str | None = None  #: pyproject key, default the flag without ``--``
    header: tuple[int, int] | None = None  #: (line, position) in the header's ``options:`` lines
    generates: tuple[str, ...] | None = None  #: only meaningful with these --generate values

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def toml_key(self) -> str:
        return self.key or self.cli_flag.removeprefix("--")


OPTIONS: tuple[Option, ...] = (
    Option(
        "backend",
        "choice",
        None,
        "torch or flax (default: the target's)",
        BACKENDS,
        always=True,
        layout_arg=True,
        header=(1, 1),
    ),
    Option(
        "mode",
        "choice",
        "static",
        "static (default) or dynamic",
        MODES,
        always=True,
        layout_arg=True,
        header=(1, 2),
    ),
    Option(
        "embedding_dim",
        "int",
        32,
        "default 32",
        metavar="D",
        always=True,
        layout_arg=True,
        header=(1, 3),
    ),
    Option(
        "num_embeddings",
        "int",
        None,
        "number of chunks",
        metavar="N",
        exclusive="size",
        layout_arg=True,
        header=(1, 4),
    ),
    Option(
        "chunk_dim",
        "int",
        None,
        "values per chunk",
        metavar="C",
        exclusive="size",
        layout_arg=True,
        header=(1, 5),
    ),
    Option(
        "chunking",
        "choice",
        "auto",
        "auto (default: tensor with chunks holding whole rows when no size is given, else "
        "flat), flat (chunks run across tensors, as hyper-nn) or tensor (every tensor starts "
        "on a chunk)",
        CHUNKINGS,
        layout_arg=True,
        header=(2, 1),
    ),
    Option(
        "generator_hidden",
        "widths",
        (),
        "hidden widths of the weight generator, e.g. 64,64 "
        "(default none: linear; hidden layers turn the fused dynamic path off)",
        metavar="W",
        layout_arg=True,
        header=(2, 3),
    ),
    Option(
        "init_scheme",
        "choice",
        "target",
        "target (default: the target's own init "
        "statistics), hyperfan-in or hyperfan-out (Chang et al. 2020)",
        INIT_SCHEMES,
        layout_arg=True,
        header=(2, 2),
    ),
    Option(
        "gradient_scaling",
        "choice",
        "on",
        "on (default: gradient multipliers that let the target's own optimizer and learning "
        "rate train the hypernetwork; the forward is unchanged) or off (raw gradients)",
        GRADIENT_SCALINGS,
        header=(1, 6),
    ),
    Option(
        "condition_shape",
        "shape",
        None,
        "dynamic: one sample's conditioning input, e.g. 3 "
        "(default: the first input's shape without the batch; pass condition=... when it "
        "differs)",
        metavar="S",
        dynamic_only=True,
        header=(2, 5),
    ),
    Option(
        "condition_dtype",
        "choice",
        None,
        "dynamic: the conditioning input's dtype (default: the input's)",
        INPUT_DTYPES,
        metavar="D",
        dynamic_only=True,
    ),
    Option(
        "embedding_hidden",
        "widths",
        DEFAULT_EMBEDDING_HIDDEN,
        "dynamic: hidden widths of the embedding network (default 64)",
        metavar="W",
        dynamic_only=True,
        header=(2, 4),
    ),
    Option(
        "batch_norm_stats",
        "choice",
        "batch",
        "dynamic: BatchNorm in training mode normalises by batch (default: statistics over the "
        "whole batch, as the plain target, each sample's own scale and bias) or sample (each "
        "sample by its own statistics, as a batch of one)",
        BATCH_NORM_STATS,
        dynamic_only=True,
    ),
    Option(
        "input_shapes",
        "shapes",
        (),
        "shape of one forward input, e.g. 1,8 (repeat for "
        "several inputs; overrides the file's example_input)",
        metavar="S",
        flag="--input-shape",
        target_arg=True,
    ),
    Option(
        "input_dtype",
        "choice",
        "float32",
        f"dtype of the --input-shape inputs: {', '.join(INPUT_DTYPES)} (default float32)",
        INPUT_DTYPES,
        metavar="D",
        target_arg=True,
    ),
    Option(
        "include",
        "globs",
        (),
        "generate only parameters whose path matches (repeatable), e.g. 'blocks.*'",
        metavar="GLOB",
        target_arg=True,
    ),
    Option(
        "exclude",
        "globs",
        (),
        "keep parameters whose path matches as ordinary state (repeatable)",
        metavar="GLOB",
        target_arg=True,
    ),
    Option(
        "generate",
        "choice",
        "weights",
        "weights (default: generate the selected tensors), delta (each is its frozen base plus a "
        "generated delta that starts at 0) or lora (generated LoRA adapters on the frozen "
        "target's Linear layers)",
        GENERATES,
        layout_arg=True,
    ),
    Option(
        "lora_rank",
        "int",
        8,
        "lora: the adapters' rank r (default 8)",
        metavar="R",
        layout_arg=True,
        generates=("lora",),
    ),
    Option(
        "lora_alpha",
        "float",
        None,
        "lora: alpha, the adapters are scaled by alpha / r as in PEFT (default: r, scale 1)",
        metavar="A",
        generates=("lora",),
    ),
    Option(
        "lora_dropout",
        "float",
        0.0,
        "lora: dropout on the adapters' input in training (default 0)",
        metavar="P",
        generates=("lora",),
    ),
    Option(
        "lora_generator",
        "choice",
        "shared",
        "lora: shared (default: one generator for every layer, fed layer embeddings of depth and "
        "module type) or per-layer (each layer its own output heads, no layer embeddings)",
        ("shared", "per-layer"),
        layout_arg=True,
        generates=("lora",),
    ),
    Option(
        "base",
        "path",
        None,
        "delta/lora: checkpoint of the frozen base weights: Torch .safetensors or a torch state "
        "dict, Flax a flax.serialization msgpack file (default: the target's own weights)",
        metavar="PATH",
        layout_arg=True,
        generates=("delta", "lora"),
    ),
    Option("template_dir", "path", None, "user templates, tried first", metavar="DIR"),
    Option("formatter", "choice", "black", "black (default, in-process) or ruff", FORMATTERS),
    Option("output", "path", None, "output file or directory", metavar="PATH", short="-o"),
)
BY_NAME = {o.name: o for o in OPTIONS}
BY_KEY = {o.toml_key: o for o in OPTIONS}


def _dynamic(self: Any) -> bool:
    """What ``--mode dynamic`` implies, derived once: condition options, fusion, the header."""
    return self.mode == "dynamic"


GenerateOptions = dataclasses.make_dataclass(
    "GenerateOptions",
    [("target", str)]
    + [(o.name, Any, dataclasses.field(default=o.default)) for o in OPTIONS]
    + [("extra", dict, dataclasses.field(default_factory=dict))],
    frozen=True,
    namespace={
        "__doc__": "Everything that determines a generated file (the CLI flags, or one pyproject "
        "job); one field per row of hypernn_gen.options.OPTIONS.",
        "dynamic": property(_dynamic),
        "__module__": __name__,
    },
)


# -- conversion -----------------------------------------------------------------------------------


def _shape_text(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def convert(option: Option, value: Any, where: str) -> Any:
    """A command-line string or a TOML value -> the field's value; bad types fail naming ``where``."""
    flag = option.toml_key if where else option.cli_flag
    prefix = f"{where}: {flag}" if where else flag
    try:
        if option.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise GenerationError(f"{prefix} must be an integer, got {value!r}")
            return value
        if option.kind == "float":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise GenerationError(f"{prefix} must be a number, got {value!r}")
            return float(value)
        if option.kind == "shapes":
            values = value if isinstance(value, (list, tuple)) else [value]
            return tuple(parse_input_shape(_shape_text(v)) for v in values)
        if option.kind == "globs":
            values = value if isinstance(value, (list, tuple)) else [value]
            return tuple(str(v) for v in values)
        if option.kind == "widths":
            if isinstance(value, bool):
                raise GenerationError(f"{prefix} must be widths such as 64,64, got {value!r}")
            return parse_widths(value)
        if option.kind == "shape":
            return parse_input_shape(_shape_text(value))
    except GenerationError:
        raise
    except HypernnGenError as exc:
        if not where and option.cli_flag in str(exc):  # it names the flag already
            raise GenerationError(str(exc)) from None
        raise GenerationError(f"{prefix}: {exc}") from None
    if not isinstance(value, str):
        raise GenerationError(f"{prefix} must be a string, got {value!r}")
    return value


def options_from_namespace(args: argparse.Namespace) -> dict[str, Any]:
    """The fields given on the command line (absent ones keep the pyproject/default value)."""
    given = {}
    for option in OPTIONS:
        if option.name in vars(args):
            value = getattr(args, option.name)
            passed = option.kind in ("int", "float")
            given[option.name] = value if passed else convert(option, value, "")
    return given


# -- argparse -------------------------------------------------------------------------------------


def add_option_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    select: Callable[[Option], bool] = lambda o: True,
) -> None:
    """The flags of the selected options, all with default SUPPRESS (absent = not given)."""
    groups: dict[str, Any] = {}
    for option in OPTIONS:
        if not select(option):
            continue
        where = parser
        if option.exclusive:
            if option.exclusive not in groups:
                groups[option.exclusive] = parser.add_mutually_exclusive_group()
            where = groups[option.exclusive]
        flags = [option.short, option.cli_flag] if option.short else [option.cli_flag]
        kwargs: dict[str, Any] = {
            "dest": option.name,
            "default": argparse.SUPPRESS,
            "help": option.help,
        }
        if option.metavar:
            kwargs["metavar"] = option.metavar
        if option.kind in ("shapes", "globs"):
            kwargs["action"] = "append"
        if option.kind == "int":
            kwargs["type"] = int
        if option.kind == "float":
            kwargs["type"] = float
        if option.choices is not None and option.kind == "choice":
            kwargs["choices"] = option.choices
        where.add_argument(*flags, **kwargs)


# -- the regeneration command ---------------------------------------------------------------------


def _widths(widths: tuple[int, ...] | None) -> str:
    return ",".join(map(str, widths)) if widths else "none"


def command_args(options: Any, relative: Callable[[str], str]) -> list[str]:
    """The flags that reproduce ``options`` (defaults left out), in schema order, ``-o`` last."""
    args: list[str] = []
    for option in OPTIONS:
        value = getattr(options, option.name)
        if option.name == "output" or (option.dynamic_only and not options.dynamic):
            continue
        if option.generates and options.generate not in option.generates:
            continue
        if option.name == "input_dtype" and not options.input_shapes:
            continue
        if not option.always and value == option.default:
            continue
        if option.kind in ("shapes", "globs"):
            for item in value:
                args += [option.cli_flag, _shape_text(item)]
        elif option.kind in ("widths", "shape"):
            args += [option.cli_flag, _widths(value)]
        elif option.kind == "path":
            args += [option.cli_flag, relative(value)]
        else:
            args += [option.cli_flag, str(value)]
    return args


def header_options(options: Any, resolved: dict[str, Any]) -> tuple[str, str]:
    """The provenance header's two ``options:`` lines (``resolved``: values the layout decided,
    such as ``num_embeddings``, that override the options')."""
    lines: dict[int, list[tuple[int, str]]] = {1: [], 2: []}
    for option in OPTIONS:
        if option.header is None or (option.dynamic_only and not options.dynamic):
            continue
        value = resolved.get(option.name, getattr(options, option.name))
        text = _widths(value) if option.kind in ("widths", "shape") else str(value)
        lines[option.header[0]].append((option.header[1], f"{option.name}={text}"))
    return " ".join(t for _, t in sorted(lines[1])), " ".join(t for _, t in sorted(lines[2]))


def context_options(options: Any, resolved: dict[str, Any]) -> dict[str, Any]:
    """``ctx.options``: every option the header shows, by field name (``resolved`` as in
    :func:`header_options`; widths and shapes as tuples)."""
    out: dict[str, Any] = {}
    for option in OPTIONS:
        if option.header is not None:
            value = resolved.get(option.name, getattr(options, option.name))
            widths = option.kind in ("widths", "shape") and value is not None
            out[option.name] = tuple(value) if widths else value
    return out


# -- checks ---------------------------------------------------------------------------------------


def check_options(options: Any) -> None:
    """Refuse option values that cannot make a hypernetwork, naming the flag and the fix."""
    for option in OPTIONS:
        value = getattr(options, option.name)
        if option.kind == "choice" and value is not None and value not in option.choices:
            raise GenerationError(
                f"unknown {option.cli_flag} {value!r}; choose {', '.join(option.choices)}"
            )
        if option.kind == "int" and value is not None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise GenerationError(f"{option.cli_flag} must be an integer, got {value!r}")
            if value <= 0:
                raise GenerationError(f"{option.cli_flag} must be positive, got {value}")
        if option.kind in ("widths", "shape") and value is not None:
            check_hidden(value, option.cli_flag)
        if option.dynamic_only and not options.dynamic and value != option.default:
            raise GenerationError(
                f"{option.cli_flag} applies to dynamic mode only; add --mode dynamic"
            )
        if (
            option.generates
            and options.generate not in option.generates
            and value != option.default
        ):
            what = " or ".join(option.generates)
            raise GenerationError(
                f"{option.cli_flag} applies to --generate {what} only; add --generate "
                f"{option.generates[-1]}"
            )
        if option.kind == "float" and value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise GenerationError(f"{option.cli_flag} must be a number, got {value!r}")
    check_adapter_options(options)
    exclusive: dict[str, list[Option]] = {}
    for option in OPTIONS:
        if option.exclusive and getattr(options, option.name) != option.default:
            exclusive.setdefault(option.exclusive, []).append(option)
    for given in exclusive.values():
        if len(given) > 1:
            flags = " and ".join(o.cli_flag for o in given)
            raise GenerationError(
                f"{flags} both set the chunk size and exclude each other; give only one"
            )


#: options of the chunked flat generator, which --generate lora does not use
FLAT_ONLY = ("num_embeddings", "chunk_dim", "chunking", "init_scheme")


def check_adapter_options(options: Any) -> None:
    """The --generate delta/lora values and combinations (one line naming the flag and the fix)."""
    if options.lora_alpha is not None and not options.lora_alpha > 0:
        raise GenerationError(f"--lora-alpha must be positive, got {options.lora_alpha}")
    if not 0.0 <= options.lora_dropout < 1.0:
        raise GenerationError(f"--lora-dropout must lie in [0, 1), got {options.lora_dropout}")
    if options.generate == "lora":
        for name in FLAT_ONLY:
            if getattr(options, name) != BY_NAME[name].default:
                raise GenerationError(
                    f"{BY_NAME[name].cli_flag} sizes the chunked weight generator, which "
                    "--generate lora does not use; drop it (size the adapters with --lora-rank)"
                )


def check_sizes(options: Any, flat_size: int, num_embeddings: int, chunk_dim: int) -> None:
    """After the layout is known: refuse a hypernetwork far larger than its target, or one whose
    output is mostly padding, with the numbers and the fix."""
    padded = num_embeddings * chunk_dim
    embeddings = num_embeddings * options.embedding_dim
    generator = (options.embedding_dim + 1) * chunk_dim
    total = embeddings + generator
    padding = padded - flat_size
    if padding > MAX_PADDING_FRACTION * padded and padding > MIN_PADDING_REFUSED:
        raise GenerationError(
            f"{num_embeddings:,} chunks of {chunk_dim:,} values make {padded:,} outputs for "
            f"{flat_size:,} generated values, mostly padding; use a smaller --num-embeddings or "
            "--chunk-dim"
        )
    if total > MAX_SIZE_RATIO * max(flat_size, 1):
        raise GenerationError(
            f"the hypernetwork would have {total:,} parameters ({num_embeddings:,} embeddings x "
            f"--embedding-dim {options.embedding_dim}, a {options.embedding_dim} -> {chunk_dim:,} "
            f"generator) for a target of {flat_size:,} generated values, over {MAX_SIZE_RATIO}x; "
            "use a smaller --embedding-dim, --num-embeddings or --chunk-dim"
        )
