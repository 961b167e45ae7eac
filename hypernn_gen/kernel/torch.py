"""The target-independent code of Torch hypernetworks (runtime and generated files).

A layout is passed in, never read from a global: ``generated`` is a sequence of slices with
``path``, ``shape``, ``offset`` and ``size`` (the generated file's ``GENERATED``, the runtime's
``layout.generated``), ``flat_size`` the length of the flat vector.
"""

from __future__ import annotations

import copy
import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn import functional as F
from torch.utils import _pytree as pytree


def check_layout(
    target_network: nn.Module, generated: tuple, excluded: frozenset[str] = frozenset()
) -> None:
    """Refuse a target whose trainable parameters differ from the generated layout."""
    found = [
        (name, tuple(p.shape))
        for name, p in target_network.named_parameters()
        if p.requires_grad and name not in excluded
    ]
    expected = [(p.path, tuple(p.shape)) for p in generated]
    if found != expected:
        diff = next(
            (f"{e} != {f}" for e, f in zip(expected, found, strict=False) if e != f),
            f"{len(expected)} generated tensors expected, the target has {len(found)}",
        )
        raise ValueError(
            f"this target's parameters differ from the layout this file was generated for "
            f"({diff}); regenerate the file for the new target"
        )


def without_generated(target_network: nn.Module, paths: set[str]) -> nn.Module:
    """A copy of the target that keeps its state but not the tensors in ``paths`` (the
    generated ones, under every name)."""
    memo = {
        id(p): None
        for name, p in target_network.named_parameters(remove_duplicate=False)
        if name in paths
    }
    clone = copy.deepcopy(target_network, memo)
    dtype = next((p.dtype for n, p in target_network.named_parameters() if n in paths), None)
    for path in sorted(paths):
        owner, _, leaf = path.rpartition(".")
        clone.get_submodule(owner)._parameters.pop(leaf, None)
    if dtype is not None and next(clone.parameters(), None) is None:
        # Libraries read a module's dtype/device from its first parameter (transformers'
        # ``self.dtype``, diffusers' ``self.device``, ``next(self.parameters())``): keep a frozen
        # zero-size one in the generated tensors' dtype, which ``.to()`` moves with the module,
        # kept out of state dicts so that they stay the target's own.
        anchor = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
        clone.register_parameter(ANCHOR, anchor)
        clone._register_state_dict_hook(drop_anchor)
        clone._register_load_state_dict_pre_hook(add_anchor, with_module=True)
    return clone


ANCHOR = "_hypernn_anchor"  #: the zero-size parameter of a target whose tensors are all generated


def drop_anchor(module: nn.Module, state: dict, prefix: str, local_metadata: Any) -> None:
    state.pop(prefix + ANCHOR, None)


def add_anchor(module: nn.Module, state: dict, prefix: str, *args: Any) -> None:
    state.setdefault(prefix + ANCHOR, getattr(module, ANCHOR).detach())


DIGEST_KEY = "layout_digest"  #: the state-dict entry naming the layout a checkpoint was saved from


def carry_digest(hypernetwork: nn.Module, digest: str) -> None:
    """Put ``digest`` (16 hex digits: the layout, chunking, mode and sizes) in every state dict,
    as 8 bytes under ``DIGEST_KEY``, and refuse to load one that carries another (saved from a
    hypernetwork of another layout; shapes alone cannot tell). One without it (saved before
    digests existed, or built by hand) loads as before."""
    hypernetwork.layout_digest = digest
    hypernetwork.register_state_dict_post_hook(save_digest)
    hypernetwork.register_load_state_dict_pre_hook(load_digest)


def save_digest(module: nn.Module, state: dict, prefix: str, local_metadata: Any) -> None:
    device = next(module.parameters()).device  # beside the values it describes
    digest = list(bytes.fromhex(module.layout_digest))
    state[prefix + DIGEST_KEY] = torch.tensor(digest, dtype=torch.uint8, device=device)


def load_digest(module: nn.Module, state: dict, prefix: str, *args: Any) -> None:
    saved = state.pop(prefix + DIGEST_KEY, None)
    if saved is None or saved.is_meta:  # saved before digests existed, or built by hand
        return
    found = bytes(saved.tolist()).hex()
    if found != module.layout_digest:
        raise ValueError(
            f"the state dict was saved from a hypernetwork of another layout (digest {found}, "
            f"this one's is {module.layout_digest}): its values would land on other tensors; "
            "load it into the hypernetwork it was saved from, or regenerate this one with that "
            "target and those options"
        )


def segments(generated: tuple, flat_size: int) -> tuple[list[int], list[int]]:
    """The pieces covering ``[0, flat_size)``: their sizes, and the index in ``generated`` each
    belongs to (``len(generated)``: padding between tensors, chunking="tensor")."""
    sizes, owners, end = [], [], 0
    for i, p in enumerate(generated):
        if p.offset > end:
            sizes.append(p.offset - end)
            owners.append(len(generated))
        sizes.append(p.size)
        owners.append(i)
        end = p.offset + p.size
    if flat_size > end:
        sizes.append(flat_size - end)
        owners.append(len(generated))
    return sizes, owners


def scale_grad(x: Tensor, factor: float | Tensor | None) -> Tensor:
    """``x`` itself in the forward (exactly), its gradient times ``factor`` in the backward
    (``None``: ``x`` untouched; a tensor: one factor per element). The gradient multipliers of
    docs/concepts.md."""
    if factor is None:
        return x
    return torch.lerp(x.detach(), x, factor)  # x + factor (x - x): one operation, x exactly


def scaled_linear(
    layer: nn.Linear, x: Tensor, weight_scale: float | None, bias_scale: float | None
) -> Tensor:
    """``layer(x)`` with the gradients of its weight and bias multiplied by the two factors."""
    bias = None if layer.bias is None else scale_grad(layer.bias, bias_scale)
    return F.linear(x, scale_grad(layer.weight, weight_scale), bias)


def grouped_linear(
    embedding: Tensor,
    weight: Tensor,
    bias: Tensor,
    rows: tuple,
    gradient_scale: tuple | None = None,
) -> Tensor:
    """Chunks ``(..., N, C)`` from embeddings ``(..., N, D)``: chunk ``k`` through the head
    ``g`` whose ``rows[g]`` hold ``k``, ``embedding[..., k] @ weight[g].T + bias[g]``
    (``weight (G, C, D)``, ``bias (G, C)``); ``gradient_scale[g]``: the multipliers of head
    ``g``'s weight and bias (the table's are the embedding module's)."""
    order = [k for r in rows for k in r]
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    outs = []
    for g, r in enumerate(rows):
        w, b = weight[g], bias[g]
        if gradient_scale is not None:
            w, b = scale_grad(w, gradient_scale[g][1]), scale_grad(b, gradient_scale[g][2])
        e = embedding.index_select(-2, torch.tensor(r, dtype=torch.long, device=embedding.device))
        outs.append(F.linear(e, w, b))
    return torch.cat(outs, -2).index_select(-2, inverse.to(embedding.device))


def row_factors(rows: tuple, gradient_scale: tuple) -> Tensor:
    """The table's per-row gradient multipliers ``(N, 1)`` of a grouped generator: row ``k``
    gets its group's table multiplier."""
    factors = torch.empty(sum(len(r) for r in rows), 1)
    for r, m in zip(rows, gradient_scale, strict=True):
        factors[list(r)] = m[0]
    return factors


#: Added to a tensor's mean square before the normalised decode's square root.
NORM_EPS = 1e-12


def unit_rms(piece: Tensor) -> Tensor:
    """``piece`` over its root mean square along the last dimension (one tensor's raw values,
    per sample): the normalised decode of a grouped generator."""
    return piece * torch.rsqrt(piece.square().mean(-1, keepdim=True) + NORM_EPS)


def normalize_raw(raw: Tensor, generated: tuple, flat_size: int) -> Tensor:
    """``raw`` with each generated tensor's values at unit RMS (:func:`unit_rms`, per sample;
    padding between tensors is left as it is): the normalised decode's first step."""
    sizes, owners = segments(generated, flat_size)
    pieces = raw.split(sizes, -1)
    n = len(generated)
    return torch.cat([unit_rms(p) if i < n else p for i, p in zip(owners, pieces, strict=True)], -1)


