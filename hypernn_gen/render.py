"""Render a hypernetwork module from the Jinja templates in ``templates/``.

Templates receive exactly one object, ``ctx`` (a :class:`TemplateContext`), whose fields are the
documented, versioned template API (``hypernn-gen templates list`` prints it). A breaking change
to those fields bumps :data:`CONTEXT_VERSION`.

Template lookup, first match wins:

1. the user's ``--template-dir`` (a file there with a built-in's name replaces it; it may start
   with ``{% extends "builtin/torch/hypernetwork.py.jinja" %}`` and override single blocks);
2. the built-in templates, also reachable under the ``builtin/`` prefix.

The environment uses ``StrictUndefined``: a template that reads a name the context lacks fails
with the template's file and line instead of rendering an empty string.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from .errors import GenerationError
from .extract import KERNEL_BEGIN, KERNEL_END
from .layout import Chunking, Layout

__all__ = [
    "CONTEXT_VERSION",
    "Names",
    "ParamView",
    "TemplateContext",
    "builtin_templates_dir",
    "make_environment",
    "own_blocks",
    "render",
    "template_name",
]

#: Version of the template context. Bump on any breaking change to :class:`TemplateContext`.
CONTEXT_VERSION = 3


def builtin_templates_dir() -> Path:
    """The built-in templates: inside the package when installed from a wheel, else the repo's."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "templates", here.parent / "templates"):
        if candidate.is_dir():
            return candidate
    raise GenerationError(
        "the built-in templates are missing from this installation; reinstall hypernn-gen"
    )


def template_name(framework: str) -> str:
    """The entry template for a framework (``torch``, ``linen`` or ``nnx``)."""
    from .backends import framework_backend

    return framework_backend(framework).template


@dataclass(frozen=True)
class Names:
    """Identifiers in the generated file (all derived from the target's name)."""

    prefix: str  #: e.g. ``SeedMlp``
    embedding: str  #: e.g. ``SeedMlpEmbedding``
    weight_generator: str  #: e.g. ``SeedMlpWeightGenerator``
    hypernetwork: str  #: e.g. ``SeedMlpHyperNetwork``
    target_factory: str  #: Python expression that builds a fresh target, e.g. ``make_target()``


@dataclass(frozen=True)
class ParamView:
    """One generated tensor as templates see it."""

    path: str
    keys: tuple[str | int, ...]
    shape: tuple[int, ...]
    offset: int
    size: int
    init_mean: float
    init_std: float
    init_source: str
    aliases: tuple[str, ...]
    dtype: str = "float32"  #: NumPy-style name, as the target declares it


@dataclass(frozen=True)
class StateView:
    """One state tensor (buffer, frozen parameter, non-``params`` collection)."""

    path: str
    shape: tuple[int, ...]
    collection: str
    reason: str
    keys: tuple[
        str | int, ...
    ] = ()  #: the path into the target's tree (Flax: below the collection)
    dtype: str = "float32"


