"""The generator pipeline: load -> trace -> render -> check/format -> (write).

:func:`generate` turns :class:`GenerateOptions` into the final text of one generated file; the
CLI decides whether to write it (:mod:`hypernn_gen.write`), diff it or check it.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path

from ._version import __version__
from .design import CHUNKINGS, INIT_SCHEMES, check_hidden, design_layout
from .errors import GenerationError
from .extract import extract_target_source, kernel_source
from .fuse import FusionPlan, plan_torch_fusion, probe_batch_flow
from .fuse_flax import plan_linen_fusion, plan_nnx_fusion
from .layout import Chunking, Layout
from .load import INPUT_DTYPES, LoadedTarget, load_target
from .render import (
    CONTEXT_VERSION,
    Names,
    ParamView,
    StateView,
    TemplateContext,
    render,
    template_name,
)
from .trace import trace_selected
from .verify import check_source, dedupe_imports, format_source
from .write import seal

__all__ = ["GenerateOptions", "Generated", "generate", "plan_fusion"]

BACKENDS = ("torch", "flax")
MODES = ("static", "dynamic")
DEFAULT_EMBEDDING_HIDDEN = (64,)  #: hidden widths of the dynamic embedding network
#: names the generated files define; copied target code must not use them at module level
RESERVED_NAMES = frozenset(
    {
        "GENERATED",
        "ParamSlice",
        "EMBEDDING_DIM",
        "NUM_EMBEDDINGS",
        "CHUNK_DIM",
        "FLAT_SIZE",
        "LAYOUT_DIGEST",
        "CONDITION_SHAPE",
        "EMBEDDING_HIDDEN",
        "GENERATOR_HIDDEN",
        "check_layout",
        "without_generated",
        "TIED",
        "EXCLUDED",
        # dynamic torch: the fused per-sample path
        "FusedLayer",
        "FUSED",
        "PER_SAMPLE",
        "Shared",
        "FusedIndex",
        "fused_forward",
        "per_sample_forward",
        "install_fusion",
        "run_per_sample",
        "FORWARDS",
        "affine",
        "batch_norm_forward",
        "layer_norm_forward",
        "embedding_forward",
        "GROUPED_CONV_LIMIT",
        "grouped_conv",
    }
)
#: names only the Flax templates (linen, nnx) define; reserved for Flax targets
FLAX_RESERVED_NAMES = frozenset(
    {
        "STATE_COLLECTIONS",
        "GeneratedSlot",
        "scaled_lecun_normal",
        "unflatten_params",
        "flatten_params",
        "merge_params",
        "excluded_params",
        "as_params",
        "check_flat",
        "is_array",
        "check_batch",
        "per_sample",
        "merge_samples",
        "squeeze_sample",
        "concat_flat",
        "unflatten",  # the Flax kernel (hypernn_gen/kernel/flax.py)
        "decode",
        # dynamic flax: the fused per-sample path
        "FUSED_KEYS",
        "FUSION",
        "kernel_rows",
        "fused_indices",
        "conv_patches",
        "fused_output",
        "fused_apply",
        "fused_layers",
        "FusedLinear",
        "FusedConv",
        # the weight generator's optional model_axis split
        "model_mesh",
        "split_chunks",
    }
)


@dataclass(frozen=True)
class GenerateOptions:
    """Everything that determines a generated file (the CLI flags, or one pyproject job)."""

    target: str
    backend: str | None = None  #: ``None``: the target's own framework decides
    mode: str = "static"
    output: str | None = None
    embedding_dim: int = 32
    num_embeddings: int | None = None
    chunk_dim: int | None = None
    chunking: str = "flat"  #: ``flat`` (hyper-nn's) or ``tensor`` (each tensor from a chunk start)
    generator_hidden: tuple[int, ...] = ()  #: hidden layer widths of the weight generator
    init_scheme: str = "target"  #: ``target``, ``hyperfan-in`` or ``hyperfan-out``
    condition_shape: tuple[int, ...] | None = None  #: dynamic: one sample's condition shape
    condition_dtype: str | None = None  #: dynamic: the condition's dtype (default: the input's)
    embedding_hidden: tuple[int, ...] = DEFAULT_EMBEDDING_HIDDEN  #: dynamic: the embedding network
    input_shapes: tuple[tuple[int, ...], ...] = ()
    input_dtype: str = "float32"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    template_dir: str | None = None
    formatter: str = "black"
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Generated:
    path: Path
    text: str
    layout: Layout
    loaded: LoadedTarget


def default_output(options: GenerateOptions, loaded: LoadedTarget) -> str:
    """``<target stem>_<framework>_<mode>.py`` next to where the user runs the tool."""
    stem = Path(loaded.path).stem
    return f"{stem}_{loaded.framework}_{options.mode}.py"


def resolve_output(options: GenerateOptions, loaded: LoadedTarget) -> Path:
    """``-o`` may name a file or an existing directory (or end with ``/``)."""
    if options.output is None:
        return Path(default_output(options, loaded))
    out = Path(options.output)
    if out.is_dir() or options.output.endswith(("/", os.sep)):
        return out / default_output(options, loaded)
    return out


def generate(options: GenerateOptions) -> Generated:
    """Run the pipeline for one file and return its final (formatted, sealed) text."""
    if options.backend is not None and options.backend not in BACKENDS:
        raise GenerationError(f"unknown backend {options.backend!r}; choose torch or flax")
    if options.mode not in MODES:
        raise GenerationError(f"unknown mode {options.mode!r}; choose static or dynamic")
    if options.embedding_dim <= 0:
        raise GenerationError(f"--embedding-dim must be positive, got {options.embedding_dim}")
    check_options(options)

    loaded = load_target(
        options.target,
        input_shapes=list(options.input_shapes) or None,
        input_dtype=options.input_dtype,
    )
    backend = "torch" if loaded.framework == "torch" else "flax"
    if options.backend is None:
        options = replace(options, backend=backend)
    elif backend != options.backend:
        raise GenerationError(
            f"{loaded.display} is a {loaded.framework} target but --backend {options.backend} was "
            f"given; use --backend {backend}"
        )
    layout = trace_selected(loaded, include=options.include, exclude=options.exclude)
    layout, chunking = design_layout(
        layout,
        num_embeddings=options.num_embeddings,
        chunk_dim=options.chunk_dim,
        chunking=options.chunking,
        init_scheme=options.init_scheme,
    )
    path = resolve_output(options, loaded)
    ctx = build_context(options, loaded, layout, chunking, path)
    template_dir = Path(options.template_dir) if options.template_dir else None
    source = render(ctx, template_dir=template_dir)
    module = dedupe_imports(check_source(source, template=template_name(loaded.framework)))
    text = seal(format_source(module.code, formatter=options.formatter))
    return Generated(path, text, layout, loaded)


# -- context --------------------------------------------------------------------------------


def class_prefix(loaded: LoadedTarget) -> str:
    """``SmallCNN`` for a class, ``SeedMlp`` for ``seed_mlp.py:make_target``."""
    generic = {"Sequential", "ModuleList", "ModuleDict"}
    if loaded.kind == "class":
        return loaded.obj.__name__
    if loaded.kind == "instance" and type(loaded.obj).__name__ not in generic:
        return type(loaded.obj).__name__
    name = loaded.name
    if name in ("target", "make_target", "model", "make_model"):
        name = Path(loaded.path).stem
    name = re.sub(r"^(make|build|create|get)_", "", name)
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[^0-9a-zA-Z]+", name) if part)


def factory_expression(loaded: LoadedTarget) -> str:
    if loaded.kind == "instance":
        return f"copy.deepcopy({loaded.name})"
    return f"{loaded.name}()"


def _relative(path: str | Path) -> str:
    p = Path(path)
    if p.is_absolute():
        try:
            return Path(os.path.relpath(p)).as_posix()
        except ValueError:
            return p.name
    return p.as_posix()


def command_line(options: GenerateOptions, loaded: LoadedTarget, path: Path) -> str:
    """The exact command that regenerates this file (relative paths, explicit options)."""
    file_part, _, name = options.target.partition(":")
    spec = _relative(file_part) + (f":{name}" if name else "")
    args = ["hypernn-gen", spec, "--backend", options.backend, "--mode", options.mode]
    args += ["--embedding-dim", str(options.embedding_dim)]
    if options.num_embeddings is not None:
        args += ["--num-embeddings", str(options.num_embeddings)]
    if options.chunk_dim is not None:
        args += ["--chunk-dim", str(options.chunk_dim)]
    if options.chunking != "flat":
        args += ["--chunking", options.chunking]
    if options.generator_hidden:
        args += ["--generator-hidden", _widths(options.generator_hidden)]
    if options.init_scheme != "target":
        args += ["--init-scheme", options.init_scheme]
    if options.mode == "dynamic":
        if options.condition_shape is not None:
            args += ["--condition-shape", _widths(options.condition_shape)]
        if options.condition_dtype is not None:
            args += ["--condition-dtype", options.condition_dtype]
        if tuple(options.embedding_hidden) != DEFAULT_EMBEDDING_HIDDEN:
            args += ["--embedding-hidden", _widths(options.embedding_hidden)]
    for shape in options.input_shapes:
        args += ["--input-shape", ",".join(map(str, shape))]
    if options.input_shapes and options.input_dtype != "float32":
        args += ["--input-dtype", options.input_dtype]
    for pattern in options.include:
        args += ["--include", pattern]
    for pattern in options.exclude:
        args += ["--exclude", pattern]
    if options.template_dir:
        args += ["--template-dir", _relative(options.template_dir)]
    if options.formatter != "black":
        args += ["--formatter", options.formatter]
    args += ["-o", _relative(path)]
    return shlex.join(args)


def build_context(
    options: GenerateOptions,
    loaded: LoadedTarget,
    layout: Layout,
    chunking: Chunking,
    path: Path,
) -> TemplateContext:
    prefix = class_prefix(loaded)
    names = Names(
        prefix=prefix,
        embedding=f"{prefix}Embedding",
        weight_generator=f"{prefix}WeightGenerator",
        hypernetwork=f"{prefix}HyperNetwork",
        target_factory=factory_expression(loaded),
    )
    source = extract_target_source(Path(loaded.path), [loaded.name])
    clash = sorted(
        source.names
        & (
            RESERVED_NAMES
            | (FLAX_RESERVED_NAMES if loaded.framework != "torch" else frozenset())
            | {names.embedding, names.weight_generator, names.hypernetwork}
        )
    )
    if clash:
        raise GenerationError(
            f"{loaded.display} defines {clash[0]!r}, a name the generated file needs for itself; "
            "rename it in the target file"
        )
    condition_shape, condition_dtype = None, None
    if options.mode == "dynamic":
        if options.condition_shape is not None:
            condition_shape = tuple(options.condition_shape)
        elif loaded.input_specs:
            condition_shape = tuple(loaded.input_specs[0].shape[1:])
        else:
            raise GenerationError(
                f"dynamic mode needs the shape of the conditioning input; pass --input-shape "
                f"(e.g. --input-shape 1,8), --condition-shape, or define example_input in "
                f"{loaded.display}"
            )
        condition_dtype = options.condition_dtype or (
            loaded.input_specs[0].dtype if loaded.input_specs else "float32"
        )
    params = tuple(
        ParamView(
            path=t.path,
            keys=t.keys,
            shape=t.shape,
            offset=t.offset,
            size=t.size,
            init_mean=t.init_mean,
            init_std=t.init_std,
            init_source=t.init_source,
            aliases=tuple(".".join(map(str, a)) for a in t.aliases),
            dtype=t.dtype,
        )
        for t in layout.generated
    )
    state = tuple(
        StateView(t.path, t.shape, t.collection, t.reason, t.keys, t.dtype) for t in layout.state
    )
    command = command_line(options, loaded, path)
    fusion = None
    if options.mode == "dynamic":
        fusion = plan_fusion(
            loaded, layout, chunking, linear_generator=not options.generator_hidden
        )
    header = (
        f"Generated by hypernn-gen {__version__}: a {options.mode} hypernetwork for {prefix}.",
        "Do not edit by hand: change the options or templates, then run the command below.",
        "",
        f"target:   {_relative(loaded.path)}:{loaded.name} ({loaded.framework}, {loaded.kind})",
        f"options:  backend={options.backend} mode={options.mode} "
        f"embedding_dim={options.embedding_dim} num_embeddings={chunking.num_embeddings} "
        f"chunk_dim={chunking.chunk_dim}",
        f"          chunking={options.chunking} init_scheme={options.init_scheme} "
        f"generator_hidden={_widths(options.generator_hidden)}"
        + (
            f" embedding_hidden={_widths(options.embedding_hidden)}"
            f" condition_shape={_widths(condition_shape)}"
            if options.mode == "dynamic"
            else ""
        ),
        f"layout:   {len(params)} generated tensors, {layout.num_generated:,} values, "
        f"{len(state)} state tensors, digest {layout.digest()}",
        *(f"note:     {note}" for note in layout.notes),
        *([f"fusion:   {fusion.summary()}"] if fusion is not None else []),
        f"command:  {command}",
    )
    kernel = None
    if loaded.framework != "torch":
        kernel = kernel_source("flax", flax_kernel_roots(options.mode == "dynamic"))
    return TemplateContext(
        **(
            {"kernel_imports": kernel.imports, "kernel_source": kernel.body}
            if kernel is not None
            else {}
        ),
        context_version=CONTEXT_VERSION,
        generator_version=__version__,
        framework=loaded.framework,
        mode=options.mode,
        names=names,
        layout=layout,
        params=params,
        state=state,
        chunking=chunking,
        embedding_dim=options.embedding_dim,
        condition_shape=condition_shape,
        embedding_hidden=tuple(options.embedding_hidden),
        generator_hidden=tuple(options.generator_hidden),
        condition_dtype=condition_dtype,
        example_inputs=tuple((tuple(s.shape), s.dtype) for s in loaded.input_specs),
        target_imports=source.imports,
        target_source=source.body,
        target_file=_relative(loaded.path),
        header=header,
        fusion=fusion,
        options={
            "backend": options.backend,
            "mode": options.mode,
            "embedding_dim": options.embedding_dim,
            "num_embeddings": chunking.num_embeddings,
            "chunk_dim": chunking.chunk_dim,
            "chunking": options.chunking,
            "init_scheme": options.init_scheme,
            "generator_hidden": tuple(options.generator_hidden),
            "embedding_hidden": tuple(options.embedding_hidden),
        },
    )


def _widths(widths: tuple[int, ...] | None) -> str:
    return ",".join(map(str, widths)) if widths else "none"


def check_options(options: GenerateOptions) -> None:
    """Refuse option values that cannot make a hypernetwork, naming the flag and the fix."""
    if options.chunking not in CHUNKINGS:
        raise GenerationError(
            f"unknown --chunking {options.chunking!r}; choose {' or '.join(CHUNKINGS)}"
        )
    if options.init_scheme not in INIT_SCHEMES:
        raise GenerationError(
            f"unknown --init-scheme {options.init_scheme!r}; choose {', '.join(INIT_SCHEMES)}"
        )
    check_hidden(options.generator_hidden, "--generator-hidden")
    check_hidden(options.embedding_hidden, "--embedding-hidden")
    if options.mode != "dynamic":
        for flag, value, default in (
            ("--condition-shape", options.condition_shape, None),
            ("--condition-dtype", options.condition_dtype, None),
            ("--embedding-hidden", tuple(options.embedding_hidden), DEFAULT_EMBEDDING_HIDDEN),
        ):
            if value != default:
                raise GenerationError(f"{flag} applies to dynamic mode only; add --mode dynamic")
    if options.condition_shape is not None:
        check_hidden(options.condition_shape, "--condition-shape")
    if options.condition_dtype is not None and options.condition_dtype not in INPUT_DTYPES:
        raise GenerationError(
            f"unknown --condition-dtype {options.condition_dtype!r}; use one of "
            f"{', '.join(INPUT_DTYPES)}"
        )


def plan_fusion(
    loaded: LoadedTarget, layout: Layout, chunking: Chunking, *, linear_generator: bool = True
) -> FusionPlan:
    """What a generated dynamic file for ``loaded`` fuses (any backend; see ``fuse.py``)."""
    if loaded.framework == "torch":
        from .trace_torch import check_dynamic_support  # torch only when the target is torch

        module = _meta_module(loaded)
        check_dynamic_support(module, layout)  # raises where dynamic mode is impossible
        flow = None
        if loaded.input_specs:
            flow = probe_batch_flow(module, _torch_meta_inputs(loaded))
        return plan_torch_fusion(
            module, layout, chunking, linear_generator=linear_generator, flow=flow
        )
    if loaded.framework == "nnx":
        from flax import nnx

        module = loaded.obj if loaded.factory is None else nnx.eval_shape(loaded.factory)
        return plan_nnx_fusion(module, layout, chunking, linear_generator=linear_generator)
    from .trace import _jax_inputs

    module = loaded.obj if loaded.factory is None else loaded.factory()
    return plan_linen_fusion(
        module, _jax_inputs(loaded), layout, chunking, linear_generator=linear_generator
    )


def _torch_meta_inputs(loaded: LoadedTarget) -> tuple:
    """The example inputs as ``meta`` tensors (their first dimension is the batch)."""
    import torch

    return tuple(
        torch.empty(spec.shape, dtype=getattr(torch, spec.dtype), device="meta")
        for spec in loaded.input_specs
    )


def _meta_module(loaded: LoadedTarget):  # noqa: ANN202
    """The target's module structure, built on the meta device (no parameter memory)."""
    import torch

    if loaded.factory is None:
        return loaded.obj
    try:
        with torch.device("meta"):
            return loaded.factory()
    except Exception:  # noqa: BLE001 - the tracer already fell back to a real build too
        return loaded.factory()


def flax_kernel_roots(dynamic: bool) -> list[str]:
    """The ``hypernn_gen/kernel/flax.py`` definitions a Linen/NNX file of this mode calls."""
    roots = ["model_mesh", "split_chunks", "concat_flat", "decode", "unflatten", "check_flat"]
    if dynamic:
        roots += ["is_array", "check_batch", "per_sample", "merge_samples", "squeeze_sample"]
    return roots