def decoder(
    param_scale: Tensor,
    param_shift: Tensor,
    generated: tuple,
    gradient_scale: tuple | None,
    constants: dict | None = None,
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Each tensor's decode scale and shift; with gradient scaling (``gradient_scale`` given),
    their gradients divided by the tensor's size, the number of values they are summed over
    (those factors kept in ``constants`` after the first call)."""
    if gradient_scale is None:
        return param_scale.unbind(), param_shift.unbind()
    key = ("inverse sizes", param_scale.device, param_scale.dtype)
    factors = None if constants is None else constants.get(key)
    if factors is None:
        factors = param_scale.new_tensor([1.0 / p.size for p in generated])  # one op for all
        if constants is not None and not torch.compiler.is_compiling():
            constants[key] = factors
    return scale_grad(param_scale, factors).unbind(), scale_grad(param_shift, factors).unbind()


def decode(
    raw: Tensor,
    param_scale: Tensor,
    param_shift: Tensor,
    generated: tuple,
    flat_size: int,
    gradient_scale: tuple | None = None,
) -> Tensor:
    """Per-tensor affine map from raw generator output to parameter values, tensor by tensor
    (leading batch dimensions are kept; padding between tensors is 0)."""
    scale, shift = decoder(
        param_scale.to(raw.dtype), param_shift.to(raw.dtype), generated, gradient_scale
    )
    sizes, owners = segments(generated, flat_size)
    pieces = raw.split(sizes, -1)
    decoded = [
        torch.addcmul(shift[i], piece, scale[i]) if i < len(scale) else torch.zeros_like(piece)
        for i, piece in zip(owners, pieces, strict=True)
    ]
    return torch.cat(decoded, -1)


def unflatten_params(
    flat: Tensor, generated: tuple, flat_size: int, tied: dict[str, str] | None = None
) -> dict[str, Tensor]:
    """Named tensors from a flat vector (leading batch dimensions are kept); ``tied`` maps each
    further name of a tied tensor to the generated one."""
    batch = flat.shape[:-1]
    sizes, owners = segments(generated, flat_size)
    pieces = flat.split(sizes, -1)  # one split: one node in the backward
    params = {
        generated[i].path: piece.reshape((*batch, *generated[i].shape))
        for i, piece in zip(owners, pieces, strict=True)
        if i < len(generated)
    }
    params.update({alias: params[path] for alias, path in (tied or {}).items()})
    return params


def flatten_params(params: dict[str, Tensor], generated: tuple, flat_size: int) -> Tensor:
    """The flat vector for named tensors, e.g. ``dict(target.named_parameters())``."""
    missing = [p.path for p in generated if p.path not in params]
    if missing:
        raise ValueError(
            f"flatten_params is missing {missing[0]!r} (and {len(missing) - 1} more); pass "
            "every generated tensor, e.g. dict(target.named_parameters())"
        )
    flat = params[generated[0].path].new_zeros(flat_size)
    for p in generated:
        flat[p.offset : p.offset + p.size] = params[p.path].detach().reshape(-1)
    return flat


@torch.no_grad()
def reset_decoder(param_scale: Tensor, param_shift: Tensor, generated: tuple) -> None:
    """``param_scale``/``param_shift`` back to each tensor's init std/mean, in place."""
    param_scale.copy_(torch.tensor([p.init_std for p in generated], device=param_scale.device))
    param_shift.copy_(torch.tensor([p.init_mean for p in generated], device=param_shift.device))


def check_condition(condition: Tensor, shape: tuple[int, ...]) -> None:
    """Refuse a conditioning input that is not ``(batch, *shape)`` (up to flattening)."""
    if condition.dim() == 0 or condition[0].numel() != math.prod(shape):
        raise ValueError(
            f"the condition has shape {tuple(condition.shape)}, this hypernetwork was "
            f"generated for (batch, *{shape}); pass condition=... to forward"
        )


def check_flat(flat: Tensor, flat_size: int, dynamic: bool = False) -> None:
    """``generated_params`` must be ``(flat_size,)`` (static) or ``(batch, flat_size)``."""
    shape = tuple(flat.shape) if isinstance(flat, Tensor) else type(flat).__name__
    if not isinstance(flat, Tensor) or flat.dim() != 1 + dynamic or flat.shape[-1] != flat_size:
        expected = f"(batch, {flat_size})" if dynamic else f"({flat_size},)"
        raise ValueError(
            f"generated_params has shape {shape}, expected {expected}; build it with "
            "flatten_params() or generate_params()"
        )


def dynamic_inputs(
    args: tuple, condition: Tensor | None, flat: Tensor | None, flat_size: int
) -> tuple[Tensor, int]:
    """The condition (default: the first input) and the number of weight sets, checked before
    PyTorch sees them: ``generated_params`` ``(batch, flat_size)``, a batch of at least one
    sample and every tensor input batched alike (the condition's shape: ``check_condition``)."""
    condition = args[0] if condition is None and args else condition
    if flat is None and (not isinstance(condition, Tensor) or condition.dim() == 0):
        got = f"shape {tuple(condition.shape)}" if isinstance(condition, Tensor) else condition
        raise ValueError(
            f"dynamic mode needs a conditioning input (batch, *condition shape), got {got}; "
            "pass the target's inputs or condition=... with a leading batch dimension"
        )
    if flat is not None:
        check_flat(flat, flat_size, dynamic=True)
    batch = (condition if flat is None else flat).shape[0]
    if batch == 0:
        raise ValueError(
            "a batch of 0 samples: dynamic mode makes one weight set per sample; pass at least one"
        )
    check_batch(args, batch)
    return condition, batch


def check_batch(args: tuple, batch: int) -> None:
    """Refuse a tensor input whose leading dimension is not the number of weight sets."""
    for i, x in enumerate(args):
        if isinstance(x, Tensor) and (x.dim() == 0 or x.shape[0] != batch):
            raise ValueError(
                f"{batch} weight sets but input {i} has shape {tuple(x.shape)}; give the "
                "inputs and the condition the same leading batch dimension"
            )


def batched_leaves(batch: int, args: tuple, kwargs: dict, flags: tuple | None = None) -> list[bool]:
    """Which tensors of a call (``pytree`` leaves of ``(args, kwargs)``, in order) carry the batch
    first: ``flags`` as the generator's probe recorded them (checked against the shapes), or,
    without them, those whose first dimension is ``batch`` (the hypernetwork's own inputs)."""
    tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, Tensor)]
    if flags is None:
        return [x.dim() > 0 and x.shape[0] == batch for x in tensors]
    if len(flags) != len(tensors) or any(
        flag and (x.dim() == 0 or x.shape[0] != batch)
        for x, flag in zip(tensors, flags, strict=False)
    ):
        shapes = [tuple(x.shape) for x in tensors]
        raise ValueError(
            f"a module run per sample got tensors of shapes {shapes}, not the {len(flags)} "
            f"inputs (batch of {batch} first: {list(flags)}) seen when the file was generated; "
            "regenerate the file with an example call like this one"
        )
    return list(flags)


class Static(NamedTuple):
    """A slot in an output rebuilt after vmap: the index of a tensor among the outputs."""

    index: int


def split_tensors(value: Any, found: list[Tensor], depth: int = 0) -> Any:
    """``value`` with every tensor in it replaced by its :class:`Static` slot in ``found``.

    Containers and objects that hold tensors (transformers' ``DynamicCache``) are copied, so
    the tensors a function makes under vmap can leave it; values without tensors (``None``,
    numbers, strings) are kept as they are, the same for every sample.
    """
    if isinstance(value, Tensor):
        found.append(value)
        return Static(len(found) - 1)
    if depth > 6 or value is None or isinstance(value, (bool, int, float, str, type, nn.Module)):
        return value
    before = len(found)
    if isinstance(value, (list, tuple, dict)):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        parts = {k: split_tensors(v, found, depth + 1) for k, v in items}
        if len(found) == before:
            return value
        if isinstance(value, dict):
            clone = copy.copy(value)
            clone.update(parts)
            return clone
        rebuilt = list(parts.values())
        if isinstance(value, list):
            return rebuilt
        return type(value)(*rebuilt) if hasattr(value, "_fields") else tuple(rebuilt)
    if not hasattr(value, "__dict__"):
        return value
    parts = {k: split_tensors(v, found, depth + 1) for k, v in vars(value).items()}
    if len(found) == before:
        return value
    clone = copy.copy(value)
    vars(clone).update(parts)
    return clone


def fill_tensors(value: Any, tensors: tuple[Tensor, ...], depth: int = 0) -> Any:
    """The inverse of :func:`split_tensors`: each :class:`Static` slot back to its tensor."""
    if isinstance(value, Static):
        return tensors[value.index]
    if depth > 6 or value is None or isinstance(value, (bool, int, float, str, type, nn.Module)):
        return value
    if isinstance(value, dict):
        value.update({k: fill_tensors(v, tensors, depth + 1) for k, v in value.items()})
    elif isinstance(value, list):
        value[:] = [fill_tensors(v, tensors, depth + 1) for v in value]
    elif isinstance(value, tuple):
        parts = [fill_tensors(v, tensors, depth + 1) for v in value]
        return type(value)(*parts) if hasattr(value, "_fields") else tuple(parts)
    elif hasattr(value, "__dict__"):
        vars(value).update({k: fill_tensors(v, tensors, depth + 1) for k, v in vars(value).items()})
    return value


def run_per_sample(
    module: nn.Module,
    params: dict[str, Tensor],
    batch: int,
    args: tuple,
    kwargs: dict,
    flags: tuple | None = None,
) -> Any:
    """Sample b through ``module`` alone with ``params[...][b]``, batched with vmap.

    The tensors of the call that carry the batch first (:func:`batched_leaves`; positional or
    keyword, in any container) are split per sample; the others (positions, masks) are shared.
    The output may hold anything: its tensors come back with the batch first, ``None`` and other
    plain values as they are, containers and objects (``ModelOutput``, ``DynamicCache``) rebuilt.
    In training each sample gets its own copy of the module's buffers and their mean is written
    back; a BatchNorm (:func:`batch_statistics`) normalises with the whole batch's statistics
    (:class:`BatchMoments`), as the plain target on the batch, so every copy gets the same update.
    A forward that branches on tensor values (``if mask.all():``) runs one sample at a time
    (:func:`loop_samples`), with the same result.
    """
    buffers = dict(module.named_buffers()) if module.training else {}
    copies = {k: v.unsqueeze(0).expand(batch, *v.shape).clone() for k, v in buffers.items()}
    whole = [m for m in module.modules() if batch_statistics(m)]
    for m in whole:  # conditional BatchNorm: the whole batch's statistics, inside vmap too
        m.forward = whole_batch_norm_forward.__get__(m)
    padded = [  # an nn.Embedding, or its fused/per-sample swap (a subclass made here)
        m
        for m in module.modules()
        if type(m).__mro__[1 if hasattr(m, "hyper_shared") else 0] is nn.Embedding
        and m.padding_idx is not None
    ]
    for m in padded:
        m.forward = padded_embedding_forward.__get__(m)
    try:
        out = vmap_samples(module, params, copies, args, kwargs, batch, flags)
    finally:
        for m in whole + padded:
            del m.forward
    with torch.no_grad():
        for name, value in copies.items():
            mean = value.float().mean(0) if value.is_floating_point() else value[0]
            buffers[name].copy_(mean.to(buffers[name].dtype))
    return out


def padded_embedding_forward(self: nn.Module, ids: Tensor) -> Tensor:
    """nn.Embedding's forward, its padding row detached: under vmap with a per-sample weight,
    F.embedding's backward gives ``padding_idx``'s row a gradient in every sample but the first
    (torch 2.13), where the plain Embedding gives it none."""
    row = torch.arange(self.weight.shape[0], device=self.weight.device) == self.padding_idx
    weight = torch.where(row.unsqueeze(-1), self.weight.detach(), self.weight)
    return F.embedding(
        ids, weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq
    )


