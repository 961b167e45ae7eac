"""The generator pipeline: load -> trace -> render -> check/format -> (write).

:func:`generate` turns :class:`GenerateOptions` into the final text of one generated file; the
CLI decides whether to write it (:mod:`hypernn_gen.write`), diff it or check it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ._version import __version__
from .adapters import (
    adapter_out,
    check_base,
    delta_layout,
    describe_base,
    linen_lora_adapters,
    lora_adapters,
    nnx_lora_adapters,
)
from .backends import backend_for, framework_backend
from .design import design_layout, layout_gradient_multipliers
from .errors import GenerationError
from .extract import TargetSource, extract_target_source, kernel_source
from .fuse import FusionPlan
from .layout import Chunking, Layout, checkpoint_digest
from .load import EXAMPLE_CALL, LoadedTarget, load_target, target_time_limit
from .options import (
    BACKENDS,
    DEFAULT_EMBEDDING_HIDDEN,
    MODES,
    GenerateOptions,
    check_options,
    check_sizes,
    command_args,
    context_options,
    header_options,
)
from .render import (
    CONTEXT_VERSION,
    Names,
    ParamView,
    StateView,
    TemplateContext,
    _py,
    render,
)
from .trace import trace_selected
from .verify import check_source, dedupe_imports, format_source, template_clashes
from .write import seal

__all__ = ["GenerateOptions", "Generated", "generate", "plan_fusion"]

#: kept for importers: the option schema (hypernn_gen.options) and backend table own these
__all__ += ["BACKENDS", "DEFAULT_EMBEDDING_HIDDEN", "MODES", "check_options", "command_line"]


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
        root = _ROOT.get()
        name = default_output(options, loaded)
        return Path(os.path.relpath(root / name)) if root is not None else Path(name)
    out = Path(options.output)
    if out.is_dir() or options.output.endswith(("/", os.sep)):
        return out / default_output(options, loaded)
    return out


def generate(options: GenerateOptions) -> Generated:
    """Run the pipeline for one file and return its final (formatted, sealed) text."""
    check_options(options)
    with target_time_limit(options.target):  # the target's code runs until tracing is done
        return _generate(options)


def _generate(options: GenerateOptions) -> Generated:
    loaded = load_target(
        options.target,
        input_shapes=list(options.input_shapes) or None,
        input_dtype=options.input_dtype,
    )
    backend = backend_for(loaded.framework, options.backend, loaded.display)
    if options.backend is None:
        options = replace(options, backend=backend.family)
    if options.base is not None:  # a missing or unreadable checkpoint is refused now
        check_base(options.base, loaded.framework)
    layout = trace_selected(loaded, include=options.include, exclude=options.exclude)
    layout, chunking = design_layout(
        layout,
        num_embeddings=options.num_embeddings,
        chunk_dim=options.chunk_dim,
        chunking=options.chunking,
        init_scheme=options.init_scheme,
    )
    if options.generate == "delta":
        layout = delta_layout(layout)
    if options.generate != "lora":
        check_sizes(options, layout.num_generated, chunking.num_embeddings, chunking.chunk_dim)
    path = resolve_output(options, loaded)
    ctx, source = build_context(options, loaded, layout, chunking, path, with_source=True)
    template_dir = Path(options.template_dir) if options.template_dir else None
    rendered = render(ctx, template_dir=template_dir)
    template = lora_template(loaded.framework) if lora(options) else backend.template
    module = dedupe_imports(check_source(rendered, template=template))
    clash = template_clashes(module, source.imports, source.body, source.names)
    if clash:
        raise GenerationError(
            f"{loaded.display} defines {clash[0]!r}, a name the generated file needs for itself; "
            "rename it in the target file"
        )
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
    prefix = "".join(
        part[:1].upper() + part[1:] for part in re.split(r"[^0-9a-zA-Z]+", name) if part
    )
    if not prefix[:1].isalpha():  # "2layer_mlp.py": a class name cannot start with a digit
        prefix = "Target" + prefix
    return prefix


def factory_expression(loaded: LoadedTarget) -> str:
    if loaded.kind == "instance":
        return f"copy.deepcopy({loaded.name})"
    return f"{loaded.name}()"


#: the folder that header paths are relative to: the pyproject's for configured jobs
_ROOT: contextvars.ContextVar[Path | None] = contextvars.ContextVar("root", default=None)


@contextlib.contextmanager
def paths_relative_to(root: str | Path | None) -> Iterator[None]:
    """Within the block, paths in the header (and a job's default output) are relative to ``root``.

    Configured jobs use the pyproject's folder, so ``--check`` gives the same answer from any
    subfolder.
    """
    token = _ROOT.set(Path(root).resolve() if root is not None else None)
    try:
        yield
    finally:
        _ROOT.reset(token)


def _relative(path: str | Path) -> str:
    p = Path(path)
    root = _ROOT.get()
    if root is not None:
        p = Path(os.path.abspath(p))
    if p.is_absolute():
        try:
            return Path(os.path.relpath(p, root)).as_posix()
        except ValueError:
            return p.name
    return p.as_posix()


def command_line(options: GenerateOptions, loaded: LoadedTarget, path: Path) -> str:
    """The exact command that regenerates this file (relative paths, explicit options)."""
    file_part, _, name = options.target.partition(":")
    spec = _relative(file_part) + (f":{name}" if name else "")
    args = ["hypernn-gen", spec, *command_args(options, _relative), "-o", _relative(path)]
    return shlex.join(args)


def build_context(
    options: GenerateOptions,
    loaded: LoadedTarget,
    layout: Layout,
    chunking: Chunking,
    path: Path,
    *,
    with_source: bool = False,
) -> TemplateContext | tuple[TemplateContext, TargetSource]:
    """The template context; ``with_source``: also the copied target code (for the clash check)."""
    prefix = class_prefix(loaded)
    names = Names(
        prefix=prefix,
        embedding=f"{prefix}Embedding",
        weight_generator=f"{prefix}WeightGenerator",
        hypernetwork=f"{prefix}HyperNetwork",
        target_factory=factory_expression(loaded),
    )
    package = loaded.source_module.__package__ or None  # set for a file imported in its package
    call = example_call_expression(loaded)
    roots = [loaded.name, *([EXAMPLE_CALL] if call else [])]
    source = extract_target_source(Path(loaded.path), roots, package=package)
    condition_shape, condition_dtype = None, None
    if options.dynamic:
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
    adapters = lora_layers(loaded, options) if lora(options) else ()
    fusion = None
    # Flax delta: the materialising path (base + delta per sample); Torch delta fuses (W x + D_b x)
    torch_delta = options.generate == "delta" and loaded.framework == "torch"
    # the fused path reads the built-in embedding's and generator's parameters directly
    fusible = options.generate == "weights" or torch_delta
    own = own_classes(options, loaded)
    if options.dynamic and fusible and not own:
        fusion = plan_fusion(
            loaded, layout, chunking, linear_generator=not options.generator_hidden
        )
    low_rank = (
        plan_static(loaded, layout, chunking, options) if fast_static(options, loaded) else ()
    )
    resolved = {
        "num_embeddings": chunking.num_embeddings,
        "chunk_dim": chunking.chunk_dim,
        "condition_shape": condition_shape,
    }
    option_lines = header_options(options, resolved)
    if lora(options):
        option_lines = lora_option_lines(options, condition_shape)
        layer = "Linear" if loaded.framework == "torch" else "Dense"
        what = f"layout:   {len(adapters)} LoRA-adapted {layer} layers, " + (
            f"{lora_values(adapters, options.lora_rank):,} adapter values per set"
        )
    else:
        what = (
            f"layout:   {len(params)} generated tensors, {layout.num_generated:,} values, "
            f"{len(state)} state tensors, digest {layout.digest()}"
        )
    adapter_lines = ()
    if options.generate != "weights":
        how = {
            "delta": "each generated tensor is its frozen base plus a delta that starts at 0",
            "lora": "LoRA adapters on the frozen target, B starts at 0",
        }[options.generate]
        adapter_lines = (
            f"generate: {options.generate} ({how})",
            f"base:     {describe_base(_relative(options.base) if options.base else None, names.target_factory)}",
        )
    header = (
        f"Generated by hypernn-gen {__version__}: a {options.mode} hypernetwork for {prefix}.",
        "Do not edit by hand: change the options or templates, then run the command below.",
        "",
        f"target:   {_relative(loaded.path)}:{loaded.name} ({loaded.framework}, {loaded.kind})",
        f"options:  {option_lines[0]}",
        f"          {option_lines[1]}",
        *adapter_lines,
        what,
        *(f"note:     {note}" for note in layout.notes if not lora(options)),
        *([f"fusion:   {fusion.summary()}"] if fusion is not None else []),
        *(
            [f"fusion:   none (the template writes its own {' and '.join(sorted(own))} class)"]
            if options.dynamic and fusible and own
            else []
        ),
        *([f"rank-D:   {', '.join(path for path, _ in low_rank)}"] if low_rank else []),
        f"command:  {command}",
    )
    if lora(options):
        decisions = lora_decisions(options, loaded)
    else:
        decisions = torch_decisions(
            options,
            loaded,
            layout,
            params,
            state,
            fusion,
            condition_shape,
            condition_dtype,
            low_rank=low_rank,
        )
    ctx = TemplateContext(
        **decisions,
        context_version=CONTEXT_VERSION,
        checkpoint_digest=checkpoint_digest(layout, chunking, options.mode, options.embedding_dim),
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
        generate=options.generate,
        adapters=adapters,
        lora={
            "rank": options.lora_rank,
            "alpha": float(options.lora_alpha or options.lora_rank),
            "dropout": float(options.lora_dropout),
            "shared": options.lora_generator == "shared",
        },
        base_checkpoint=_relative(options.base) if options.base else None,
        gradient_scale=layout_gradient_multipliers(
            layout, chunking, options.embedding_dim, options.gradient_scaling
        ),
        options=context_options(options, resolved),
    )
    return (ctx, source) if with_source else ctx


def lora(options: GenerateOptions) -> bool:
    return options.generate == "lora"


def lora_filter(options: GenerateOptions) -> Any:
    """The --include/--exclude predicate on parameter paths (``None``: the default layers)."""
    from .select import path_filter

    return path_filter(options.include, options.exclude)


def lora_values(adapters: tuple, rank: int) -> int:
    """Values of one adapter set: ``rank * (in + out)`` per layer."""
    return sum(rank * (a.in_features + adapter_out(a)) for a in adapters)


def lora_template(framework: str) -> str:
    """The built-in template of a --generate lora file: ``<framework>/lora.py.jinja``."""
    return f"{framework}/lora.py.jinja"


def lora_layers(loaded: LoadedTarget, options: GenerateOptions) -> tuple:
    """The adapted layers of a --generate lora file, for any framework."""
    if loaded.framework == "torch":
        return lora_adapters(_meta_module(loaded), lora_filter(options))
    from .trace import _jax_inputs, jax_kwargs

    if loaded.framework == "linen":
        module = loaded.obj if loaded.factory is None else loaded.factory()
        return linen_lora_adapters(
            module, _jax_inputs(loaded), jax_kwargs(loaded), lora_filter(options)
        )
    from flax import nnx

    module = loaded.obj if loaded.factory is None else nnx.eval_shape(loaded.factory)
    return nnx_lora_adapters(module, lora_filter(options))


def lora_option_lines(
    options: GenerateOptions, condition_shape: tuple[int, ...] | None
) -> tuple[str, str]:
    """The header's two ``options:`` lines of a --generate lora file."""
    alpha = float(options.lora_alpha or options.lora_rank)
    first = (
        f"backend={options.backend} mode={options.mode} generate=lora "
        f"embedding_dim={options.embedding_dim} lora_rank={options.lora_rank} lora_alpha={alpha}"
    )
    second = (
        f"lora_dropout={float(options.lora_dropout)} lora_generator={options.lora_generator} "
        f"generator_hidden={_widths_text(options.generator_hidden)}"
    )
    if options.dynamic:
        second += (
            f" embedding_hidden={_widths_text(options.embedding_hidden)} "
            f"condition_shape={_widths_text(condition_shape)}"
        )
    return first, second


def _widths_text(widths: Any) -> str:
    return ",".join(map(str, widths)) if widths else "none"


#: a --generate lora file's kernel module, its roots and its own imports, per framework
_LORA_KERNELS = {
    "torch": (
        "lora_torch",
        ["Adapter", "LoRAHyperModule"],
        ["import torch", "from torch import Tensor, nn"],
    ),
    "linen": (
        "lora_linen",
        ["Adapter", "LinenLoRAHyperNetwork", "merge_adapters"],
        ["import dataclasses", "from typing import Any", "import flax.linen as nn", "import jax"],
    ),
    "nnx": (
        "lora_nnx",
        ["Adapter", "FrozenBase", "NNXLoRAHyperModule"],
        ["from typing import Any", "import jax", "import jax.numpy as jnp", "from flax import nnx"],
    ),
}


def lora_decisions(options: GenerateOptions, loaded: LoadedTarget) -> dict[str, Any]:
    """The decisions and kernel section of a --generate lora file."""
    module, roots, own = _LORA_KERNELS[loaded.framework]
    kernel = kernel_source(module, roots)
    own = list(own)
    if loaded.framework != "torch" and "copy.deepcopy(" in factory_expression(loaded):
        own.append("import copy")
    return {
        "dynamic": options.dynamic,
        "imports": merge_imports([*own, *kernel.imports]),
        "kernel_imports": kernel.imports,
        "kernel_source": kernel.body,
        "kernel_names": tuple(sorted(kernel.names)),
    }


def plan_fusion(
    loaded: LoadedTarget, layout: Layout, chunking: Chunking, *, linear_generator: bool = True
) -> FusionPlan:
    """What a generated dynamic file for ``loaded`` fuses (any backend; see ``fuse.py``)."""
    planner = framework_backend(loaded.framework, loaded.display).load("fusion_planner")
    return planner(loaded, layout, chunking, linear_generator=linear_generator)


def own_classes(options: GenerateOptions, loaded: LoadedTarget) -> frozenset[str]:
    """Which of the built-in ``embedding``/``weight_generator`` classes a ``--template-dir``
    writes itself: the fast paths read those classes' parameters directly (the table, the
    scales, the generator's ``linear``), so they are taken only where the template keeps them."""
    from .render import own_blocks

    template_dir = Path(options.template_dir) if options.template_dir else None
    return own_blocks(loaded.framework, template_dir) & {"embedding", "weight_generator"}


def fast_static(options: GenerateOptions, loaded: LoadedTarget) -> bool:
    """A static file whose forward builds no flat vector: the built-in linear weight generator
    (its ``linear`` is read directly, so a template that writes its own ``weight_generator``
    block keeps the flat vector). Torch (weights or delta) always; Linen and NNX (weights) where
    a Dense/Linear layer can be computed at rank D (:func:`plan_static`)."""
    generates = ("weights", "delta") if loaded.framework == "torch" else ("weights",)
    return (
        loaded.framework in ("torch", "linen", "nnx")
        and not options.dynamic
        and options.generate in generates
        and not options.generator_hidden
        and "weight_generator" not in own_classes(options, loaded)
    )


def plan_static(
    loaded: LoadedTarget, layout: Layout, chunking: Chunking, options: GenerateOptions
) -> tuple[tuple[str, int], ...]:
    """The Linear layers a static Torch file computes at rank D (``fuse.plan_low_rank``), the
    Dense/Linear layers a static Linen/NNX one does (those the dynamic planner fuses whose
    kernel rows fill chunks, ``kernel.flax.low_rank``); none without an example call."""
    from .fuse import plan_low_rank
    from .trace import torch_meta_call

    if not loaded.input_specs and loaded.example_inputs is None:
        return ()
    if loaded.framework in ("linen", "nnx"):
        from .kernel.flax import low_rank

        plan = plan_fusion(loaded, layout, chunking)
        return tuple(
            (f.path, f.weight)
            for f in plan.fused
            if f.kind == "dense"
            and f.weight is not None
            and low_rank(layout.generated[f.weight], chunking.chunk_dim, options.embedding_dim)
        )
    args, kwargs = torch_meta_call(loaded)
    module = _meta_module(loaded)
    return plan_low_rank(module, layout, chunking, options.embedding_dim, args, kwargs)


def _plan_torch(
    loaded: LoadedTarget, layout: Layout, chunking: Chunking, *, linear_generator: bool
) -> FusionPlan:
    from .fuse import plan_torch_fusion, probe_batch_flow
    from .trace import torch_meta_call
    from .trace_torch import check_dynamic_support  # torch only when the target is torch

    module = _meta_module(loaded)
    check_dynamic_support(module, layout)  # raises where dynamic mode is impossible
    real = loaded.obj if loaded.factory is None else loaded.factory  # where meta cannot branch
    if not loaded.input_specs:
        return plan_torch_fusion(module, layout, chunking, linear_generator=linear_generator)
    args, kwargs = torch_meta_call(loaded)
    flow = probe_batch_flow(module, args, kwargs, real=real)
    return plan_torch_fusion(module, layout, chunking, linear_generator=linear_generator, flow=flow)


def _plan_nnx(
    loaded: LoadedTarget, layout: Layout, chunking: Chunking, *, linear_generator: bool
) -> FusionPlan:
    from flax import nnx

    from .fuse_flax import plan_nnx_fusion

    module = loaded.obj if loaded.factory is None else nnx.eval_shape(loaded.factory)
    return plan_nnx_fusion(module, layout, chunking, linear_generator=linear_generator)


def _plan_linen(
    loaded: LoadedTarget, layout: Layout, chunking: Chunking, *, linear_generator: bool
) -> FusionPlan:
    from .fuse_flax import plan_linen_fusion
    from .trace import _jax_inputs, jax_kwargs

    module = loaded.obj if loaded.factory is None else loaded.factory()
    return plan_linen_fusion(
        module,
        _jax_inputs(loaded),
        layout,
        chunking,
        linear_generator=linear_generator,
        kwargs=jax_kwargs(loaded),
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


def _has_batch_norm(loaded: LoadedTarget) -> bool:
    """The target has a BatchNorm1d/2d/3d (exact types: the statistics option applies to it)."""
    from .kernel.torch import BATCH_NORMS

    return any(type(m) in BATCH_NORMS for m in _meta_module(loaded).modules())


#: What the Torch specialised part (layout, classes) imports itself, beside the kernel's needs.
_TORCH_IMPORTS = (
    "from typing import Any, NamedTuple",
    "import torch",
    "from torch import Tensor, nn",
)
_FUSED_FORWARD = {
    "linear": "fused_forward",
    "conv1d": "fused_forward",
    "conv2d": "fused_forward",
    "conv3d": "fused_forward",
    "conv_transpose1d": "conv_transpose_forward",
    "conv_transpose2d": "conv_transpose_forward",
    "transposed_linear": "transposed_linear_forward",
}


def torch_decisions(
    options: GenerateOptions,
    loaded: LoadedTarget,
    layout: Layout,
    params: tuple,
    state: tuple,
    fusion: Any,
    condition_shape: tuple[int, ...] | None,
    condition_dtype: str | None,
    *,
    low_rank: tuple[tuple[str, int], ...] = (),
) -> dict[str, Any]:
    """The template decisions (fused, padded, tied, ...) and, for Torch, the kernel section: the
    ``hypernn_gen/kernel/torch.py`` definitions this file's design uses; ``low_rank``: the
    Linear layers a static file computes at rank D (:func:`plan_static`)."""
    dynamic = options.dynamic
    specs = loaded.input_specs
    decisions: dict[str, Any] = {
        "dynamic": dynamic,
        "padded": layout.flat_size != layout.num_generated,
        "own_condition": bool(
            dynamic
            and specs
            and (condition_shape != tuple(specs[0].shape[1:]) or condition_dtype != specs[0].dtype)
        ),
        "tied": tuple((alias, p.path) for p in params for alias in p.aliases),
        "excluded": tuple(t.path for t in state if t.reason == "excluded"),
    }
    if loaded.framework != "torch":
        decisions.update(flax_decisions(options, loaded, state, fusion, params, low_rank))
        return decisions
    delta = options.generate == "delta"
    decisions["delta"] = delta
    fused = dynamic and not options.generator_hidden and fusion is not None
    kinds = tuple(dict.fromkeys(f.kind for f in fusion.fused)) if fused else ()
    forwards = tuple((k, _FUSED_FORWARD.get(k, f"{k}_forward")) for k in kinds)
    roots = ["check_layout", "without_generated", "reset_decoder", "decode", "unflatten_params"]
    roots += ["flatten_params", "carry_digest", "check_flat"]
    if options.gradient_scaling == "on":
        roots += ["scale_grad"] if options.generator_hidden else ["scale_grad", "scaled_linear"]
    if dynamic:
        roots += ["check_condition", "dynamic_inputs", "run_per_sample"]
    batch_norm_stats = None
    if dynamic and _has_batch_norm(loaded):
        batch_norm_stats = options.batch_norm_stats
        roots.append("set_batch_norm_statistics")
    if delta:
        roots += ["apply_base", "load_checkpoint", "zero_output"]
    if fused:
        roots += ["shared_inputs", "run_fused", "install_fusion"]
        roots += list(dict.fromkeys(f for _, f in forwards))
    static_fast = fast_static(options, loaded)
    if static_fast:
        roots += ["run_static", "install_static"]
    kernel = kernel_source("torch", roots)
    own = (
        [*_TORCH_IMPORTS, "from torch.func import functional_call"]
        if not dynamic
        else list(_TORCH_IMPORTS)
    )
    if loaded.example_inputs is not None:
        example_args = tuple(map(example_expression, loaded.example_inputs))
    else:
        example_args = tuple(_tensor_expression(s.shape, s.dtype) for s in specs)
    decisions.update(
        batch_norm_stats=batch_norm_stats,
        example_args=example_args,
        example_kwargs=tuple((k, example_expression(v)) for k, v in loaded.example_kwargs.items()),
        fused=fused,
        static_fast=static_fast,
        own_embedding=static_fast and "embedding" in own_classes(options, loaded),
        low_rank=low_rank,
        fused_kinds=kinds,
        indexed=any(k in _FUSED_FORWARD for k in kinds),
        fused_forwards=forwards,
        imports=merge_imports([*own, *kernel.imports]),
        kernel_imports=kernel.imports,
        kernel_source=kernel.body,
        kernel_names=tuple(sorted(kernel.names)),
    )
    return decisions


def _tensor_expression(shape: tuple[int, ...], dtype: str) -> str:
    maker = "torch.randn" if dtype.startswith("float") else "torch.zeros"
    return f"{maker}({_py(tuple(shape))}, dtype=torch.{dtype})"


def example_expression(value: Any) -> str:
    """A Python expression for a value of an example call (tensors by shape and dtype)."""
    if getattr(value, "shape", None) is not None and getattr(value, "dtype", None) is not None:
        dtype = str(value.dtype).removeprefix("torch.")
        return _tensor_expression(tuple(int(d) for d in value.shape), dtype)
    if isinstance(value, dict):
        items = ", ".join(f"{k!r}: {example_expression(v)}" for k, v in value.items())
        return "{" + items + "}"
    if isinstance(value, list):
        return "[" + ", ".join(map(example_expression, value)) + "]"
    if isinstance(value, tuple):
        parts = list(map(example_expression, value))
        return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    raise GenerationError(
        f"the example call holds {type(value).__name__!r}, which a PyTorch file's __main__ cannot "
        "repeat; use tensors, None, bools, numbers, strings, or tuples/lists/dicts of them"
    )


def merge_imports(lines: list[str]) -> tuple[str, ...]:
    """Import lines merged (one line per module) and sorted: the standard library, then the rest."""
    plain: set[str] = set()
    froms: dict[str, list[str]] = {}
    for line in lines:
        if line.startswith("import "):
            plain.add(line.removeprefix("import ").strip())
        else:
            module, _, names = line.removeprefix("from ").partition(" import ")
            for name in names.split(","):
                if name.strip() not in froms.setdefault(module.strip(), []):
                    froms[module.strip()].append(name.strip())

    def key(module: str) -> tuple[int, str]:
        return (0 if module.split(".")[0] in sys.stdlib_module_names else 1, module)

    out = [(key(m), 0, f"import {m}") for m in plain]
    out += [
        (key(m), 1, f"from {m} import {', '.join(sorted(n, key=_by_type))}")
        for m, n in froms.items()
    ]
    out.sort(key=lambda item: (item[0][0], item[1], item[0][1]))  # isort: plain, then from
    lines_out, group = [], None
    for (g, _), _, line in out:
        if group is not None and g != group:
            lines_out.append("")
        lines_out.append(line)
        group = g
    return tuple(lines_out)


def _by_type(name: str) -> tuple[int, str]:
    """isort's order of imported names: CONSTANTS, Classes, functions."""
    return (0 if name.isupper() else 1 if name[:1].isupper() else 2, name)


#: What the Linen/NNX specialised part imports itself, beside the kernel's needs.
_FLAX_IMPORTS = {
    "linen": (
        "import dataclasses",
        "import math",
        "from typing import Any, NamedTuple",
        "import flax.linen as nn",
        "import jax",
        "import jax.numpy as jnp",
    ),
    "nnx": (
        "import math",
        "from typing import Any, NamedTuple",
        "import jax",
        "import jax.numpy as jnp",
        "from flax import nnx",
    ),
}


def flax_decisions(
    options: GenerateOptions,
    loaded: LoadedTarget,
    state: tuple,
    fusion: Any,
    params: tuple = (),
    low_rank: tuple[tuple[str, int], ...] = (),
) -> dict[str, Any]:
    """The Linen/NNX decisions (fused, collections, the static rank-D layers) and the kernel
    section: the definitions of ``hypernn_gen/kernel/{flax,linen,nnx}.py`` this file uses."""
    framework, dynamic = loaded.framework, options.dynamic
    delta = options.generate == "delta"  # the materialising path: base + delta, sample by sample
    fused = bool(dynamic and not delta and not options.generator_hidden and fusion and fusion.fused)
    collections = tuple(sorted({t.collection for t in state if t.collection != "params"}))
    excluded = any(t.reason == "excluded" for t in state)
    # static Linen/NNX: LOW_RANK rows (module keys, kernel index, bias index, segments)
    bias_of = {p.keys: i for i, p in enumerate(params)}
    low_rank_layers = tuple(
        (params[i].keys[:-1], i, bias_of.get((*params[i].keys[:-1], "bias")), 1)
        for _, i in low_rank
    )
    roots = flax_kernel_roots(framework, dynamic, fused, excluded, bool(low_rank_layers))
    roots += ["base_flat"] if delta else []
    if options.gradient_scaling == "on":
        roots += flax_scaling_roots(framework, bool(options.generator_hidden))
    kernel = kernel_source(framework, roots)
    own = list(_FLAX_IMPORTS[framework])
    if delta and not dynamic and not options.generator_hidden:  # a zero-initialised generator
        own.remove("import math")
    if framework == "linen" and (collections or excluded or delta):
        own.append("import functools")
    if "copy.deepcopy(" in factory_expression(loaded):
        own.append("import copy")
    return {
        "example_call": example_call_expression(loaded),
        "batch_norm_stats": options.batch_norm_stats,
        "fused": fused,
        "static_fast": bool(low_rank_layers),
        "low_rank": low_rank,
        "low_rank_layers": low_rank_layers,
        "delta": delta,
        "collections": collections,
        "imports": merge_imports([*own, *kernel.imports]),
        "kernel_imports": kernel.imports,
        "kernel_source": kernel.body,
        "kernel_names": tuple(sorted(kernel.names)),
    }


def flax_scaling_roots(framework: str, generator_hidden: bool) -> list[str]:
    """The kernel definitions a Flax file with gradient scaling calls: ``scale_grad`` (the
    table), and the linear generator's layer unless the generator has hidden layers."""
    if generator_hidden:
        return ["scale_grad"]
    return ["scale_grad", "ScaledDense" if framework == "linen" else "ScaledLinear"]


def example_call_expression(loaded: LoadedTarget) -> str | None:
    """Flax: ``example_call`` or ``example_call()``, how a generated file's ``__main__`` makes the
    target file's example call (copied with the target); ``None`` without one (and for Torch,
    whose ``__main__`` writes the call out)."""
    if loaded.framework == "torch" or loaded.example_call is None:
        return None
    made = getattr(loaded.source_module, EXAMPLE_CALL, None)
    if made is None:
        return None
    return EXAMPLE_CALL + "()" if callable(made) else EXAMPLE_CALL


def flax_kernel_roots(
    framework: str,
    dynamic: bool,
    fused: bool = False,
    excluded: bool = False,
    low_rank: bool = False,
) -> list[str]:
    """The ``hypernn_gen/kernel/<framework>.py`` definitions (``framework``: ``linen`` or
    ``nnx``; with what they use of ``kernel/flax.py``) a file of this design calls;
    ``low_rank``: a static file's rank-D layers."""
    roots = ["model_mesh", "split_chunks", "decode", "unflatten", "flatten", "check_flat"]
    if framework == "linen":
        roots += ["check_layout", "apply_target", "carry_digest"]
        roots += ["merge_params", "excluded_params"] if excluded else []
    else:
        roots += ["check_layout", "without_generated", "run_target", "digest_array", "check_digest"]
    if dynamic:
        roots += ["is_array", "check_batch", "run_per_sample"]
    if fused:
        roots += ["shared_inputs", "fused_path"]
        roots += ["install_fusion"] if framework == "nnx" else []
    if low_rank:
        roots += ["static_inputs"]
        roots += ["fused_apply"] if framework == "linen" else ["fused_layers", "install_fusion"]
    return roots
