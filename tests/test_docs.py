"""docs/cli.md is generated from the argparse parsers; it must match what they say now."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _generator():
    spec = importlib.util.spec_from_file_location(
        "gen_cli_reference", DOCS / "gen_cli_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_up_to_date() -> None:
    committed = (DOCS / "cli.md").read_text()
    assert _generator().render() == committed, (
        "docs/cli.md is out of date with hypernn_gen/cli.py: run python docs/gen_cli_reference.py"
    )


def test_cli_reference_lists_every_command_and_option() -> None:
    from hypernn_gen import cli

    text = (DOCS / "cli.md").read_text()
    for name in cli.COMMANDS:
        assert f"## `{name}`" in text
        parser = _generator()._parser(name)
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}`" in text, f"{name}: {flag} missing from docs/cli.md"


def test_docs_links_resolve() -> None:
    """Relative links in README.md and docs/*.md point at files that exist."""
    pages = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def _code_blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(), flags=re.S)


def test_anatomy_quotes_match_the_generated_file() -> None:
    """Every ```python block of docs/anatomy.md is in generated_examples/cnn_torch_dynamic.py
    (a line holding only ``...`` separates fragments that are quoted separately)."""

    def lines(text: str) -> str:  # quotes of methods are dedented: compare line by line
        return "\n".join(line.strip() for line in text.strip().splitlines())

    source = lines((ROOT / "generated_examples" / "cnn_torch_dynamic.py").read_text())
    blocks = _code_blocks(DOCS / "anatomy.md", "python")
    assert len(blocks) >= 10
    for block in blocks:
        fragments = re.split(r"^[ \t]*\.\.\.[ \t]*\n", block, flags=re.M)
        for fragment in fragments:
            assert lines(fragment) in source, (
                "docs/anatomy.md quotes text that generated_examples/cnn_torch_dynamic.py no "
                f"longer contains; update the quote:\n{fragment}"
            )


def test_templates_block_table_matches_the_templates() -> None:
    import jinja2

    from hypernn_gen.render import builtin_templates_dir, make_environment

    rows = re.findall(
        r"^\| `([\w/.]+\.jinja)` \| (.*) \|$", (DOCS / "templates.md").read_text(), re.M
    )
    assert rows, "docs/templates.md has no template table"
    env = make_environment()
    for name, listed in rows:
        text = (builtin_templates_dir() / name).read_text()
        blocks = [b.name for b in env.parse(text).find_all(jinja2.nodes.Block)]
        assert re.findall(r"`(\w+)`", listed) == blocks, f"docs/templates.md: blocks of {name}"


def test_templates_worked_example_is_the_committed_template() -> None:
    """The override quoted in docs/templates.md is generated_examples' user template, which a
    pyproject job renders (and tests/test_options.py checks numerically)."""
    (template,) = _code_blocks(DOCS / "templates.md", "jinja")[-1:]
    committed = ROOT / "generated_examples" / "templates" / "torch" / "hypernetwork.py.jinja"
    assert template == committed.read_text()