def vmap_samples(
    module: nn.Module,
    params: dict[str, Tensor],
    copies: dict[str, Tensor],
    args: tuple,
    kwargs: dict,
    batch: int,
    flags: tuple | None,
) -> Any:
    """:func:`run_per_sample`'s vmap: sample b with ``params[...][b]`` and ``copies[...][b]``."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    split = iter(batched_leaves(batch, args, kwargs, flags))
    where = [isinstance(x, Tensor) and next(split) for x in leaves]
    template: list[Any] = []

    def one_sample(p: dict[str, Tensor], b: dict[str, Tensor], xs: list[Tensor]) -> tuple:
        given = iter(xs)
        full = [next(given).unsqueeze(0) if w else x for x, w in zip(leaves, where, strict=True)]
        a, k = pytree.tree_unflatten(full, spec)
        out = functional_call(module, {**p, **b}, a, k, tie_weights=False)
        found: list[Tensor] = []
        outs, out_spec = pytree.tree_flatten(out)
        template.append((out_spec, [split_tensors(o, found) for o in outs]))
        if any(where):
            found = [o.squeeze(0) if o.dim() and o.shape[0] == 1 else o for o in found]
        return tuple(found)

    xs = [x for x, w in zip(leaves, where, strict=True) if w]
    try:
        tensors = vmap(one_sample, in_dims=(0, 0, 0), randomness="different")(params, copies, xs)
    except RuntimeError as exc:
        if "data-dependent control flow" in str(exc):  # if mask.all(): one sample at a time
            tensors = loop_samples(module, one_sample, params, copies, xs, batch)
            out_spec, outs = template[-1]
            return pytree.tree_unflatten([fill_tensors(o, tensors) for o in outs], out_spec)
        if "inplace randomness" not in str(exc):
            raise
        raise ValueError(
            f"{type(module).__name__} draws random numbers in place into a tensor it makes "
            "(torch.empty(...).bernoulli_(), as DropPath/StochasticDepth do), which cannot run "
            "per sample under vmap; call it in eval mode, or draw with torch.bernoulli(torch.full"
            "(...)) / torch.rand(...) < p instead"
        ) from None
    out_spec, outs = template[-1]
    return pytree.tree_unflatten([fill_tensors(o, tensors) for o in outs], out_spec)


def loop_samples(
    module: nn.Module,
    one_sample: Any,
    params: dict[str, Tensor],
    copies: dict[str, Tensor],
    xs: list[Tensor],
    batch: int,
) -> tuple[Tensor, ...]:
    """What vmap gives, one sample after another: for a forward that branches on tensor values
    (transformers' ``if mask.all():``), which vmap cannot run."""
    if any(batch_statistics(m) for m in module.modules()):
        raise ValueError(
            f"{type(module).__name__}'s forward branches on tensor values, so its samples run one "
            "at a time, where a BatchNorm cannot see the whole batch's statistics; use "
            "batch_norm_stats 'sample', eval mode, or the fused path (no generated_params/"
            "return_params)"
        )
    results = [
        one_sample(
            {k: v[b] for k, v in params.items()},
            {k: v[b] for k, v in copies.items()},  # views: in-place updates land in the copies
            [x[b] for x in xs],
        )
        for b in range(batch)
    ]
    return tuple(torch.stack(parts) for parts in zip(*results, strict=True))


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def set_batch_norm_statistics(target: nn.Module, how: str) -> None:
    """Dynamic mode's BatchNorm statistics for every BatchNorm of ``target`` (exact types):
    ``"batch"`` (conditional BatchNorm: the whole batch's statistics, as the plain target, then
    each sample's own weight and bias) or ``"sample"`` (each sample normalised alone)."""
    for module in target.modules():
        if type(module) in BATCH_NORMS:
            module.hyper_stats = how


def batch_statistics(module: nn.Module) -> bool:
    """A BatchNorm set to the whole batch's statistics (:func:`set_batch_norm_statistics`) that
    normalises with batch statistics now (training, or no running statistics)."""
    return getattr(module, "hyper_stats", None) == "batch" and (
        module.training or module.running_mean is None
    )


class BatchMoments(torch.autograd.Function):
    """Mean, biased variance and count of ``x`` over every dimension but 1 (the channels);
    under vmap over the vmapped batch too, outputs the same for every sample."""

    generate_vmap_rule = False

    @staticmethod
    def forward(x: Tensor, copies: int = 1) -> tuple[Tensor, Tensor, Tensor]:
        count = x.numel() // x.shape[1] * copies
        if count <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size "
                f"{tuple(x.shape)} for the whole batch"
            )
        var, mean = torch.var_mean(x, [d for d in range(x.dim()) if d != 1], correction=0)
        return mean, var, torch.tensor(count, dtype=x.dtype, device=x.device)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        ctx.save_for_backward(inputs[0], output[0])

    @staticmethod
    def backward(ctx: Any, grad_mean: Tensor, grad_var: Tensor, _: Tensor) -> tuple:
        x, mean = ctx.saved_tensors
        view = (1, -1, *(1,) * (x.dim() - 2))
        n = x.numel() // x.shape[1]
        return (grad_mean.view(view) + 2 * grad_var.view(view) * (x - mean.view(view))) / n, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: Tensor, copies: int = 1) -> tuple[tuple, tuple]:
        if in_dims[0] is None:  # the same input for every sample: a batch of identical copies
            return BatchMoments.apply(x, copies * info.batch_size), (None, None, None)
        x = x.movedim(in_dims[0], 0).flatten(0, 1)
        return BatchMoments.apply(x, copies), (None, None, None)


def whole_batch_norm_forward(self: nn.Module, x: Tensor) -> Tensor:
    """forward() of a BatchNorm run per sample under vmap, with the whole batch's statistics:
    what the plain target computes on the batch, running statistics updated alike."""
    self._check_input_dim(x)
    mean, var, count = BatchMoments.apply(x)
    if self.training and self.track_running_stats and self.num_batches_tracked is not None:
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            factor = self.momentum
            if factor is None:  # a cumulative average, as BatchNorm's momentum=None
                factor = 1.0 / self.num_batches_tracked
            if self.running_mean is not None:
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_mean.copy_(self.running_mean * (1 - factor) + mean * factor)
                self.running_var.copy_(self.running_var * (1 - factor) + unbiased * factor)
    view = (1, -1, *(1,) * (x.dim() - 2))
    y = (x - mean.view(view)) * torch.rsqrt(var.view(view) + self.eps)
    if self.weight is not None:
        y = y * self.weight.view(view)
    return y if self.bias is None else y + self.bias.view(view)


# -- Fused per-sample layers: per-sample outputs without per-sample weights --
#
# Sample b's flat weights are g[b, p] = shift + scale * (s[b, p // chunk_dim] * g0[p] + bg[p % chunk_dim])
# (s: per-sample embedding scales, g0: the generator applied to the shared table, bg: its bias).
# For a Linear/Conv layer whose output row o spans the chunks first(o) .. first(o) + S - 1,
# S + 1 shared GEMMs/convolutions (one per segment, one for the bias part) and a per-sample
# weighted sum over the S segments give exactly the per-sample outputs. Norm layers normalise the
# whole batch (each sample by its own statistics) and apply each sample's weight and bias; an
# Embedding computes just the rows it looks up. Other modules that own generated tensors or
# buffers run per sample (vmap) with just their own tensors materialised.


class FusedLayer(NamedTuple):
    """A layer computed from shared weights: its module path, its kind, the indices of its
    weight and bias in the layout (None: the layer keeps its own), S for Linear/Conv (for a
    parameter used directly, kind "direct": the rank it is broadcast at), and whether its inputs,
    shared with a leading 1, are repeated for every sample."""

    path: str
    kind: str
    weight: int | None
    bias: int | None
    segments: int
    broadcast: bool = False


