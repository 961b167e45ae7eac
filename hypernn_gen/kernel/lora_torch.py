"""LoRA hypernetworks for Torch: the target-independent code of runtime and generated files.

The target stays frozen. For each adapted ``nn.Linear`` ``j`` (an :class:`Adapter`; also
transformers' ``Conv1D`` and ``nn.Conv2d``, whose ``A`` is a convolution like the layer's) the
hypernetwork generates ``A_j (rank, in)`` and ``B_j (out, rank)``, and the layer computes
``W x + b + (alpha / rank) * B_j (A_j dropout(x))`` (PEFT's LoRA). Static mode makes one adapter
set; dynamic mode one per sample, computed with batched products (``bmm``), never forming
``batch x out x in`` weights.

One shared generator makes every layer's adapter (Ha et al.'s layer embeddings z_j, as in
Text-to-LoRA): the embedding of layer ``j`` for condition ``c`` is
``layer_norm(c + depth[d_j] + kind[k_j])`` (``d_j`` its block index, ``k_j`` its module type),
and one pair of output heads per module type maps it to ``A_j`` and ``B_j``. ``c`` is a learned
vector (static) or an MLP of the sample's condition (dynamic). With ``shared=False`` every layer
gets its own heads, from ``layer_norm(c)``. The ``B`` heads start at zero, so the hypernetwork
starts exactly at the base model and the heads get nonzero gradients at once; the ``A`` heads
start at PEFT's scale for ``A`` (std ``1 / sqrt(3 * in)``).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .torch import apply_base, load_checkpoint


class Adapter(NamedTuple):
    """One adapted Linear layer: its module path, its shape, block index and module type;
    ``transposed``: its weight is ``(in, out)`` (transformers' ``Conv1D``, GPT-2's layers)."""

    path: str
    out_features: int
    in_features: int
    depth: int
    kind: int
    transposed: bool = False


def check_adapters(target_network: nn.Module, adapters: Sequence[Adapter]) -> None:
    """Refuse a target whose adapted layers differ from the ones the adapters were made for."""
    for a in adapters:
        try:
            module = target_network.get_submodule(a.path)
        except AttributeError:
            module = None
        weight = getattr(module, "weight", None)
        shape = tuple(getattr(weight, "shape", ()))
        if a.transposed:  # a Conv1D: its weight is (in, out)
            fits = type(module).__name__ == "Conv1D" and shape == (a.in_features, a.out_features)
            what = f"Conv1D({a.out_features}, {a.in_features})"
        elif isinstance(module, nn.Conv2d):  # A is (rank, in * kh * kw), like its weight's rows
            fits = shape[:1] == (a.out_features,) and math.prod(shape[1:]) == a.in_features
            fits = fits and module.groups == 1 and module.padding_mode == "zeros"
            what = f"nn.Conv2d({a.out_features} out, {a.in_features} in x window, groups 1)"
        else:
            fits = isinstance(module, nn.Linear) and shape == (a.out_features, a.in_features)
            what = f"nn.Linear({a.in_features}, {a.out_features})"
        if not fits:
            raise ValueError(
                f"this target's layer {a.path!r} is not the {what} the adapters were made for; "
                "regenerate the file for the new target"
            )


def lora_forward(self: nn.Module, x: Tensor) -> Tensor:
    """forward() of an adapted Linear: its own output plus ``scaling * B (A dropout(x))``, with one
    adapter (``A (rank, in)``) or one per sample (``A (batch, rank, in)``: batched products)."""
    y = type(self).__mro__[1].forward(self, x)
    lora = self.hyper_lora
    if lora is None:
        return y
    a, b, scaling, dropout = lora
    h = dropout(x)
    a, b = a.to(h.dtype), b.to(h.dtype)
    if isinstance(self, nn.Conv2d):
        return y + scaling * conv2d_lora(self, h, a, b)
    if a.dim() == 2:
        return y + scaling * F.linear(F.linear(h, a), b)
    if h.dim() < 2 or h.shape[0] != a.shape[0]:
        raise ValueError(
            f"{a.shape[0]} adapter sets but a LoRA layer got input {tuple(h.shape)}; in dynamic "
            "mode every adapted layer's input must carry the batch first"
        )
    h = h.reshape(a.shape[0], -1, h.shape[-1])  # (batch, tokens, in)
    u = torch.bmm(torch.bmm(h, a.transpose(1, 2)), b.transpose(1, 2))  # (batch, tokens, out)
    return y + scaling * u.view(y.shape)


def conv2d_lora(module: nn.Conv2d, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``B (A * x)`` of an adapted Conv2d (PEFT's: ``A`` a convolution like the layer's with
    ``rank`` output channels, ``B`` a 1x1 one), one adapter or one per sample: a grouped
    convolution over the batch, never per-sample weights of the layer's size."""
    window, rank = module.kernel_size, a.shape[-2]
    conv = {"stride": module.stride, "padding": module.padding, "dilation": module.dilation}
    if a.dim() == 2:
        u = F.conv2d(x, a.view(rank, -1, *window), **conv)
        return F.conv2d(u, b[:, :, None, None])
    n = a.shape[0]
    if x.dim() != 4 or x.shape[0] != n:
        raise ValueError(
            f"{n} adapter sets but a LoRA Conv2d got input {tuple(x.shape)}; in dynamic mode "
            "every adapted layer's input must carry the batch first"
        )
    weight = a.reshape(n * rank, -1, *window)
    u = F.conv2d(x.reshape(1, -1, *x.shape[2:]), weight, groups=n, **conv)
    return torch.einsum("brhw,bor->bohw", u.view(n, rank, *u.shape[2:]), b)


