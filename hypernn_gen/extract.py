"""Copy the target's definition, and exactly the module-level names it needs, out of its file.

Generated files are standalone: the target's class (or factory, or instance assignment) is copied
in with libcst, together with the top-level functions, classes, constants and imports it refers
to, transitively, in their original order. Imports stay imports, so a target that does
``from model import GPT`` keeps doing so. ``if __name__ == "__main__":`` blocks, docstrings and
unrelated code are left behind.

The dependency scan is deliberately simple: a top-level statement is needed when a name it
binds appears as an identifier anywhere in an already needed statement (attribute names and
keyword-argument names excluded). That can pull in an unused sibling with a shadowed name, never
miss one.
"""

from __future__ import annotations

import importlib.util
import tokenize
from dataclasses import dataclass
from pathlib import Path

import libcst as cst

from .errors import GenerationError

__all__ = ["KERNEL_BEGIN", "KERNEL_END", "TargetSource", "extract_target_source", "kernel_source"]

# Names the generated file defines itself; copied code must not rebind them.
RESERVED = frozenset({"annotations"})


@dataclass(frozen=True)
class TargetSource:
    """Code to paste into a generated file.

    Attributes:
        imports: import statements the copied code needs (``from __future__`` dropped).
        body: the copied definitions, in file order.
        names: every name the copied code binds at module level.
    """

    imports: tuple[str, ...]
    body: str
    names: frozenset[str]


class _Refs(cst.CSTVisitor):
    """Identifiers referenced in a statement (not attribute or keyword-argument names)."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def visit_Name(self, node: cst.Name) -> None:
        self.names.add(node.value)

    def visit_Attribute(self, node: cst.Attribute) -> bool:
        node.value.visit(self)
        return False  # skip node.attr

    def visit_Arg(self, node: cst.Arg) -> bool:
        node.value.visit(self)
        return False  # skip the keyword name

    def visit_ImportFrom(self, node: cst.ImportFrom) -> bool:
        return False

    def visit_Import(self, node: cst.Import) -> bool:
        return False


def _bound_names(stmt: cst.CSTNode) -> set[str]:
    """Names a top-level statement binds."""
    if isinstance(stmt, (cst.FunctionDef, cst.ClassDef)):
        return {stmt.name.value}
    if not isinstance(stmt, cst.SimpleStatementLine):
        return set()
    names: set[str] = set()
    for small in stmt.body:
        if isinstance(small, (cst.Import, cst.ImportFrom)):
            if isinstance(small.names, cst.ImportStar):
                continue
            names |= {_alias_name(alias) for alias in small.names}
        elif isinstance(small, cst.Assign):
            for target in small.targets:
                names |= _target_names(target.target)
        elif isinstance(small, (cst.AnnAssign, cst.AugAssign)):
            names |= _target_names(small.target)
    return names


def _target_names(node: cst.BaseExpression) -> set[str]:
    if isinstance(node, cst.Name):
        return {node.value}
    if isinstance(node, (cst.Tuple, cst.List)):
        out: set[str] = set()
        for el in node.elements:
            out |= _target_names(el.value)
        return out
    return set()


def _alias_name(alias: cst.ImportAlias) -> str:
    """The name an import alias binds: ``np`` for ``numpy as np``, ``os`` for ``os.path``."""
    if alias.asname is not None:
        return cst.ensure_type(alias.asname.name, cst.Name).value
    return cst.Module([]).code_for_node(alias.name).split(".")[0]


def _only_names(stmt: cst.SimpleStatementLine, wanted: set[str]) -> cst.SimpleStatementLine:
    """An import statement reduced to the aliases whose bound name is wanted."""
    body = []
    for small in stmt.body:
        if isinstance(small.names, cst.ImportStar):
            body.append(small)
            continue
        keep = [a for a in small.names if _alias_name(a) in wanted]
        if keep:
            keep[-1] = keep[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
            body.append(small.with_changes(names=keep))
    return stmt.with_changes(body=body, leading_lines=[])


def _is_import(stmt: cst.CSTNode) -> bool:
    return isinstance(stmt, cst.SimpleStatementLine) and all(
        isinstance(s, (cst.Import, cst.ImportFrom)) for s in stmt.body
    )


def _is_future(stmt: cst.CSTNode) -> bool:
    return (
        isinstance(stmt, cst.SimpleStatementLine)
        and isinstance(stmt.body[0], cst.ImportFrom)
        and isinstance(stmt.body[0].module, cst.Name)
        and stmt.body[0].module.value == "__future__"
    )


def _is_main_guard(stmt: cst.CSTNode) -> bool:
    return isinstance(stmt, cst.If) and "__main__" in cst.Module([]).code_for_node(stmt.test)


def read_source(path: Path) -> str:
    """A Python file's text as Python reads it: a PEP 263 coding line or a UTF-8 BOM honoured."""
    with tokenize.open(path) as fh:
        return fh.read()


