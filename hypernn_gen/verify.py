"""Check rendered source with libcst, then format it (black in-process, or ruff).

Parsing comes first so that a template bug is reported against the template, with the
offending rendered line, before a formatter's less helpful message.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from collections.abc import Iterable

import black
import libcst as cst

from .errors import GenerationError

__all__ = ["FORMATTERS", "check_source", "dedupe_imports", "format_source", "template_clashes"]

FORMATTERS = ("black", "ruff")
LINE_LENGTH = 100


def check_source(source: str, *, template: str) -> cst.Module:
    """Parse ``source``; a syntax error names the template and shows the rendered line."""
    try:
        return cst.parse_module(source)
    except cst.ParserSyntaxError as exc:
        lines = source.splitlines()
        shown = lines[exc.raw_line - 1].strip() if 0 < exc.raw_line <= len(lines) else ""
        raise GenerationError(
            f"template {template} rendered invalid Python at line {exc.raw_line} "
            f"({exc.message}): {shown!r}; fix the template"
        ) from exc


def format_source(source: str, *, formatter: str = "black") -> str:
    """Format with black (in-process) or ``ruff format`` (subprocess)."""
    if formatter == "black":
        mode = black.Mode(line_length=LINE_LENGTH, target_versions={black.TargetVersion.PY310})
        try:
            return black.format_str(source, mode=mode)
        except black.InvalidInput as exc:  # pragma: no cover - check_source catches these first
            raise GenerationError(f"black could not format the generated source: {exc}") from exc
    if formatter == "ruff":
        ruff = shutil.which("ruff")
        if ruff is None:
            raise GenerationError(
                "--formatter ruff needs ruff on PATH; install it with `pip install ruff` or use "
                "--formatter black"
            )
        proc = subprocess.run(
            [ruff, "format", "--line-length", str(LINE_LENGTH), "--stdin-filename", "gen.py", "-"],
            input=source,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode:
            raise GenerationError(f"ruff format failed: {proc.stderr.strip().splitlines()[0]}")
        return proc.stdout
    raise GenerationError(f"unknown formatter {formatter!r}; choose one of {', '.join(FORMATTERS)}")


def dedupe_imports(module: cst.Module) -> cst.Module:
    """Drop top-level imports that bind a name exactly as an earlier import already did.

    Templates import what they need and the copied target code brings its own imports; the two
    often overlap (``import torch``), and a generated file should import each thing once.
    """
    seen: set[tuple[str, str, str]] = set()
    body: list[cst.CSTNode] = []
    for stmt in module.body:
        if not (
            isinstance(stmt, cst.SimpleStatementLine)
            and all(isinstance(s, (cst.Import, cst.ImportFrom)) for s in stmt.body)
        ):
            body.append(stmt)
            continue
        smalls = []
        for small in stmt.body:
            if isinstance(small.names, cst.ImportStar):
                smalls.append(small)
                continue
            source = ""
            if isinstance(small, cst.ImportFrom):
                dots = "." * len(small.relative)
                source = dots + (module.code_for_node(small.module) if small.module else "")
            keep = []
            for alias in small.names:
                name = module.code_for_node(alias.name)
                asname = module.code_for_node(alias.asname.name) if alias.asname else ""
                key = (source, name, asname)
                if key not in seen:
                    seen.add(key)
                    keep.append(alias.with_changes(comma=cst.MaybeSentinel.DEFAULT))
            if keep:
                smalls.append(small.with_changes(names=keep))
        if smalls:
            body.append(stmt.with_changes(body=smalls))
    return module.with_changes(body=body)


def _bindings(module: cst.Module) -> tuple[Counter[str], set[str]]:
    """Module-level names bound by definitions/assignments (counted) and by imports (a set).

    Statements under a top-level ``if``/``try``/``with`` count as module level too.
    """
    defs: Counter[str] = Counter()
    imports: set[str] = set()

    def names(node: cst.BaseExpression) -> list[str]:
        if isinstance(node, cst.Name):
            return [node.value]
        if isinstance(node, (cst.Tuple, cst.List)):
            return [n for el in node.elements for n in names(el.value)]
        if isinstance(node, cst.StarredElement):
            return names(node.value)
        return []

    def visit(stmts: Iterable[cst.CSTNode]) -> None:
        for stmt in stmts:
            if isinstance(stmt, (cst.FunctionDef, cst.ClassDef)):
                defs[stmt.name.value] += 1
            elif isinstance(stmt, cst.SimpleStatementLine):
                for small in stmt.body:
                    if isinstance(small, (cst.Import, cst.ImportFrom)):
                        if isinstance(small.names, cst.ImportStar):
                            continue
                        for alias in small.names:
                            if alias.asname is not None:
                                imports.add(cst.ensure_type(alias.asname.name, cst.Name).value)
                            else:
                                imports.add(module.code_for_node(alias.name).split(".")[0])
                    elif isinstance(small, cst.Assign):
                        for target in small.targets:
                            defs.update(names(target.target))
                    elif isinstance(small, (cst.AnnAssign, cst.AugAssign)):
                        defs.update(names(small.target))
            elif isinstance(stmt, (cst.If, cst.Try, cst.With)):
                blocks = [stmt.body]
                if isinstance(stmt, cst.If) and stmt.orelse is not None:
                    blocks.append(stmt.orelse)
                if isinstance(stmt, cst.Try):
                    blocks += [h.body for h in stmt.handlers]
                    blocks += [b for b in (stmt.orelse, stmt.finalbody) if b is not None]
                for block in blocks:
                    body = getattr(block, "body", ())
                    visit(body if isinstance(body, Iterable) else ())

    visit(module.body)
    return defs, imports


def template_clashes(
    rendered: cst.Module,
    target_imports: Iterable[str],
    target_body: str,
    target_names: Iterable[str],
) -> list[str]:
    """The names the copied target code binds that the rest of the rendered module binds too.

    Computed, not listed: a built-in or user template (``--template-dir``) that defines a helper
    the target also defines would silently replace one with the other. A clash is a target name
    bound by a definition/assignment more often in the rendered module than in the target's own
    code, or imported by the rendered module where the target never imports it. Sorted.
    """
    own = cst.parse_module("\n".join(target_imports) + "\n\n" + target_body + "\n")
    own_defs, own_imports = _bindings(own)
    defs, imports = _bindings(rendered)
    return sorted(
        name
        for name in set(target_names)
        if defs[name] > own_defs[name] or (name in imports and name not in own_imports)
    )
