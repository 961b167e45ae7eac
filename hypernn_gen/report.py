"""What ``hypernn-gen inspect`` prints: a layout as a readable table, or as JSON.

The table lists every tensor of the target (path, shape, dtype, count, offset in the flat
generated vector, role, initial distribution and its source, tied aliases), then totals: the
generated parameter count, the state values, the flat size, the default chunking and the size of
the default hypernetwork that would generate the target. For a target with a fusion plan
(:mod:`hypernn_gen.fuse`), a last section says which layers a generated dynamic file computes on
the whole batch and which run per sample, and why.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from .fuse import TRANSPOSED_KINDS, FusionPlan
from .layout import Chunking, Layout, TensorSpec
from .load import LoadedTarget

__all__ = [
    "DEFAULT_EMBEDDING_DIM",
    "format_fusion",
    "format_layout",
    "fusion_dict",
    "hypernetwork_param_count",
    "layout_json",
]

#: embedding dimension of the default hypernetwork (``--embedding-dim`` of the generator).
DEFAULT_EMBEDDING_DIM = 32


def hypernetwork_param_count(
    layout: Layout,
    chunking: Chunking,
    *,
    embedding_dim: int = DEFAULT_EMBEDDING_DIM,
) -> int:
    """Parameters of the default hypernetwork: ``N*D + D*C + C + 2*T``.

    ``N`` embeddings of dimension ``D`` feed one linear weight generator ``D -> C`` (with a bias
    of ``C``), and each of the ``T`` generated tensors has a learnable scale and shift.
    """
    n, c, d = chunking.num_embeddings, chunking.chunk_dim, embedding_dim
    return n * d + d * c + c + 2 * len(layout.generated)


def layout_json(layout: Layout, chunking: Chunking, fusion: FusionPlan | str | None = None) -> str:
    """``layout.to_dict()`` plus ``"chunking"`` (and ``"fusion"``) entries, as indented JSON."""
    hyper = hypernetwork_param_count(layout, chunking)
    data = layout.to_dict()
    data["chunking"] = {
        "num_embeddings": chunking.num_embeddings,
        "chunk_dim": chunking.chunk_dim,
        "total": chunking.total,
        "embedding_dim": DEFAULT_EMBEDDING_DIM,
        "hypernetwork_params": hyper,
        "compression": round(layout.num_generated / hyper, 4),
    }
    if fusion is not None:
        data["fusion"] = fusion_dict(fusion)
    return json.dumps(data, indent=2)


def fusion_dict(fusion: FusionPlan | str) -> dict:
    """What a generated dynamic file fuses, as JSON data (a string: why there is no plan)."""
    if isinstance(fusion, str):
        return {"error": fusion}
    data = {
        "fused": [
            {"path": f.path, "kind": f.kind, "segments": f.segments, "broadcast": f.broadcast}
            for f in fusion.fused
        ],
        "per_sample": [{"path": path, "why": why} for path, why in fusion.reasons],
    }
    if fusion.routes:
        data["modules"] = [
            {"path": path, "route": route, "detail": detail}
            for path, route, detail in fusion.routes
        ]
    return data


def format_layout(
    loaded: LoadedTarget,
    layout: Layout,
    chunking: Chunking,
    fusion: FusionPlan | str | None = None,
    delta: bool = False,
) -> str:
    """The ``inspect`` report: header, tensor table, totals, notes and the fusion plan
    (``delta``: ``--generate delta``, each fused layer also runs its frozen base)."""
    inputs = ", ".join(f"{spec.shape} {spec.dtype}" for spec in loaded.input_specs)
    lines = _columns(
        [
            ["target", loaded.display],
            ["framework", f"{loaded.framework} ({loaded.kind} {layout.target_name})"],
            ["inputs", inputs or "none"],
        ],
        right=(),
    )
    lines.append("")
    lines += _columns(
        [["path", "shape", "dtype", "count", "offset", "role", "init", "source", "tied"]]
        + [_row(t) for t in layout.tensors],
        right=(3, 4),
    )
    lines.append("")
    lines += _totals(layout, chunking)
    if layout.notes:
        lines += ["", "notes:"] + [f"  - {note}" for note in layout.notes]
    if fusion is not None:
        lines += ["", *format_fusion(fusion, layout, chunking, delta)]
    return "\n".join(lines)


#: How ``inspect`` names each route of :attr:`FusionPlan.routes`.
ROUTES = {
    "fused": "fused",
    "whole batch": "whole batch",
    "per sample": "per sample (vmap)",
    "inside": "per sample (vmap)",
}


def predicted_products(
    plan: FusionPlan, layout: Layout, chunking: Chunking, delta: bool = False
) -> float | None:
    """The shared products of the fused Linear/Conv layers per product of the target's own:
    S + 1 per layer (S segments and the generator's bias), or, in Torch, where every row lies in
    one chunk from a chunk boundary (and the rows are the outputs: not a transposed weight), 1 and
    one shared row per chunk's worth of rows (``k = C // row`` rows: 1 + k / out); ``delta``: one
    more per layer, the frozen base's own product (``W x + D_b x``)."""
    generated, c = layout.generated, chunking.chunk_dim
    total = cost = 0.0
    for f in plan.fused:
        if not f.segments or f.weight is None:
            continue
        t = generated[f.weight]
        row = t.size // t.shape[0] if layout.framework == "torch" else t.shape[-1]
        aligned = t.offset % c == 0 and c % row == 0 and f.kind not in TRANSPOSED_KINDS
        if layout.framework == "torch" and aligned:
            per_chunk = c // row
            cost += t.size * (2.0 if per_chunk > 1 else 1.0 + 1.0 / t.shape[0])
        else:
            cost += t.size * (f.segments + 1)
        total += t.size
        cost += t.size if delta else 0.0
    return cost / total if total else None


def format_fusion(
    plan: FusionPlan | str,
    layout: Layout | None = None,
    chunking: Chunking | None = None,
    delta: bool = False,
) -> list[str]:
    """Which path every module takes in a generated dynamic file: fused (its batched form, no
    per-sample weights), on the whole batch (no generated tensors), or per sample under vmap,
    with the kind or the reason, one module per line (a string: why dynamic mode is refused),
    and with the layout, the :func:`predicted_products` of the fused layers."""
    if isinstance(plan, str):
        return [f"dynamic mode: not supported: {plan}"]
    if plan.routes:
        rows = [
            [path or "<root>", ROUTES[route], f"inside {detail}" if route == "inside" else detail]
            for path, route, detail in plan.routes
        ]
    else:  # Flax plans list the fused layers and the per-sample ones only
        rows = [
            [f.path or "<root>", "fused", f.kind + (f" (S={f.segments})" if f.segments else "")]
            for f in plan.fused
        ]
        rows += [[path or "<root>", "per sample", why] for path, why in plan.reasons]
    if not rows:
        return ["dynamic mode: no layer owns generated tensors"]
    header = "dynamic mode: the target runs once on the whole batch; per-sample modules alone, vmap"
    if rows[0][:2] == ["<root>", ROUTES["per sample"]]:
        header = "dynamic mode: every sample runs through the whole target alone (vmap)"
    lines = [header, *("  " + line for line in _columns(rows, right=()))]
    ratio = (
        None
        if layout is None or chunking is None
        else predicted_products(plan, layout, chunking, delta)
    )
    if ratio is not None:
        each = "S + 2 each: the frozen base's too" if delta else "S + 1 each"
        whole = "about 2" if delta else "about 1"
        lines.append(
            f"  predicted cost: {ratio:.2f}x the target's products in the fused Linear/Conv "
            f"layers ({each}; {whole} where chunks hold whole rows)"
        )
    return lines


def _row(t: TensorSpec) -> list[str]:
    role = "generated" if t.generated else f"state ({t.reason})" if t.reason else "state"
    floating = t.dtype.startswith(("float", "bfloat"))
    if not floating:
        init, source = "-", "-"
    elif t.init_std == 0:
        init, source = f"const {t.init_mean:g}", t.init_source
    else:
        init, source = f"N({t.init_mean:.3g}, {t.init_std:.3g})", t.init_source
    return [
        t.path,
        str(t.shape),
        t.dtype,
        f"{t.size:,}",
        f"{t.offset:,}" if t.generated else "-",
        role,
        init,
        source,
        ", ".join(".".join(map(str, a)) for a in t.aliases),
    ]


def _totals(layout: Layout, chunking: Chunking) -> list[str]:
    generated, state = layout.generated, layout.state
    hyper = hypernetwork_param_count(layout, chunking)
    n, c, d = chunking.num_embeddings, chunking.chunk_dim, DEFAULT_EMBEDDING_DIM
    padding = chunking.total - layout.num_generated
    return _columns(
        [
            ["generated parameters", f"{layout.num_generated:,}", _tensors(len(generated))],
            ["state values", f"{layout.num_state:,}", _tensors(len(state))],
            ["flat size", f"{layout.flat_size:,}", ""],
            [
                "default chunking",
                f"{chunking.total:,}",
                f"{n:,} embeddings x {c:,} values ({padding:,} padding)",
            ],
            [
                f"hypernetwork (D={d})",
                f"{hyper:,}",
                f"parameters = {n}*{d} + {d}*{c} + {c} + 2*{len(generated)}",
            ],
            [
                "compression",
                f"{layout.num_generated / hyper:.2f}x",
                "generated parameters per hypernetwork parameter",
            ],
        ],
        right=(1,),
    )


def _tensors(count: int) -> str:
    return f"in {count} tensor{'s' if count != 1 else ''}"


def _columns(rows: Sequence[Sequence[str]], *, right: Sequence[int]) -> list[str]:
    """Align ``rows`` in columns two spaces apart; ``right`` lists right-aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]