class Shared(NamedTuple):
    """One batch's generation inputs: per-sample chunk scales and what all samples share."""

    scales: Tensor  # (batch, num_embeddings)
    table: Tensor  # (num_embeddings, embedding_dim): the embedding table E
    generator: Tensor  # (chunk_dim, embedding_dim): the linear generator's weight Wg
    generator_bias: Tensor  # (chunk_dim,): its bias bg
    param_scale: tuple[Tensor, ...]  # one scalar per generated tensor
    param_shift: tuple[Tensor, ...]
    generated: tuple  # the layout
    chunk_dim: int
    flat_size: int
    cache: dict  # g0 and bg per generated tensor, computed when first asked for
    constants: dict  # index tensors fixed by the layout, per device, kept across calls
    base: tuple[Tensor, ...] | None = None  # --generate delta: each tensor's frozen base, flat

    def span(self, i: int) -> tuple[int, int, int]:
        """Tensor i's first chunk, its number of chunks and its start in the first."""
        p = self.generated[i]
        first, last = p.offset // self.chunk_dim, (p.offset + p.size - 1) // self.chunk_dim
        return first, last - first + 1, p.offset - first * self.chunk_dim

    @property
    def aligned(self) -> bool:
        """Every tensor starts a chunk (``chunking="tensor"``): no chunk holds two tensors."""
        if "aligned" not in self.cache:
            self.cache["aligned"] = all(p.offset % self.chunk_dim == 0 for p in self.generated)
        return self.cache["aligned"]

    def chunks(self, i: int) -> tuple[Tensor, Tensor]:
        """Tensor i's chunks: each sample's scales ``(batch, count)`` and the table's rows
        ``(count, embedding_dim)``; one split of each for all tensors when no chunk holds two."""
        first, count, _ = self.span(i)
        if not self.aligned:
            return self.scales[:, first : first + count], self.table[first : first + count]
        if "chunks" not in self.cache:
            sizes, owners, end = [], [], 0
            for j in range(len(self.generated)):
                start, n, _ = self.span(j)
                if start > end:  # never with chunking="tensor"; kept for safety
                    sizes.append(start - end)
                    owners.append(-1)
                sizes.append(n)
                owners.append(j)
                end = start + n
            if self.table.shape[0] > end:
                sizes.append(self.table.shape[0] - end)
                owners.append(-1)
            pieces = zip(owners, self.scales.split(sizes, 1), self.table.split(sizes), strict=True)
            self.cache["chunks"] = {j: (s, t) for j, s, t in pieces if j >= 0}
        return self.cache["chunks"][i]

    def g0(self, i: int) -> Tensor:
        """``G0 = E Wg^T`` at tensor i's positions, flat: chunk by chunk where every tensor
        starts a chunk (``chunking="tensor"``), else one product split (one backward node)."""
        if i not in self.cache:
            if self.aligned:
                g0 = F.linear(self.chunks(i)[1], self.generator).view(-1)
                size = self.generated[i].size
                self.cache[i] = g0 if g0.shape[0] == size else g0[:size]
            else:
                sizes, owners = segments(self.generated, self.flat_size)
                g0 = F.linear(self.table, self.generator).view(-1)[: self.flat_size]
                pieces = zip(owners, g0.split(sizes), strict=True)
                self.cache.update((j, v) for j, v in pieces if j < len(self.generated))
        return self.cache[i]

    def bg(self, i: int) -> Tensor:
        """The generator's bias at tensor i's positions, flat."""
        first, count, start = self.span(i)
        bias = self.generator_bias if count == 1 else self.generator_bias.repeat(count)
        size = self.generated[i].size
        return bias if start == 0 and size == bias.shape[0] else bias[start : start + size]

    def raw(self, i: int, coeff: Tensor) -> Tensor:
        """Tensor i's values for every sample, ``(batch, size)``, given the scale of the
        chunk each value lies in, ``(batch, size)`` (or ``(batch, 1)``: one chunk)."""
        raw = self.bg(i) + coeff * self.g0(i)  # no addcmul: its backward is heavier
        value = self.param_shift[i] + self.param_scale[i] * raw
        return value if self.base is None else self.base[i] + value

    def materialise(self, i: int) -> Tensor:
        """Tensor i for every sample, ``(batch, *shape)``: with every tensor in one chunk
        (:meth:`small`) if it lies in one, else from its own chunks."""
        p, (_, count, start) = self.generated[i], self.span(i)
        if count == 1 and self.base is None:
            return self.small()[i].view(-1, *p.shape)
        scales, rows = self.chunks(i)
        if count == 1:
            return self.raw(i, scales).view(-1, *p.shape)
        # chunk by chunk, (shift + scale bg) + (scale s_b) G0: two passes over batch x size
        scale, shift = self.param_scale[i], self.param_shift[i]
        g0 = F.linear(rows, self.generator)  # (count, chunk_dim)
        value = shift + scale * self.generator_bias + (scale * scales)[:, :, None] * g0
        value = value.flatten(1)[:, start : start + p.size]
        return (value if self.base is None else self.base[i] + value).view(-1, *p.shape)

    def small(self) -> dict[int, Tensor]:
        """Every tensor lying in one chunk (biases, norms' weights, small kernels) for every
        sample, ``(batch, size)`` each, computed once for all: a few operations on the values
        gathered from their chunks, instead of a few operations per tensor."""
        if "small" not in self.cache:
            ids, sizes, (owner, g0_at, pos, chunk_at, chunk) = self.small_index()
            g0 = F.linear(self.table.index_select(0, chunk), self.generator)  # (tensors, C)
            g0 = g0.view(-1).index_select(0, g0_at)
            bg = self.generator_bias.index_select(0, pos)
            coeff = self.scales.index_select(1, chunk_at)
            scale = torch.stack([self.param_scale[i] for i in ids]).index_select(0, owner)
            shift = torch.stack([self.param_shift[i] for i in ids]).index_select(0, owner)
            value = shift + scale * (bg + coeff * g0)  # as raw(): bg + s * g0, then decoded
            self.cache["small"] = dict(zip(ids, value.split(sizes, 1), strict=True))
        return self.cache["small"]

    def small_index(self) -> tuple[list[int], list[int], tuple[Tensor, ...]]:
        """:meth:`small`'s tensors and sizes, and its index tensors: each value's tensor (in that
        list), place in the generator's output, in the chunk, and chunk; each tensor's chunk.
        Made on the host, copied without a sync, and kept per device after the first call (not
        while torch.compile traces: it may not write the cache)."""
        key = ("small", self.scales.device)
        if key in self.constants:
            return self.constants[key]
        spans = [(i, *self.span(i)) for i in range(len(self.generated))]
        spans = [(i, first, start) for i, first, count, start in spans if count == 1]
        ids = [i for i, _, _ in spans]
        sizes = [self.generated[i].size for i in ids]
        counts = torch.tensor(sizes)
        owner = torch.arange(len(ids)).repeat_interleave(counts, output_size=sum(sizes))
        within = torch.arange(sum(sizes)) - (counts.cumsum(0) - counts)[owner]
        pos = torch.tensor([start for _, _, start in spans])[owner] + within
        chunk = torch.tensor([first for _, first, _ in spans])
        index = torch.stack([owner, owner * self.chunk_dim + pos, pos, chunk[owner]])
        device = self.scales.device
        found = (ids, sizes, (*index.to(device, non_blocking=True), chunk.to(device)))
        if not torch.compiler.is_compiling():
            self.constants[key] = found
        return found


def shared_inputs(
    hypernetwork: nn.Module,
    condition: Tensor,
    generated: tuple,
    flat_size: int,
    gradient_scale: tuple | None = None,
    delta: bool = False,
) -> Shared:
    """A batch's :class:`Shared`, from the hypernetwork's embedding table (scaled per sample),
    its linear weight generator (``weight_generator.linear``) and ``param_scale``/``param_shift``;
    ``gradient_scale``: the multipliers of the table, the generator's weight and bias; ``delta``:
    every tensor is the ``base`` buffer's values plus the generated ones (``--generate delta``).
    (A static call has its own path: :func:`run_static`.)"""
    embedding, generator = hypernetwork.embedding_module, hypernetwork.weight_generator.linear
    table_scale, weight_scale, bias_scale = gradient_scale or (None, None, None)
    constants = vars(hypernetwork).setdefault("hyper_constants", {})  # per device, kept
    scale, shift = decoder(
        hypernetwork.param_scale, hypernetwork.param_shift, generated, gradient_scale, constants
    )
    scales, table = embedding.scales(condition), scale_grad(embedding.weight, table_scale)
    return Shared(
        scales=scales,
        table=table,
        generator=scale_grad(generator.weight, weight_scale),
        generator_bias=scale_grad(generator.bias, bias_scale),
        param_scale=scale,
        param_shift=shift,
        generated=generated,
        chunk_dim=generator.weight.shape[0],
        flat_size=flat_size,
        cache={},
        base=(
            tuple(hypernetwork.base[p.offset : p.offset + p.size] for p in generated)
            if delta
            else None
        ),
        constants=constants,
    )


def run_fused(
    target: nn.Module, swapped: tuple[nn.Module, ...], shared: Shared, args: tuple, kwargs: dict
) -> Any:
    """The target on the whole batch, its swapped modules computing per-sample outputs."""
    for module in swapped:
        module.hyper_shared = shared
    try:
        return target(*args, **kwargs)
    finally:
        for module in swapped:
            module.hyper_shared = None


