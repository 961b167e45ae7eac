"""Check rendered source with libcst, then format it (black in-process, or ruff).

Parsing comes first so that a template bug is reported against the template, with the
offending rendered line, before a formatter's less helpful message.
"""

from __future__ import annotations

import shutil
import subprocess

import black
import libcst as cst

from .errors import GenerationError

__all__ = ["FORMATTERS", "check_source", "dedupe_imports", "format_source"]

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