class _AbsoluteImports(cst.CSTTransformer):
    """``from .layers import Block`` -> ``from pkg.models.layers import Block``."""

    def __init__(self, package: str) -> None:
        self.package = package

    def leave_ImportFrom(  # noqa: N802 - libcst's visitor name
        self, original: cst.ImportFrom, updated: cst.ImportFrom
    ) -> cst.ImportFrom:
        if not updated.relative:
            return updated
        dots = "." * len(updated.relative)
        name = cst.Module([]).code_for_node(updated.module) if updated.module else ""
        try:
            absolute = importlib.util.resolve_name(dots + name, self.package)
        except ImportError as exc:
            raise GenerationError(
                f"cannot make the relative import {dots}{name} absolute in package "
                f"{self.package}: {exc}; use an absolute import in the target file"
            ) from exc
        return updated.with_changes(relative=[], module=cst.parse_expression(absolute))


def extract_target_source(
    path: Path, roots: list[str], *, package: str | None = None
) -> TargetSource:
    """The definitions of ``roots`` in ``path`` and everything they need at module level.

    ``package``: the package the file was imported as part of; its relative imports become
    absolute ones, so the generated (standalone) file can import them too.
    """
    try:
        module = cst.parse_module(read_source(path))
    except cst.ParserSyntaxError as exc:
        raise GenerationError(
            f"{path}:{exc.raw_line}: cannot parse the target file: {exc.message}"
        ) from exc
    if package:
        module = module.visit(_AbsoluteImports(package))
    stmts = [s for s in module.body if not _is_main_guard(s) and not _is_future(s)]
    bound = [_bound_names(s) for s in stmts]
    refs: list[set[str]] = []
    for s in stmts:
        visitor = _Refs()
        s.visit(visitor)
        refs.append(visitor.names)

    needed: set[int] = set()
    wanted = set(roots)
    missing = [r for r in roots if not any(r in b for b in bound)]
    if missing:
        raise GenerationError(
            f"cannot find a top-level definition of {missing[0]!r} in {path}; define the target "
            "at module level (a class, a factory function or an assignment)"
        )
    while True:
        # The last binding before use wins, but every binding of a wanted name is kept: a name
        # re-assigned later in the file must keep its final value.
        new = {i for i, b in enumerate(bound) if b & wanted} - needed
        if not new:
            break
        needed |= new
        for i in new:
            wanted |= refs[i]

    imports, body = [], []
    for i in sorted(needed):
        stmt = stmts[i]
        if _is_import(stmt):
            stmt = _only_names(stmt, wanted)
        code = module.code_for_node(stmt).strip("\n")
        (imports if _is_import(stmt) else body).append(code)
    names: set[str] = set()
    for i in needed:
        names |= bound[i] & wanted if _is_import(stmts[i]) else bound[i]
    return TargetSource(tuple(imports), "\n\n\n".join(body), frozenset(names))


KERNEL_END = "# -- end of hypernn-gen kernel"


def _kernel_begin() -> str:
    from .kernel import KERNEL_VERSION

    return f"# -- hypernn-gen kernel {KERNEL_VERSION}"


KERNEL_BEGIN = _kernel_begin()


def _sibling_imports(path: Path) -> dict[str, str]:
    """``{name: sibling module}`` for each ``from .sibling import name`` in a kernel module."""
    module = cst.parse_module(path.read_text())
    out: dict[str, str] = {}
    for stmt in module.body:
        if not isinstance(stmt, cst.SimpleStatementLine):
            continue
        for small in stmt.body:
            if isinstance(small, cst.ImportFrom) and small.relative and small.module is not None:
                sibling = cst.Module([]).code_for_node(small.module)
                for alias in small.names:  # type: ignore[union-attr]
                    out[_alias_name(alias)] = sibling
    return out


def kernel_source(module: str, roots: list[str]) -> TargetSource:
    """The kernel definitions ``roots`` of ``hypernn_gen/kernel/<module>.py`` and what they need.

    Names a kernel module imports from a sibling (``from ._flax import split_chunks``) are
    copied from that sibling first, so the result stands alone. Definitions keep their source
    text byte for byte: the generated file's kernel section is a verbatim copy.
    """
    folder = Path(__file__).parent / "kernel"
    imports: list[str] = []
    bodies: list[str] = []
    names: set[str] = set()

    def visit(name: str, wanted: list[str]) -> None:
        path = folder / f"{name}.py"
        siblings = _sibling_imports(path)
        source = extract_target_source(path, wanted)
        by_sibling: dict[str, list[str]] = {}
        for bound in sorted(source.names & siblings.keys()):
            by_sibling.setdefault(siblings[bound], []).append(bound)
        for sibling, wanted_there in by_sibling.items():
            visit(sibling, wanted_there)
        for line in source.imports:
            if not line.startswith("from ."):
                if line not in imports:
                    imports.append(line)
        if source.body and source.body not in bodies:
            bodies.append(source.body)
        names.update(source.names - siblings.keys())

    visit(module, roots)
    return TargetSource(tuple(imports), "\n\n\n".join(bodies), frozenset(names))