class FusedIndex(nn.Module):
    """Constant index tensors of one fused Linear/Conv layer (non-persistent buffers)."""

    def __init__(
        self, layer: FusedLayer, generated: tuple, chunk_dim: int, num_embeddings: int
    ) -> None:
        super().__init__()
        self.layer = layer
        self.generated, self.chunk_dim, self.num_embeddings = generated, chunk_dim, num_embeddings
        p = generated[layer.weight]
        row = p.size // p.shape[0]  # every row in one chunk, chunks starting on rows:
        self.aligned = p.offset % chunk_dim == 0 and chunk_dim % row == 0  # row_products
        for name, value in self.indices().items():
            self.register_buffer(name, value, persistent=False)

    def indices(self, device: torch.device | None = None) -> dict[str, Tensor]:
        """The index tensors, computed from the layout alone: ``chunk``, the chunk of each
        (segment, row) and of each bias value; if S > 1, ``mask[j]``, which weights lie in
        segment ``j`` of their row."""
        p, segments, chunk_dim = (
            self.generated[self.layer.weight],
            self.layer.segments,
            self.chunk_dim,
        )
        pos = p.offset + torch.arange(p.size, device=device).view(p.shape[0], -1)
        first = pos[:, 0] // chunk_dim
        chunk = first[None, :] + torch.arange(segments, device=device)[:, None]
        segment = pos // chunk_dim - first[:, None]
        chunks = [chunk.clamp(max=self.num_embeddings - 1).flatten()]
        if self.layer.bias is not None:  # then the chunk of each bias value
            b = self.generated[self.layer.bias]
            chunks.append(torch.arange(b.offset, b.offset + b.size, device=device) // chunk_dim)
        indices = {"chunk": torch.cat(chunks)}
        if segments > 1:
            segment = segment.view(p.shape)
            steps = torch.arange(segments, device=device).view(-1, *(1,) * len(p.shape))
            indices["mask"] = segment[None] == steps
        return indices

    def _init_buffers(self) -> None:
        """Compute the buffers again, in place (``to_empty`` leaves them uninitialised)."""
        for name, value in self.indices(self.chunk.device).items():
            getattr(self, name).copy_(value)

    def coefficients(self, shared: Shared) -> tuple[Tensor, Tensor | None]:
        """Each sample's chunk scale for every (segment, row), ``(batch, S, rows)``, and for every
        bias value, ``(batch, out)`` (None: the bias is not generated)."""
        rows = self.generated[self.layer.weight].shape[0]
        batch, size = shared.scales.shape[0], self.layer.segments * rows
        coeff = shared.scales.index_select(1, self.chunk)
        bias = coeff[:, size:] if self.layer.bias is not None else None
        return coeff[:, :size].view(batch, -1, rows), bias


# A convolution repeats each weight over every output position, so S + 1 shared convolutions
# cost S + 1 times the layer's own. Up to this many values (batch x kernel size), each sample's
# kernel is built instead and the batch runs as one grouped convolution, at the layer's own cost;
# above it, the shared convolutions keep batch x kernel values out of memory.
GROUPED_CONV_LIMIT = 1 << 22


def grouped_conv(conv: Any, x: Tensor, weight: Tensor, groups: int) -> Tensor:
    """Sample b through ``conv(x, weight, groups)`` with its own kernel ``weight[b]`` (no bias):
    one convolution, ``batch x groups`` groups, over the batch folded into the channels."""
    batch = x.shape[0]
    y = conv(x.reshape(1, -1, *x.shape[2:]), weight.flatten(0, 1), batch * groups)
    return y.view(batch, -1, *y.shape[2:])


def batch_input(self: nn.Module, shared: Shared, x: Tensor) -> Tensor:
    """The input, repeated for every sample where it is shared with a leading 1 (position ids
    ``(1, L)``) and the planner proved the output only broadcast into batched tensors."""
    if self.hyper_layer.broadcast and x.shape[0] == 1:
        return x.expand(shared.scales.shape[0], *x.shape[1:])
    return x


def add_bias(self: nn.Module, shared: Shared, y: Tensor, out_view: tuple[int, ...]) -> Tensor:
    """``y`` plus each sample's generated bias (or the layer's own), shaped as ``out_view``."""
    if self.hyper_layer.bias is not None:
        return y + shared.materialise(self.hyper_layer.bias).view(out_view)
    return y if self.bias is None else y + self.bias.view(out_view[1:])


def fused_product(
    self: nn.Module,
    shared: Shared,
    x: Tensor,
    apply: Any,
    ones: Tensor | None,
    out_view: tuple[int, ...],
    in_view: tuple[int, ...] | None = None,
) -> Tensor:
    """Each sample through the layer's operation ``apply(x, weight)`` with its own weight.

    With W_b = shift + scale * (sum_j c_j[b] * M_j + BG) (M_j: g0 on segment j of every row, BG:
    the generator's bias at each weight's position), y_b = shift * (1 x_b) + scale * (sum_j
    c_j[b] * (M_j x_b) + BG x_b): S + 1 shared products, ``ones`` = 1 x_b (None only where
    every row lies in one chunk from a chunk boundary: :func:`row_products`). Rows are the outputs
    (``in_view`` None: c_j scales the output, shaped ``out_view``) or the inputs (transposed
    weights: c_j scales the input, shaped ``in_view``)."""
    index: FusedIndex = self.hyper_index[0]
    i, s = index.layer.weight, index.layer.segments
    p = shared.generated[i]
    if index.aligned and in_view is None:
        return row_products(self, shared, index.layer, x, apply, out_view)
    g0, bias = shared.g0(i).view(p.shape), shared.bg(i).view(p.shape)  # views, no copies
    coeff, bias_coeff = index.coefficients(shared)
    segments = [g0] if s == 1 else [torch.where(mask, g0, 0.0) for mask in index.mask]
    y = apply(x, bias)
    for j, segment in enumerate(segments):
        if in_view is None:
            y = y + apply(x, segment) * coeff[:, j].view(out_view)
        else:
            y = y + apply(x * coeff[:, j].view(in_view), segment)
    assert ones is not None
    y = shared.param_shift[i] * ones + shared.param_scale[i] * y
    if shared.base is not None:  # delta: W x_b + D_b x_b, the frozen base W shared
        y = y + apply(x, shared.base[i].view(p.shape))
    if bias_coeff is not None:
        return y + shared.raw(index.layer.bias, bias_coeff).view(out_view)
    own = getattr(self, "bias", None)  # nn.MultiheadAttention: its in_proj_bias is generated
    return y if own is None else y + own.view(out_view[1:])


def fused_forward(self: nn.Module, x: Tensor) -> Tensor:
    """forward() of a fused Linear/Conv layer (the plain one when no batch is being generated):
    shared products (:func:`fused_product`), or for a small convolution each sample's kernel
    built and the batch run as one grouped convolution."""
    shared: Shared | None = self.hyper_shared
    if shared is None:
        return type(self).__mro__[1].forward(self, x)
    x = batch_input(self, shared, x)
    i = self.hyper_layer.weight
    p = shared.generated[i]
    if isinstance(self, nn.Linear):  # (batch, ..., in)
        out_view = (x.shape[0], *(1,) * (x.dim() - 2), -1)
        ones = None if self.hyper_index[0].aligned else x.sum(-1, keepdim=True)  # 1 x
        return fused_product(self, shared, x, F.linear, ones, out_view)
    out_view = (x.shape[0], -1, *(1,) * (x.dim() - 2))  # (batch, in, *spatial)

    def apply(x: Tensor, weight: Tensor, groups: int = self.groups) -> Tensor:
        conv = (F.conv1d, F.conv2d, F.conv3d)[x.dim() - 3]
        return conv(x, weight, None, self.stride, self.padding, self.dilation, groups)

    if x.shape[0] * p.size <= GROUPED_CONV_LIMIT:
        y = grouped_conv(apply, x, shared.materialise(i), self.groups)
        return add_bias(self, shared, y, out_view)

    if self.hyper_index[0].aligned:  # row_products: no 1 x (its shared row holds the shift)
        return fused_product(self, shared, x, apply, None, out_view)
    ones = apply(x, x.new_ones(self.groups, *p.shape[1:]))  # 1 x, per group
    if self.groups > 1:
        ones = ones.repeat_interleave(p.shape[0] // self.groups, 1)
    return fused_product(self, shared, x, apply, ones, out_view)


def conv_transpose_forward(self: nn.Module, x: Tensor, output_size: Any = None) -> Tensor:
    """forward() of a fused ConvTranspose1d/2d: its weight ``(in, out / groups, *kernel)`` has
    the input first, so each sample's chunk scales multiply the input's channels."""
    shared: Shared | None = self.hyper_shared
    if shared is None:
        return type(self).__mro__[1].forward(self, x, output_size)
    x = batch_input(self, shared, x)
    n, i = x.dim() - 2, self.hyper_layer.weight
    p = shared.generated[i]
    padding = self._output_padding(
        x, output_size, self.stride, self.padding, self.kernel_size, n, self.dilation
    )
    conv = F.conv_transpose1d if n == 1 else F.conv_transpose2d
    batch, view = x.shape[0], (x.shape[0], -1, *(1,) * n)

    def apply(x: Tensor, weight: Tensor, groups: int = self.groups) -> Tensor:
        return conv(x, weight, None, self.stride, self.padding, padding, groups, self.dilation)

    if batch * p.size <= GROUPED_CONV_LIMIT:
        y = grouped_conv(apply, x, shared.materialise(i), self.groups)
        return add_bias(self, shared, y, view)
    ones = apply(x, x.new_ones(p.shape[0], 1, *p.shape[2:]))  # 1 x, per group
    if self.groups > 1:
        ones = ones.repeat_interleave(p.shape[1], 1)
    return fused_product(self, shared, x, apply, ones, view, view)


def transposed_linear_forward(self: nn.Module, x: Tensor) -> Tensor:
    """forward() of a layer computing ``x @ weight + bias`` with ``weight (in, out)``
    (transformers' Conv1D): each sample's chunk scales multiply the input's features."""
    shared: Shared | None = self.hyper_shared
    if shared is None:
        return type(self).__mro__[1].forward(self, x)
    x = batch_input(self, shared, x)
    view = (x.shape[0], *(1,) * (x.dim() - 2), -1)
    return fused_product(self, shared, x, torch.matmul, x.sum(-1, keepdim=True), view, view)


def row_products(
    self: nn.Module,
    shared: Shared,
    layer: FusedLayer,
    x: Tensor,
    apply: Any,
    out_view: tuple[int, ...],
) -> Tensor:
    """The output of a layer ``apply(x, weight)`` whose weight rows (its outputs) each lie in one
    chunk, ``k = C // row`` rows to a chunk, chunks starting on rows (S = 1). Row ``o = q k + h``
    of sample b is ``shift + scale * (s[b, first + q] * G0[first + q, h] + bg[h])`` (``G0[c, h]``,
    ``bg[h]``: the h-th row-sized piece), so ``W_b x_b = s_b * (M x_b) + R x_b``: one shared
    product with ``M = scale * G0`` (from the scaled table rows), and one with the k rows
    ``R[h] = shift + scale * bg[h]``, repeated. When ``k = 1``, the layer a Linear and it is
    cheaper, ``M x = (scale E_rows) (Wg^T x)``: M has rank D. A generated bias in one chunk is
    ``shift' + scale' * bg + (scale' * G0[c]) s[b, c]``: folded in the same way."""
    i = layer.weight
    p, groups = shared.generated[i], getattr(self, "groups", 1)
    out, row = p.shape[0], p.size // p.shape[0]
    per_chunk, count = shared.chunk_dim // row, shared.span(i)[1]
    scale, shift = shared.param_scale[i], shared.param_shift[i]
    scales, table = shared.chunks(i)
    table = table * scale
    fixed = shift + scale * shared.generator_bias.view(per_chunk, *p.shape[1:])  # R
    tile = per_chunk > 1 and groups == 1  # R x for the k rows only, then repeated
    if per_chunk > 1:  # a small layer: k > 1 rows to a chunk
        scales = scales[:, :, None].expand(-1, -1, per_chunk).flatten(1)[:, :out]
        if not tile:  # a grouped convolution needs every output channel's row
            fixed = fixed.repeat(count, *(1,) * (len(p.shape) - 1))[:out]
    elif groups > 1:
        fixed = fixed.expand(out, *p.shape[1:])
    rest, small = apply(x, fixed), None
    axis = out_view.index(-1) - len(out_view)  # the output dimension
    if tile and out == count * per_chunk:  # output o is row o % k of R: broadcast over chunks
        rest, small = None, rest.unsqueeze(axis - 1)
    elif tile:  # the last chunk partly filled: repeated, then cut
        repeats = [1] * rest.dim()
        repeats[axis] = count
        rest = rest.repeat(repeats).narrow(axis, 0, out)
    if shared.base is not None:  # delta: W x_b + D_b x_b, the frozen base W shared
        base = apply(x, shared.base[i].view(p.shape))
        rest = base if rest is None else rest + base
    rows = x.numel() // row  # samples (times positions) through the layer
    dim = table.shape[1]
    if apply is F.linear and per_chunk == 1 and dim * (row + out) * rows < row * out * (rows + dim):
        products = F.linear(x @ shared.generator, table)
    else:
        g0 = F.linear(table, shared.generator).view(-1)
        products = apply(x, (g0 if g0.shape[0] == p.size else g0[: p.size]).view(p.shape))
    b = layer.bias
    if b is not None and shared.span(b)[1] == 1 and shared.span(b)[2] == 0:
        bias_scales, bias_table = shared.chunks(b)
        bias_scale, size = shared.param_scale[b], shared.generated[b].size
        g0 = F.linear(bias_table * bias_scale, shared.generator).view(-1)[:size]
        fixed = shared.param_shift[b] + bias_scale * shared.bg(b)
        fixed = fixed if shared.base is None else shared.base[b] + fixed
        bias_scales = bias_scales.view(-1, *(1,) * (len(out_view) - 1))
        folded = fixed.view(out_view[1:]) + bias_scales * g0.view(out_view[1:])
        rest = folded if rest is None else rest + folded
        b = None
    y = products * scales.view(out_view)  # no addcmul: a lighter backward
    if small is not None:
        y = (y.unflatten(axis, (count, per_chunk)) + small).flatten(axis - 1, axis)
    y = y if rest is None else rest + y
    if b is not None:
        return y + shared.materialise(b).view(out_view)
    own = getattr(self, "bias", None) if layer.bias is None else None  # MHA: in_proj_bias
    return y if own is None else y + own.view(out_view[1:])


def affine(self: nn.Module, shared: Shared, y: Tensor, channel_shape: tuple[int, ...]) -> Tensor:
    """``y * weight + bias`` with each sample's own generated weight and bias (or the module's)."""
    layer: FusedLayer = self.hyper_layer
    weight = (
        self.weight
        if layer.weight is None
        else shared.materialise(layer.weight).view(channel_shape)
    )
    if layer.bias is None:
        bias = getattr(self, "bias", None)  # RMSNorm has none
    else:
        bias = shared.materialise(layer.bias).view(channel_shape)
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


def batch_norm_forward(self: nn.Module, x: Tensor) -> Tensor:
    """forward() of a BatchNorm layer, then each sample's own generated weight and bias.

    By default (:func:`set_batch_norm_statistics` ``"batch"``) normalised as the plain target
    normalises the batch, running statistics updated alike (conditional BatchNorm); with
    ``"sample"`` every sample is normalised as a batch of one, as it would be alone (its own
    statistics in training, which update the running ones by their mean over the batch)."""
    shared: Shared | None = self.hyper_shared
    if shared is None:
        return type(self).__mro__[1].forward(self, x)
    self._check_input_dim(x)
    view = (x.shape[0], -1, *(1,) * (x.dim() - 2))
    track = self.training and self.track_running_stats
    if getattr(self, "hyper_stats", None) == "batch":
        factor = 0.0 if self.momentum is None else self.momentum
        if track and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # a cumulative average
                factor = 1.0 / float(self.num_batches_tracked)
        keep = not self.training or self.track_running_stats
        mean, var = (self.running_mean, self.running_var) if keep else (None, None)
        use_batch = self.training or self.running_mean is None
        y = F.batch_norm(x, mean, var, None, None, use_batch, factor, self.eps)
        return affine(self, shared, y, view)
    if self.training or self.running_mean is None:  # a batch of one: per-sample statistics
        if x.dim() == 2 or x.shape[2:].numel() == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                f"{(1, *x.shape[1:])} per sample: with per-sample statistics every sample is "
                "normalised alone; use batch_norm_stats 'batch' (the default)"
            )
        y = F.instance_norm(x, eps=self.eps)
    else:
        y = F.batch_norm(x, self.running_mean, self.running_var, eps=self.eps)
    if track and self.num_batches_tracked is not None:
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            factor = self.momentum
            if factor is None:
                factor = 1.0 / float(self.num_batches_tracked)
            if self.running_mean is not None:  # two passes: torch.var is slow on short rows
                flat = x.flatten(2)
                mean = flat.mean(-1, keepdim=True)
                var = (flat - mean).square().sum(-1) / (flat.shape[-1] - 1)  # unbiased, as BN
                self.running_mean.mul_(1.0 - factor).add_(mean.squeeze(-1).mean(0), alpha=factor)
                self.running_var.mul_(1.0 - factor).add_(var.mean(0), alpha=factor)
    return affine(self, shared, y, view)


def layer_norm_forward(self: nn.Module, x: Tensor) -> Tensor:
    """forward() of a LayerNorm: normalise, then each sample's own generated weight and bias."""
    shared: Shared | None = self.hyper_shared
    if shared is None:
        return type(self).__mro__[1].forward(self, x)
    x = batch_input(self, shared, x)
    y = F.layer_norm(x, self.normalized_shape, eps=self.eps)
    ones = (1,) * (x.dim() - 1 - len(self.normalized_shape))
    return affine(self, shared, y, (x.shape[0], *ones, *self.normalized_shape))


def embedding_forward(self: nn.Module, ids: Tensor) -> Tensor:
    """forward() of an Embedding: each looked-up row read from its sample's generated table,
    computed for the looked-up entries only (``padding_idx``'s rows without gradient)."""
    shared: Shared | None = self.hyper_shared
    if shared is None:
        return type(self).__mro__[1].forward(self, ids)
    ids = batch_input(self, shared, ids)
    i = self.hyper_layer.weight
    p = shared.generated[i]
    if ids.numel() and (ids.min() < 0 or ids.max() >= p.shape[0]):
        raise IndexError(f"index out of range in self: ids must lie in [0, {p.shape[0]})")
    pos = ids.unsqueeze(-1) * p.shape[1] + torch.arange(p.shape[1], device=ids.device)
    sample = torch.arange(ids.shape[0], device=ids.device).view(-1, *(1,) * (pos.dim() - 1))
    coeff = shared.scales[sample, (p.offset + pos) // shared.chunk_dim]
    raw = torch.addcmul(shared.bg(i)[pos], coeff, shared.g0(i)[pos])
    rows = torch.addcmul(shared.param_shift[i], shared.param_scale[i], raw)
    rows = rows if shared.base is None else shared.base[i][pos] + rows
    if self.padding_idx is None:
        return rows
    # as F.embedding: the padding row's values are read, but get no gradient
    return torch.where((ids == self.padding_idx).unsqueeze(-1), rows.detach(), rows)


def group_norm_forward(self: nn.Module, x: Tensor) -> Tensor:
    """forward() of a GroupNorm: normalise, then each sample's own generated weight and bias."""
    shared: Shared | None = self.hyper_shared
    if shared is None:
        return type(self).__mro__[1].forward(self, x)
    x = batch_input(self, shared, x)
    y = F.group_norm(x, self.num_groups, eps=self.eps)
    return affine(self, shared, y, (x.shape[0], -1, *(1,) * (x.dim() - 2)))


def rms_norm_forward(self: nn.Module, x: Tensor) -> Tensor:
    """forward() of an RMSNorm: normalise, then each sample's own generated weight."""
    shared: Shared | None = self.hyper_shared
    if shared is None:
        return type(self).__mro__[1].forward(self, x)
    x = batch_input(self, shared, x)
    y = F.rms_norm(x, self.normalized_shape, eps=self.eps)
    ones = (1,) * (x.dim() - 1 - len(self.normalized_shape))
    return affine(self, shared, y, (x.shape[0], *ones, *self.normalized_shape))


def elementwise_forward(self: nn.Module, x: Tensor) -> Tensor:
    """forward() of a module that uses its weight elementwise (LlamaRMSNorm, T5LayerNorm): its
    own forward, with each sample's weight shaped ``(batch, 1, ..., D)`` to broadcast."""
    shared: Shared | None = self.hyper_shared
    if shared is None:
        return type(self).__mro__[1].forward(self, x)
    x = batch_input(self, shared, x)
    i = self.hyper_layer.weight
    shape = shared.generated[i].shape
    weight = shared.materialise(i).view(x.shape[0], *(1,) * (x.dim() - 1 - len(shape)), *shape)
    self.hyper_shared = None  # inside, the module's own forward runs
    try:
        return functional_call(self, {"weight": weight}, (x,), tie_weights=False)
    finally:
        self.hyper_shared = shared


def direct_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """forward() of a module whose parameters its forward uses directly, only broadcast
    elementwise into batched tensors (``x + self.pos_embed``): its own forward, with one value
    per sample, shaped to broadcast at the rank the planner saw."""
    shared: Shared | None = self.hyper_shared
    if shared is None:
        return type(self).__mro__[1].forward(self, *args, **kwargs)
    batch, params = shared.scales.shape[0], {}
    for name, i, rank in self.hyper_direct:
        shape = shared.generated[i].shape
        lead = shape[1:] if len(shape) == rank else (*(1,) * (rank - 1 - len(shape)), *shape)
        params[name] = shared.materialise(i).view(batch, *lead)
    self.hyper_shared = None  # inside, the module's own forward runs (its children stay fused)
    try:
        return functional_call(self, params, args, kwargs, tie_weights=False)
    finally:
        self.hyper_shared = shared


def multihead_attention_forward(
    self: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """forward() of an nn.MultiheadAttention (batch first, packed in_proj_weight, no bias_k/v or
    zero attention): the q/k/v projections fused (:func:`fused_product` over in_proj_weight),
    the masks and attention as F.multi_head_attention_forward computes them, ``out_proj`` fused."""
    shared: Shared | None = self.hyper_shared
    if shared is None:
        return type(self).__mro__[1].forward(
            self, query, key, value, key_padding_mask, need_weights, attn_mask,
            average_attn_weights, is_causal,
        )  # fmt: skip
    e, h = self.embed_dim, self.num_heads

    def project(x: Tensor) -> Tensor:  # (batch, len, 3 e): q, k, v
        view = (x.shape[0], *(1,) * (x.dim() - 2), -1)
        return fused_product(self, shared, x, F.linear, x.sum(-1, keepdim=True), view)

    if query is key and key is value:
        q, k, v = project(query).split(e, -1)
    else:
        q, k, v = (
            project(query)[..., :e],
            project(key)[..., e : 2 * e],
            project(value)[..., 2 * e :],
        )
    b, length, source = q.shape[0], q.shape[1], k.shape[1]
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=q.dtype,
    )
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None
    else:
        attn_mask = F._canonical_mask(
            mask=attn_mask,
            mask_name="attn_mask",
            other_type=None,
            other_name="",
            target_type=q.dtype,
            check_other=False,
        )
        is_causal = is_causal and key_padding_mask is None
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)  # (1 or batch x heads, len, source)
    if key_padding_mask is not None:
        padding = key_padding_mask.view(b, 1, 1, source).expand(-1, h, -1, -1)
        padding = padding.reshape(b * h, 1, source)
        attn_mask = padding if attn_mask is None else attn_mask + padding
    if attn_mask is not None:
        attn_mask = attn_mask.view(1 if attn_mask.shape[0] == 1 else b, -1, length, source)
    dropout = self.dropout if self.training else 0.0
    q, k, v = (t.reshape(b, -1, h, e // h).transpose(1, 2) for t in (q, k, v))
    if need_weights:
        scores = (q * math.sqrt(1.0 / float(e // h))) @ k.transpose(-2, -1)
        weights = torch.softmax(scores if attn_mask is None else scores + attn_mask, dim=-1)
        if dropout > 0.0:
            weights = F.dropout(weights, p=dropout)
        out = self.out_proj((weights @ v).transpose(1, 2).reshape(b, length, e))
        return out, weights.mean(dim=1) if average_attn_weights else weights
    out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout, is_causal)
    return self.out_proj(out.transpose(1, 2).reshape(b, length, e)), None


def per_sample_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """forward() of a module run per sample with its own generated tensors materialised."""
    shared: Shared | None = self.hyper_shared
    if shared is None:
        return type(self).__mro__[1].forward(self, *args, **kwargs)
    params = {name: shared.materialise(i) for name, i in self.hyper_params}
    self.hyper_shared = None  # inside, the module's own forward runs
    try:
        batch = shared.scales.shape[0]
        return run_per_sample(self, params, batch, args, kwargs, self.hyper_batched)
    finally:
        self.hyper_shared = shared


def install_fusion(
    target: nn.Module,
    fused: tuple[tuple, ...],
    forwards: dict[str, Any],
    per_sample: tuple[str, ...],
    generated: tuple,
    tied: dict[str, str],
    chunk_dim: int,
    num_embeddings: int,
    batched: dict[str, tuple[bool, ...]] | None = None,
) -> tuple[nn.ModuleList, tuple[nn.Module, ...]]:
    """Swap the forward of fused and per-sample modules (their state and names are unchanged):
    ``forwards[kind]`` for each fused layer (a :class:`FusedLayer` tuple), :func:`per_sample_forward`
    for each module in ``per_sample``, which reads the generated tensors below it (under every
    name, ``tied``) and splits per sample the tensors of its call that ``batched[path]`` flags
    (the generator's probe: positional, then keyword tensors). Returns the index buffers of the
    Linear/Conv layers and the swapped modules."""
    swapped, indices = [], nn.ModuleList()
    for layer in (FusedLayer(*f) for f in fused):
        module = target.get_submodule(layer.path)
        if layer.kind == "direct":  # one entry per parameter; the module is swapped once
            if not hasattr(module, "hyper_direct"):
                forward = {"forward": forwards["direct"]}
                module.__class__ = type(f"Direct{type(module).__name__}", (type(module),), forward)
                module.hyper_direct = ()
                swapped.append(module)
            name = generated[layer.weight].path.rpartition(".")[2]
            module.hyper_direct += ((name, layer.weight, layer.segments),)
            continue
        kind = type(
            f"Fused{type(module).__name__}", (type(module),), {"forward": forwards[layer.kind]}
        )
        module.__class__ = kind
        module.hyper_layer = layer
        if layer.segments:
            indices.append(FusedIndex(layer, generated, chunk_dim, num_embeddings))
            module.hyper_index = (indices[-1],)
        swapped.append(module)
    names = {p.path: i for i, p in enumerate(generated)}
    names.update({alias: names[path] for alias, path in tied.items()})
    for path in per_sample:
        module = target.get_submodule(path)
        forward = {"forward": per_sample_forward}
        module.__class__ = type(f"PerSample{type(module).__name__}", (type(module),), forward)
        prefix = f"{path}." if path else ""
        module.hyper_params = tuple(
            (n[len(prefix) :], i) for n, i in names.items() if n.startswith(prefix)
        )
        module.hyper_batched = (batched or {}).get(path)
        swapped.append(module)
    for module in swapped:
        module.hyper_shared = None
    return indices, tuple(swapped)


# -- Static mode without the flat vector --
# A static forward needs no flat vector: each generated tensor is made from its own chunks, and a
# Linear whose weight rows each fill one chunk never builds its weight (a rank-D product).


class StaticPlan(NamedTuple):
    """What a static call sets on the target, fixed by the layout (:func:`install_static`)."""

    low_rank: tuple[nn.Module, ...]  # the Linear layers computed at rank D
    rows: tuple[tuple[int, int], ...]  # the chunks the other tensors lie in: [first, end) runs
    sizes: tuple[int, ...]  # the generator's output on those rows, split: gap, tensor, gap, ...
    built: tuple[int, ...]  # the tensors those pieces are, in order (indices in the layout)
    slots: tuple[tuple[nn.Module, str, int], ...]  # (owner, attribute, tensor index), aliases too
    generated: tuple  # the layout
    chunk_dim: int
    owner: Tensor  # the tensor every value of the rows' output belongs to (gaps: len(generated))
    cache: dict  # owner and 1 / size per device, made when first asked for


def install_static(
    target: nn.Module,
    low_rank: tuple[tuple[str, int], ...],
    generated: tuple,
    chunk_dim: int,
    tied: dict[str, str],
) -> StaticPlan:
    """Swap the forward of each ``(path, weight index)`` Linear in ``low_rank`` for
    :func:`low_rank_forward` and plan where every other generated tensor comes from."""
    swapped = []
    for path, i in low_rank:
        module = target.get_submodule(path)
        forward = {"forward": low_rank_forward}
        module.__class__ = type(f"LowRank{type(module).__name__}", (type(module),), forward)
        module.hyper_weight, module.hyper_shared = i, None
        swapped.append(module)
    skip = {i for _, i in low_rank}
    spans = []  # (index, first chunk, chunks, start in the first) of the tensors built
    for i, p in enumerate(generated):
        if i not in skip:
            first = p.offset // chunk_dim
            spans.append(
                (i, first, (p.offset + p.size - 1) // chunk_dim - first + 1, p.offset % chunk_dim)
            )
    runs: list[list[int]] = []  # [first, end, start in the block]
    for _, first, count, _ in sorted(spans, key=lambda span: span[1]):
        if runs and first <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], first + count)
        else:
            runs.append(
                [first, first + count, runs[-1][2] + runs[-1][1] - runs[-1][0] if runs else 0]
            )
    starts = sorted(
        ((at + first - run) * chunk_dim + start, i)
        for i, first, _, start in spans
        for run, _, at in [next(r for r in runs if r[0] <= first < r[1])]
    )
    sizes, end = [], 0
    for begin, i in starts:
        sizes += [begin - end, generated[i].size]
        end = begin + generated[i].size
    total = (runs[-1][2] + runs[-1][1] - runs[-1][0]) * chunk_dim if runs else 0
    names = {p.path: i for i, p in enumerate(generated) if i not in skip}
    names.update({alias: names[path] for alias, path in tied.items() if path in names})
    order = {i: n for n, (_, i) in enumerate(starts)}
    slots = []
    for name, i in sorted(names.items(), key=lambda item: order[item[1]]):
        owner, _, leaf = name.rpartition(".")
        slots.append((target.get_submodule(owner), leaf, order[i]))
    sizes = [*sizes, total - end] if runs else []
    built = tuple(i for _, i in starts)
    owner = [len(generated)] * total  # each value of the block: its tensor (gaps: one past)
    at = 0
    for n, size in enumerate(sizes):
        if n % 2:
            owner[at : at + size] = [built[n // 2]] * size
        at += size
    return StaticPlan(
        tuple(swapped),
        tuple((first, end) for first, end, _ in runs),
        tuple(sizes),
        built,
        tuple(slots),
        generated,
        chunk_dim,
        torch.tensor(owner, dtype=torch.long),
        {},
    )


class LowRankInputs(NamedTuple):
    """What a LOW_RANK Linear's :func:`low_rank_forward` reads in a static call."""

    generator: Tensor  # (chunk_dim, embedding_dim): Wg
    rows: Tensor  # (out, embedding_dim): its rows of the table, times its decode scale
    shift: Tensor  # (chunk_dim,): its decode shift + scale * bg
    base: Tensor | None  # --generate delta: its frozen base weight


def low_rank_forward(self: nn.Module, x: Tensor) -> Tensor:
    """forward() of a static Linear whose weight rows each fill one chunk (the plain one outside
    :func:`run_static`). Row ``o`` is ``shift + scale * (Wg E[first + o] + bg)``, so ``W x =
    (scale E_rows) (Wg^T x) + ((shift + scale bg) . x)``: a product of rank D, which the generator
    chose where ``D (in + out) < in out`` (cheaper than building W, for any batch)."""
    inputs: LowRankInputs | None = self.hyper_shared
    if inputs is None:
        return type(self).__mro__[1].forward(self, x)
    y = F.linear(x @ inputs.generator, inputs.rows, self.bias)
    y = y + (x @ inputs.shift).unsqueeze(-1)
    if inputs.base is not None:  # delta: the frozen base's product too
        y = y + F.linear(x, inputs.base)
    return y


def static_values(
    plan: StaticPlan,
    base: tuple[Tensor, ...] | None,
    table: Tensor,
    weight: Tensor,
    bias: Tensor,
    param_scale: Tensor,
    param_shift: Tensor,
) -> tuple[tuple[Tensor, ...], Tensor | None, Tensor | None]:
    """The outputs of :class:`StaticWeights` (and the rows' block and raw output it keeps)."""
    scale, shift = param_scale.unbind(), param_shift.unbind()
    outputs, block, raw = [], None, None
    if plan.rows:
        pieces = [table[first:end] for first, end in plan.rows]
        block = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        raw = F.linear(block, weight, bias).view(-1)
        for i, part in zip(plan.built, raw.split(plan.sizes)[1::2], strict=True):
            value = torch.addcmul(shift[i], part, scale[i])
            value = value if base is None else base[i] + value
            outputs.append(value.view(plan.generated[i].shape))
    for module in plan.low_rank:
        i, p = module.hyper_weight, plan.generated[module.hyper_weight]
        first = p.offset // plan.chunk_dim
        outputs.append(table[first : first + p.shape[0]] * scale[i])
        outputs.append(shift[i] + scale[i] * bias)
    if plan.low_rank:
        outputs.append(weight.view_as(weight))  # Wg itself, for the layers' x Wg
    return tuple(outputs), block, raw


class StaticWeights(torch.autograd.Function):
    """One static weight set, with its backward written out: the plan's tensors (their chunks
    through the linear generator in one product, split once, decoded as :func:`decode` does) and
    every LOW_RANK layer's :class:`LowRankInputs` (:func:`static_values`). The gradient
    multipliers (``scales``: table, generator weight, bias; the decode's ``1 / size``) are
    applied in the backward, so the whole generation is one autograd node instead of some forty
    small ones. A backward that must itself be differentiated (``create_graph=True``) runs
    :func:`static_values` through autograd instead: the reference, second derivatives and all."""

    @staticmethod
    def forward(  # noqa: PLR0913 - autograd passes the tensors one by one
        ctx: Any,
        plan: StaticPlan,
        scales: tuple | None,
        base: tuple[Tensor, ...] | None,
        table: Tensor,
        weight: Tensor,
        bias: Tensor,
        param_scale: Tensor,
        param_shift: Tensor,
    ) -> tuple[Tensor, ...]:
        outputs, block, raw = static_values(
            plan, base, table, weight, bias, param_scale, param_shift
        )
        ctx.plan, ctx.scales, ctx.base = plan, scales, base
        ctx.save_for_backward(table, weight, bias, param_scale, param_shift, block, raw)
        return outputs

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        plan, scales = ctx.plan, ctx.scales
        table, weight, bias, param_scale, param_shift, block, raw = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the reference, through autograd
            inputs = (table, weight, bias, param_scale, param_shift)
            outputs = reference_static_values(plan, scales, ctx.base, *inputs)
            wanted = [x for x in inputs if x.requires_grad]
            found = iter(torch.autograd.grad(outputs, wanted, grads, create_graph=True))
            return None, None, None, *(next(found) if x.requires_grad else None for x in inputs)
        count = len(plan.generated)
        gaps = any(plan.sizes[0::2])  # values of no tensor (owner: one past the last)
        owner, inverse = static_constants(plan, param_scale)
        g_table = torch.zeros_like(table)
        g_weight = grads[-1] if plan.low_rank else torch.zeros_like(weight)
        g_bias = torch.zeros_like(bias)
        g_scale = param_scale.new_zeros(count + gaps)
        g_shift = param_scale.new_zeros(count + gaps)
        if plan.rows:  # the block: d value = g, d raw = scale g, then through the product
            built = grads[: len(plan.built)]
            pieces = [
                built[n // 2].reshape(-1) if n % 2 else raw.new_zeros(size)
                for n, size in enumerate(plan.sizes)
                if size
            ]
            g_value = torch.cat(pieces)
            g_scale.index_add_(0, owner, g_value * raw)
            g_shift.index_add_(0, owner, g_value)
            padded = torch.cat([param_scale, param_scale.new_zeros(1)]) if gaps else param_scale
            scale_at = padded.index_select(0, owner)  # gaps belong to no tensor: scale 0
            g_raw = (g_value * scale_at).view(-1, weight.shape[0])
            g_block = g_raw @ weight
            at = 0
            for first, end in plan.rows:
                g_table[first:end] = g_block[at : at + end - first]
                at += end - first
            g_weight = g_weight + g_raw.t() @ block
            g_bias = g_bias + g_raw.sum(0)
        low = grads[len(plan.built) :]
        for n, module in enumerate(plan.low_rank):
            i, p = module.hyper_weight, plan.generated[module.hyper_weight]
            g_rows, g_u = low[2 * n], low[2 * n + 1]
            first = p.offset // plan.chunk_dim
            rows = table[first : first + p.shape[0]]
            g_table[first : first + p.shape[0]] = g_rows * param_scale[i]
            g_scale[i] += (g_rows * rows).sum() + g_u @ bias
            g_shift[i] += g_u.sum()
            g_bias = g_bias + param_scale[i] * g_u
        if gaps:
            g_scale, g_shift = g_scale[:count], g_shift[:count]
        if scales is not None:  # the table's is None where an own embedding applies its own
            g_table = g_table if scales[0] is None else g_table * scales[0]
            g_weight, g_bias = g_weight * scales[1], g_bias * scales[2]
            g_scale, g_shift = g_scale * inverse, g_shift * inverse
        return None, None, None, g_table, g_weight, g_bias, g_scale, g_shift


def reference_static_values(
    plan: StaticPlan, scales: tuple | None, base: tuple[Tensor, ...] | None, *inputs: Tensor
) -> tuple[Tensor, ...]:
    """:class:`StaticWeights`' outputs through autograd, the multipliers by :func:`scale_grad`:
    what its written-out backward must equal, and what runs where that backward does not."""
    _, inverse = static_constants(plan, inputs[3])
    factors = (None,) * 5 if scales is None else (*scales, inverse, inverse)
    scaled = [scale_grad(x, f) for x, f in zip(inputs, factors, strict=True)]
    return static_values(plan, base, *scaled)[0]


def static_constants(plan: StaticPlan, like: Tensor) -> tuple[Tensor, Tensor]:
    """The plan's owner index and every tensor's ``1 / size`` on ``like``'s device, kept after
    the first call (not while torch.compile traces: it may not write the cache)."""
    key = (like.device, like.dtype)
    found = plan.cache.get(key)
    if found is None:
        inverse = torch.tensor([1.0 / p.size for p in plan.generated], dtype=like.dtype)
        found = (plan.owner.to(like.device), inverse.to(like.device))
        if not torch.compiler.is_compiling():
            plan.cache[key] = found
    return found


def run_static(
    hypernetwork: nn.Module,
    args: tuple,
    kwargs: dict,
    gradient_scale: tuple | None = None,
    table: Tensor | None = None,
    delta: bool = False,
) -> Any:
    """The target with one generated weight set and no flat vector: every tensor from its own
    chunks (:class:`StaticWeights`), set as a plain attribute for the call as functional_call
    does for names the target does not hold; the ``low_rank`` layers' weights never built.
    ``table``: what a template's own embedding module returns (default: the built-in table,
    its gradient multiplier applied here); ``delta``: every tensor is the ``base`` buffer's
    values plus the generated ones."""
    plan: StaticPlan = hypernetwork.static_plan
    generator = hypernetwork.weight_generator.linear
    if table is None:
        table = hypernetwork.embedding_module.weight
    elif gradient_scale is not None:  # the embedding module's forward applies its own
        gradient_scale = (None, *gradient_scale[1:])
    base = None
    if delta:
        flat = hypernetwork.base
        base = tuple(flat[p.offset : p.offset + p.size] for p in plan.generated)
    inputs = (
        table,
        generator.weight,
        generator.bias,
        hypernetwork.param_scale,
        hypernetwork.param_shift,
    )
    if torch.is_autocast_enabled(table.device.type):  # the backward's dtypes: autograd's
        values = reference_static_values(plan, gradient_scale, base, *inputs)
    else:
        values = StaticWeights.apply(plan, gradient_scale, base, *inputs)
    low = values[len(plan.built) :]
    try:  # setattr: a module may watch its names (nn.RNN's _flat_weights)
        for module, leaf, n in plan.slots:
            setattr(module, leaf, values[n])
        for n, module in enumerate(plan.low_rank):
            i = module.hyper_weight
            weight = None if base is None else base[i].view(plan.generated[i].shape)
            module.hyper_shared = LowRankInputs(low[-1], low[2 * n], low[2 * n + 1], weight)
        return hypernetwork.target(*args, **kwargs)
    finally:
        for module, leaf, _ in plan.slots:
            module.__dict__.pop(leaf, None)
        for module in plan.low_rank:
            module.hyper_shared = None


# -- Adapters on a frozen base (--generate delta / lora) --


def load_checkpoint(path: str) -> dict[str, Tensor]:
    """A checkpoint's tensors: a ``.safetensors`` file, or a torch state dict (``torch.save``)."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


@torch.no_grad()
def apply_base(target_network: nn.Module, state: dict[str, Tensor], paths: list[str]) -> None:
    """Copy a checkpoint's values into the target: every entry it has of the target's state, and
    it must have ``paths`` (the base of what is adapted)."""
    missing = [p for p in paths if p not in state]
    if missing:
        raise ValueError(
            f"the base checkpoint has no {missing[0]!r} (and {len(missing) - 1} more); give a "
            "checkpoint of this target (its state_dict)"
        )
    for name, tensor in target_network.state_dict(keep_vars=True).items():
        if name not in state:
            continue
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(
                f"the base checkpoint's {name!r} has shape {tuple(state[name].shape)}, the target's "
                f"is {tuple(tensor.shape)}; give a checkpoint of this target"
            )
        tensor.copy_(state[name])


def zero_output(module: nn.Module) -> None:
    """Zero the last Linear layer of ``module`` (weight and bias): ``--generate delta``'s weight
    generator starts with output 0, so every delta starts at exactly 0 and that layer's first
    gradients are nonzero."""
    last = [m for m in module.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