def install_lora(target_network: nn.Module, adapters: Sequence[Adapter]) -> tuple[nn.Module, ...]:
    """Freeze the whole target and give each adapted Linear :func:`lora_forward` (state and
    names unchanged). Returns the adapted modules, in adapter order."""
    target_network.requires_grad_(False)
    modules = []
    for a in adapters:
        module = target_network.get_submodule(a.path)
        kind = type(f"LoRA{type(module).__name__}", (type(module),), {"forward": lora_forward})
        module.__class__ = kind
        module.hyper_lora = None
        modules.append(module)
    return tuple(modules)


class LoRAGenerator(nn.Module):
    """Makes every adapter's ``A`` and ``B`` from a condition: ``generate()`` (static) or
    ``generate(condition)`` (dynamic, ``(batch, *condition_shape)``) -> ``{path.lora_A: A,
    path.lora_B: B}``, with a leading batch dimension in dynamic mode."""

    def __init__(
        self,
        adapters: Sequence[Adapter],
        rank: int,
        embedding_dim: int,
        condition_shape: tuple[int, ...] | None = None,
        embedding_hidden: Sequence[int] = (64,),
        generator_hidden: Sequence[int] = (),
        shared: bool = True,
    ) -> None:
        super().__init__()
        self.adapters, self.rank, self.shared = tuple(adapters), rank, shared
        self.condition_shape = condition_shape
        if condition_shape is None:
            self.condition = nn.Parameter(torch.randn(embedding_dim))
        else:
            layers: list[nn.Module] = []
            width = math.prod(condition_shape)
            for hidden in embedding_hidden:
                layers += [nn.Linear(width, hidden), nn.ReLU()]
                width = hidden
            self.condition_net = nn.Sequential(*layers, nn.Linear(width, embedding_dim))
        if shared:
            depths = 1 + max(a.depth for a in self.adapters)
            self.depth = nn.Parameter(torch.randn(depths, embedding_dim))
            self.kind = nn.Parameter(
                torch.randn(1 + max(a.kind for a in self.adapters), embedding_dim)
            )
        trunk: list[nn.Module] = []
        width = embedding_dim
        for hidden in generator_hidden:
            trunk += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.trunk = nn.Sequential(*trunk)
        # one pair of heads per group: a module type (shared) or a layer
        groups = [a.kind if shared else j for j, a in enumerate(self.adapters)]
        self.groups = tuple(
            tuple(j for j, g in enumerate(groups) if g == group) for group in dict.fromkeys(groups)
        )
        first = [self.adapters[members[0]] for members in self.groups]
        self.heads_a = nn.ModuleList(nn.Linear(width, rank * a.in_features) for a in first)
        self.heads_b = nn.ModuleList(nn.Linear(width, a.out_features * rank) for a in first)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise again (same order of random draws as ``__init__``)."""
        if self.condition_shape is None:
            self.condition.normal_()
        else:
            for layer in self.condition_net[::2]:
                layer.reset_parameters()
        if self.shared:
            self.depth.normal_()
            self.kind.normal_()
        for layer in self.trunk[::2]:  # He-normal: unit-variance input stays so through ReLU
            layer.weight.normal_(0.0, math.sqrt(2.0 / layer.in_features))
            layer.bias.zero_()
        for members, head_a, head_b in zip(self.groups, self.heads_a, self.heads_b, strict=True):
            in_features = self.adapters[members[0]].in_features
            std = 1.0 / math.sqrt(
                3.0 * in_features * head_a.in_features
            )  # PEFT's A: U(+-1/sqrt(in))
            head_a.weight.normal_(0.0, std)
            head_a.bias.zero_()
            head_b.weight.zero_()  # B = 0: the output starts exactly at the base model
            head_b.bias.zero_()

    def embed(self, condition: Tensor | None = None) -> Tensor:
        """The condition's embedding, ``(embedding_dim,)`` or ``(batch, embedding_dim)``."""
        if self.condition_shape is None:
            return self.condition
        if condition is None or condition.dim() == 0:
            raise ValueError("dynamic mode needs a condition: pass condition=... (or an input)")
        if condition[0].numel() != math.prod(self.condition_shape):
            raise ValueError(
                f"the condition has shape {tuple(condition.shape)}, these adapters were made for "
                f"(batch, *{self.condition_shape}); pass condition=... to forward"
            )
        weight = self.condition_net[-1].weight
        return self.condition_net(condition.flatten(1).to(weight.dtype))

    def forward(self, condition: Tensor | None = None) -> dict[str, Tensor]:
        c = self.embed(condition)
        n = len(self.adapters)
        if self.shared:
            depth = self.depth[[a.depth for a in self.adapters]]
            kind = self.kind[[a.kind for a in self.adapters]]
            e = c.unsqueeze(-2) + (depth + kind)  # (..., adapters, embedding_dim)
        else:
            e = c.unsqueeze(-2).expand(*c.shape[:-1], n, c.shape[-1])
        h = self.trunk(F.layer_norm(e, e.shape[-1:]))
        out: dict[str, Tensor] = {}
        for members, head_a, head_b in zip(self.groups, self.heads_a, self.heads_b, strict=True):
            hm = h[..., list(members), :]  # one product per group for all its layers
            a_all, b_all = head_a(hm), head_b(hm)
            for i, j in enumerate(members):
                a = self.adapters[j]
                out[f"{a.path}.lora_A"] = a_all[..., i, :].unflatten(-1, (self.rank, a.in_features))
                out[f"{a.path}.lora_B"] = b_all[..., i, :].unflatten(
                    -1, (a.out_features, self.rank)
                )
        return {k: out[k] for a in self.adapters for k in (f"{a.path}.lora_A", f"{a.path}.lora_B")}