@dataclass(frozen=True)
class TemplateContext:
    """Everything a template may use. Field names are the template API (see ``CONTEXT_VERSION``)."""

    context_version: int
    generator_version: str
    framework: str  #: ``torch``, ``linen`` or ``nnx``
    mode: str  #: ``static`` or ``dynamic``
    names: Names
    layout: Layout
    params: tuple[ParamView, ...]
    state: tuple[StateView, ...]
    chunking: Chunking
    embedding_dim: int
    condition_shape: tuple[int, ...] | None  #: one sample's conditioning input (dynamic)
    embedding_hidden: tuple[int, ...]  #: hidden widths of the dynamic embedding network
    generator_hidden: tuple[int, ...]  #: hidden widths of the weight generator (``()``: linear)
    condition_dtype: str | None  #: dtype of the conditioning input (dynamic)
    example_inputs: tuple[tuple[tuple[int, ...], str], ...]  #: (shape, dtype) per input
    target_imports: tuple[str, ...]  #: import lines the copied target code needs
    target_source: str  #: the copied target definition(s)
    target_file: str  #: the target file, relative, as given
    header: tuple[str, ...]  #: provenance comment lines (without ``# ``)
    fusion: Any = None  #: dynamic Torch: a :class:`hypernn_gen.fuse.FusionPlan`, else ``None``
    #: static Torch (linear generator), static Linen/NNX with rank-D layers: the forward builds
    #: no flat vector unless ``return_params``
    static_fast: bool = False
    #: static Torch fast path: the template writes its own embedding block (its output is the table)
    own_embedding: bool = False
    #: static Torch/Linen/NNX: ``(module path, weight index)`` of the layers computed at rank D
    low_rank: tuple[tuple[str, int], ...] = ()
    #: static Linen/NNX: the ``LOW_RANK`` rows, ``(module keys, kernel index, bias index, 1)``
    low_rank_layers: tuple[tuple[Any, ...], ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    # -- decisions, computed once in Python (context version 3) --
    dynamic: bool = False  #: ``mode == "dynamic"``
    fused: bool = False  #: dynamic, linear generator, layers to fuse: the fused per-sample path
    padded: bool = False  #: the flat vector has padding between tensors (chunking="tensor")
    own_condition: bool = False  #: dynamic: a conditioning input other than the first input
    fused_kinds: tuple[str, ...] = ()  #: kinds of the fused layers, in order, without repeats
    indexed: bool = False  #: some fused Linear/Conv layer needs index buffers
    fused_forwards: tuple[tuple[str, str], ...] = ()  #: (kind, kernel forward function)
    tied: tuple[tuple[str, str], ...] = ()  #: (further name, generated name) of tied tensors
    excluded: tuple[str, ...] = ()  #: trainable tensors not generated (--include/--exclude)
    collections: tuple[str, ...] = ()  #: Flax: the target's collections besides ``params``
    #: ``--gradient-scaling on``: the gradient multipliers of the embedding table, the generator's
    #: weight and bias (:func:`hypernn_gen.design.gradient_multipliers`); ``None``: off
    gradient_scale: tuple[float, float, float] | None = None
    #: dynamic Torch with a BatchNorm: ``--batch-norm-stats`` (``batch`` or ``sample``), else None
    batch_norm_stats: str | None = None
    imports: tuple[str, ...] = ()  #: the file's own import lines (specialised part and kernel)
    kernel_imports: tuple[str, ...] = ()  #: the import lines the kernel section needs
    kernel_source: str = ""  #: the kernel section: hypernn_gen/kernel definitions, verbatim
    kernel_names: tuple[str, ...] = ()  #: names the kernel section defines
    checkpoint_digest: str = ""  #: saved in every state (``layout.checkpoint_digest``)
    # -- adapters (--generate delta/lora, context version 3) --
    generate: str = "weights"  #: ``weights``, ``delta`` (base + generated delta) or ``lora``
    delta: bool = False  #: ``generate == "delta"``: the ``base`` buffer, a zeroed generator output
    adapters: tuple = ()  #: lora: the adapted layers (``hypernn_gen.kernel.lora_torch.Adapter``)
    lora: dict[str, Any] = field(default_factory=dict)  #: lora: rank, alpha, dropout, shared
    base_checkpoint: str | None = None  #: delta/lora: the --base checkpoint (relative), or None
    kernel_begin: str = KERNEL_BEGIN  #: the kernel section's first line
    kernel_end: str = KERNEL_END  #: the kernel section's last line
    #: Torch ``__main__``: the example call's positional and keyword arguments as Python
    #: expressions (tensors as ``torch.randn``/``torch.zeros`` of their shape and dtype)
    example_args: tuple[str, ...] = ()
    example_kwargs: tuple[tuple[str, str], ...] = ()
    #: Flax ``__main__``: the expression giving the target file's example call ``(args, kwargs)``
    #: (``example_call`` or ``example_call()``, copied with the target), else ``None``
    example_call: str | None = None
    #: Flax dynamic mode: how BatchNorm in training mode normalises the samples (``batch`` or
    #: ``sample``, ``--batch-norm-stats``)
    batch_norm_stats: str = "batch"

    @property
    def condition_dim(self) -> int | None:
        return math.prod(self.condition_shape) if self.condition_shape is not None else None


def _py(value: Any) -> str:
    """A deterministic Python literal for numbers, strings and tuples."""
    if isinstance(value, float):
        return repr(value) if value else "0.0"
    if isinstance(value, tuple):
        inner = ", ".join(_py(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return repr(value)


def _int(value: int) -> str:
    """An int literal with ``_`` thousands separators (black keeps them)."""
    return f"{value:_}"


def make_environment(template_dir: Path | None = None) -> jinja2.Environment:
    builtin = jinja2.FileSystemLoader(str(builtin_templates_dir()))
    loaders: list[jinja2.BaseLoader] = []
    if template_dir is not None:
        if not template_dir.is_dir():
            raise GenerationError(
                f"--template-dir {template_dir} is not a directory; create it, e.g. with "
                f"`hypernn-gen templates export {template_dir}`"
            )
        builtins = {
            p.relative_to(builtin.searchpath[0]).as_posix()
            for p in Path(builtin.searchpath[0]).rglob("*.jinja")
        }
        for user in sorted(template_dir.rglob("*.jinja")):
            name = user.relative_to(template_dir).as_posix()
            if name not in builtins and not user.name.startswith("_"):
                raise GenerationError(
                    f"{user}:1: user template {name!r} matches no built-in template, so it would "
                    f"never be used; name it after one of: {', '.join(sorted(builtins))} "
                    "(files starting with '_' are partials and may have any name)"
                )
        loaders.append(jinja2.FileSystemLoader(str(template_dir)))
    loaders += [jinja2.PrefixLoader({"builtin": builtin}), builtin]
    env = jinja2.Environment(
        loader=jinja2.ChoiceLoader(loaders),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["py"] = _py
    env.filters["int"] = _int
    env.filters["count"] = "{:,}".format
    return env


def own_blocks(framework: str, template_dir: Path | None) -> frozenset[str]:
    """The blocks that ``template_dir``'s entry template for ``framework`` writes itself (none
    without one): a fast path that reads the built-in classes' internals is taken only where
    the template keeps them."""
    if template_dir is None or not (template_dir / template_name(framework)).is_file():
        return frozenset()
    try:
        return frozenset(
            make_environment(template_dir).get_template(template_name(framework)).blocks
        )
    except (jinja2.TemplateError, UnicodeDecodeError, OSError):  # render() reports it
        return frozenset()


def render(ctx: TemplateContext, *, template_dir: Path | None = None) -> str:
    """Render the entry template for ``ctx.framework``; errors name the template file and line."""
    env = make_environment(template_dir)
    name = (
        f"{ctx.framework}/lora.py.jinja" if ctx.generate == "lora" else template_name(ctx.framework)
    )
    try:
        return env.get_template(name).render(ctx=ctx)
    except jinja2.TemplateSyntaxError as exc:
        where = f"{exc.filename or exc.name}:{exc.lineno}"
        raise GenerationError(f"{where}: template syntax error: {exc.message}") from exc
    except jinja2.UndefinedError as exc:
        raise GenerationError(
            f"{_template_frame(exc) or name}: {exc.message}; the template context has no such "
            "name (see `hypernn-gen templates list`)"
        ) from exc
    except jinja2.TemplateNotFound as exc:
        raise GenerationError(
            f"template {exc.name!r} not found; built-in names are listed by "
            "`hypernn-gen templates list`"
        ) from exc
    except UnicodeDecodeError as exc:
        where = template_dir if template_dir is not None else name
        raise GenerationError(
            f"a template in {where} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
            "save the template as UTF-8"
        ) from exc
    except Exception as exc:  # a template that raises while rendering: name its file and line
        first = (str(exc).strip().splitlines() or [""])[0]
        raise GenerationError(
            f"{_template_frame(exc) or name}: rendering raised {type(exc).__name__}: {first}; "
            "fix that template (or drop it from --template-dir to use the built-in)"
        ) from exc


def _template_frame(exc: BaseException) -> str | None:
    """``file:line`` of the innermost template frame in a Jinja traceback."""
    tb, where = exc.__traceback__, None
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename.endswith(".jinja"):
            where = f"{filename}:{tb.tb_lineno}"
        tb = tb.tb_next
    return where