class LoRAHyperModule(nn.Module):
    """A frozen copy of ``target_network`` with generated LoRA adapters on ``adapters``.

    ``forward(*inputs, condition=None, adapters=None, **kwargs)`` returns ``(output, adapters)``,
    ``adapters`` the generated ``{path.lora_A: A, path.lora_B: B}`` (dynamic: one per sample;
    the condition defaults to the first input). ``base``: a checkpoint (path or state dict), loaded
    into the frozen copy (default: the target's own weights).
    """

    def __init__(
        self,
        target_network: nn.Module,
        adapters: Sequence[Adapter],
        *,
        rank: int,
        alpha: float,
        dropout: float,
        embedding_dim: int,
        condition_shape: tuple[int, ...] | None = None,
        embedding_hidden: Sequence[int] = (64,),
        generator_hidden: Sequence[int] = (),
        shared: bool = True,
        base: str | dict[str, Tensor] | None = None,
    ) -> None:
        super().__init__()
        check_adapters(target_network, adapters)
        self.adapters, self.rank, self.alpha = tuple(adapters), rank, alpha
        self.scaling, self.dynamic = alpha / rank, condition_shape is not None
        self.generator = LoRAGenerator(
            adapters,
            rank,
            embedding_dim,
            condition_shape,
            embedding_hidden,
            generator_hidden,
            shared,
        )
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout else nn.Identity()
        self.target = copy.deepcopy(target_network)
        self.adapted = install_lora(self.target, self.adapters)
        if base is not None:  # the frozen base from a checkpoint: all of the target's parameters
            base = load_checkpoint(base) if isinstance(base, str) else base
            apply_base(self.target, base, [name for name, _ in self.target.named_parameters()])

    def generate_adapters(self, condition: Tensor | None = None) -> dict[str, Tensor]:
        """``{path.lora_A: A, path.lora_B: B}`` for one condition set (static: the only one)."""
        return self.generator(condition)

    def forward(
        self,
        *args: Any,
        condition: Tensor | None = None,
        adapters: dict[str, Tensor] | None = None,
        **kwargs: Any,
    ) -> tuple[Any, dict[str, Tensor]]:
        """Run the frozen target with the adapters; returns ``(output, adapters)``."""
        if adapters is None:
            if self.dynamic and condition is None and args:
                condition = args[0]
            adapters = self.generate_adapters(condition)
        for module, a in zip(self.adapted, self.adapters, strict=True):
            lora_a, lora_b = adapters[f"{a.path}.lora_A"], adapters[f"{a.path}.lora_B"]
            module.hyper_lora = (lora_a, lora_b, self.scaling, self.dropout)
        try:
            return self.target(*args, **kwargs), adapters
        finally:
            for module in self.adapted:
                module.hyper_lora = None

    # -- export ---------------------------------------------------------------------------------

    @torch.no_grad()
    def single_adapters(self, condition: Tensor | None = None) -> dict[str, Tensor]:
        """The adapters of one condition (dynamic: one sample, with or without its batch of 1)."""
        if not self.dynamic:
            return {k: v.detach() for k, v in self.generate_adapters().items()}
        if condition is None:
            raise ValueError(
                "a dynamic hypernetwork exports the adapters of one condition: pass it"
            )
        one = condition.reshape(1, -1).to(self.generator.condition_net[-1].weight.device)
        return {k: v[0].detach() for k, v in self.generate_adapters(one).items()}

    def peft_state_dict(self, condition: Tensor | None = None) -> dict[str, Tensor]:
        """The adapters of one condition under PEFT's key names."""
        adapters = self.single_adapters(condition)
        out = {}
        for a in self.adapters:  # a Conv2d's: A (rank, in, kh, kw), B (out, rank, 1, 1)
            weight = self.target.get_submodule(a.path).weight
            lora_a, lora_b = adapters[f"{a.path}.lora_A"], adapters[f"{a.path}.lora_B"]
            if weight.dim() == 4:
                lora_a, lora_b = lora_a.view(-1, *weight.shape[1:]), lora_b[:, :, None, None]
            out[f"base_model.model.{a.path}.lora_A.weight"] = lora_a.contiguous()
            out[f"base_model.model.{a.path}.lora_B.weight"] = lora_b.contiguous()
        return out

    def peft_config(self) -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` for these adapters."""
        dropout = self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0
        return {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": None,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": dropout,
            "target_modules": [a.path for a in self.adapters],
            "bias": "none",
            "fan_in_fan_out": any(a.transposed for a in self.adapters),
            "inference_mode": True,
            "init_lora_weights": True,
            "modules_to_save": None,
            "use_rslora": False,
        }

    def save_peft(self, directory: str | Path, condition: Tensor | None = None) -> Path:
        """Write the adapters of one condition as a PEFT LoRA (``adapter_model.safetensors`` and
        ``adapter_config.json``): ``PeftModel.from_pretrained(base, directory)`` loads it."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.cpu() for k, v in self.peft_state_dict(condition).items()}
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        text = json.dumps(self.peft_config(), indent=2, sort_keys=True) + "\n"
        (out / "adapter_config.json").write_text(text)
        return out

    @torch.no_grad()
    def merged_state_dict(self, condition: Tensor | None = None) -> dict[str, Tensor]:
        """The target's state dict with each adapted weight ``W + scaling * B @ A`` (one
        condition): load it into a plain target to run it without the hypernetwork."""
        adapters = self.single_adapters(condition)
        state = {k: v.detach().clone() for k, v in self.target.state_dict().items()}
        for a in self.adapters:
            delta = adapters[f"{a.path}.lora_B"] @ adapters[f"{a.path}.lora_A"]
            delta = delta.T if a.transposed else delta  # a Conv1D's weight is (in, out)
            weight = state[f"{a.path}.weight"]
            delta = (self.scaling * delta).view(weight.shape)  # a Conv2d's: (out, in, kh, kw)
            state[f"{a.path}.weight"] = weight + delta.to(weight.dtype)
        return state
