"""The ``hypernn-gen`` command line.

    hypernn-gen TARGET.py[:NAME] [options]          generate a hypernetwork (the default command)
    hypernn-gen inspect TARGET.py[:NAME] [options]  show the target's parameter layout

:func:`main` picks the command from the first argument: a name in :data:`COMMANDS`, else the
default command (generation), which takes the target path as its first argument. Each command
owns an :mod:`argparse` parser; adding one (``templates``, say) means adding a :class:`Command`
to :data:`COMMANDS`.

Every :class:`~hypernn_gen.errors.HypernnGenError` becomes ``hypernn-gen: error: <message>`` on
stderr and exit code 2, without a traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import os
import re
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from ._version import __version__
from .backends import backend_for
from .config import find_pyproject, load_jobs
from .design import design_layout
from .errors import GenerationError, HypernnGenError
from .fuse import FusionPlan
from .generate import Generated, generate, paths_relative_to, plan_fusion
from .load import DEFAULT_LOAD_TIMEOUT, load_target, load_time_limit, target_time_limit
from .options import (
    GenerateOptions,
    add_option_arguments,
    check_options,
    check_sizes,
    options_from_namespace,
)
from .render import CONTEXT_VERSION, TemplateContext, builtin_templates_dir, make_environment
from .report import format_layout, layout_json
from .trace import trace_selected
from .write import FileStatus, status_of, summarise_diff, write_generated

__all__ = [
    "COMMANDS",
    "DEFAULT_COMMAND",
    "Command",
    "add_debug_argument",
    "add_target_arguments",
    "console_main",
    "main",
]

PROG = "hypernn-gen"


@dataclass(frozen=True)
class Command:
    """One subcommand: its one-line help, its arguments and what it runs (returns the exit code)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# -- shared options -------------------------------------------------------------------------------


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """TARGET, the example-input options and ``--include``/``--exclude``."""
    parser.add_argument(
        "target",
        metavar="TARGET",
        help="path/to/target.py[:NAME]: a module class, module instance or zero-argument factory",
    )
    add_option_arguments(parser, lambda o: o.target_arg)
    parser.add_argument(
        "--load-timeout",
        metavar="SECONDS",
        type=_seconds,
        default=DEFAULT_LOAD_TIMEOUT,
        help="limit on running the target's code: importing, building and tracing it (default "
        f"{DEFAULT_LOAD_TIMEOUT:g}; 0: none)",
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds >= 0, e.g. 120 (0: no limit)")
    return value


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")


# -- inspect --------------------------------------------------------------------------------------


def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    add_target_arguments(parser)
    add_option_arguments(
        parser.add_argument_group("hypernetwork options that shape the layout (as for generate)"),
        lambda o: o.layout_arg,
    )
    parser.add_argument("--json", action="store_true", help="print the layout and chunking as JSON")
    add_debug_argument(parser)


def _run_inspect(args: argparse.Namespace) -> int:
    options = GenerateOptions(target=args.target, **options_from_namespace(args))
    check_options(options)
    # what the target prints stays off --json; one time limit from loading to the last probe
    with contextlib.redirect_stdout(sys.stderr), target_time_limit(options.target):
        loaded = load_target(
            options.target,
            input_shapes=list(options.input_shapes) or None,
            input_dtype=options.input_dtype,
        )
        backend_for(loaded.framework, options.backend, loaded.display)
        layout = trace_selected(loaded, include=options.include, exclude=options.exclude)
        lora_text = (
            _inspect_lora(options, loaded, args.json) if options.generate == "lora" else None
        )
        if lora_text is None:
            layout, chunking = design_layout(
                layout,
                num_embeddings=options.num_embeddings,
                chunk_dim=options.chunk_dim,
                chunking=options.chunking,
                init_scheme=options.init_scheme,
            )
            check_sizes(options, layout.num_generated, chunking.num_embeddings, chunking.chunk_dim)
            if options.generate == "delta" and loaded.framework != "torch":  # Flax: per sample
                why = "--generate delta builds each sample's weights (base + delta)"
                fusion: FusionPlan | str = FusionPlan(
                    (), (), (("", why),), (("", "per sample", why),)
                )
            else:
                try:
                    fusion = plan_fusion(
                        loaded, layout, chunking, linear_generator=not options.generator_hidden
                    )
                except HypernnGenError as exc:  # dynamic mode is impossible; layout still shown
                    fusion = str(exc)
    if lora_text is not None:
        print(lora_text)
        return 0
    if args.json:
        print(layout_json(layout, chunking, fusion))
    else:
        print(format_layout(loaded, layout, chunking, fusion, options.generate == "delta"))
    return 0


def _inspect_lora(options: Any, loaded: Any, as_json: bool) -> str:
    """``inspect --generate lora``: the adapted layers, their base shapes and adapter sizes."""
    from .adapters import check_base, describe_base, format_lora, lora_report
    from .generate import factory_expression, lora_layers

    if options.base is not None:
        check_base(options.base, loaded.framework)
    adapters = lora_layers(loaded, options)
    base = describe_base(options.base, factory_expression(loaded))
    report = lora_report(adapters, options, base, loaded.framework)
    return json.dumps(report, indent=2) if as_json else format_lora(report)


# -- generate -------------------------------------------------------------------------------------


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    add_target_arguments(parser)
    parser.set_defaults()
    for action in parser._actions:  # TARGET is optional here: without it, pyproject jobs run
        if action.dest == "target":
            action.nargs = "?"
            action.default = None
    # Hypernetwork options: not given -> the pyproject job's value, else GenerateOptions' default.
    option = parser.add_argument_group(
        "hypernetwork options (the same names in [tool.hypernn-gen] and the runtime library)"
    )
    add_option_arguments(option, lambda o: not o.target_arg)
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "--check",
        action="store_true",
        help="exit 1 if a generated file is missing, stale or edited",
    )
    what.add_argument("--diff", action="store_true", help="print what would change; write nothing")
    parser.add_argument("--force", action="store_true", help="overwrite a hand-edited file")
    parser.add_argument("--config", metavar="PYPROJECT", help="pyproject.toml with the jobs")
    add_debug_argument(parser)


def _jobs(args: argparse.Namespace) -> tuple[list[GenerateOptions], Path | None]:
    """The jobs to run, and the project root their header paths are relative to (or None)."""
    given = options_from_namespace(args)
    if args.target is not None:
        return [GenerateOptions(target=args.target, **given)], None
    pyproject = Path(args.config) if args.config else find_pyproject()
    if args.config and not pyproject.is_file():
        what = "is a directory, not a file" if pyproject.is_dir() else "no such file"
        raise GenerationError(
            f"--config {args.config}: {what}; pass the path of a pyproject.toml with "
            "[tool.hypernn-gen] jobs"
        )
    if pyproject is None:
        raise GenerationError(
            "no target given and no pyproject.toml found; pass a target file "
            "(hypernn-gen target.py --backend torch) or add [tool.hypernn-gen] jobs"
        )
    jobs = load_jobs(pyproject)
    if "output" in given and len(jobs) > 1:
        raise GenerationError(
            f"-o with the {len(jobs)} jobs of {pyproject} would write them all to one file; "
            "give a target, or set output in each job"
        )
    return [dataclasses.replace(job, **given) for job in jobs], pyproject.resolve().parent


def _run_generate(args: argparse.Namespace) -> int:
    exit_code = 0
    results = []
    jobs, root = _jobs(args)
    for options in jobs:
        # what the target prints stays off --diff; a job's paths are its pyproject's
        with contextlib.redirect_stdout(sys.stderr), paths_relative_to(root):
            results.append((options, generate(options)))
    _refuse_duplicate_outputs(results)
    _refuse_overwriting_targets(results)
    for _, result in results:  # e.g. "input shape not checked": not only in the file header
        for note in result.layout.notes:
            print(f"{PROG}: note: {result.path}: {note}", file=sys.stderr)
    for options, result in results:
        state = status_of(result.path, result.text)
        if args.check:
            if state.status is FileStatus.CURRENT:
                print(f"ok        {result.path}")
                continue
            exit_code = 1
            detail = {
                FileStatus.MISSING: "missing",
                FileStatus.EDITED: "edited by hand (its digest no longer matches)",
                FileStatus.FOREIGN: "not written by hypernn-gen",
            }.get(state.status)
            if detail is None:
                detail = "stale: " + summarise_diff(state.existing or "", result.text, "")[0]
            print(f"FAILED    {result.path}: {detail}")
        elif args.diff:
            if state.status is not FileStatus.CURRENT:
                sys.stdout.write(
                    summarise_diff(state.existing or "", result.text, str(result.path))[1]
                )
        else:
            old = write_generated(result.path, result.text, force=args.force)
            verb = "unchanged" if old is FileStatus.CURRENT else "wrote    "
            layout = result.layout
            what = f"{len(layout.generated)} tensors, {layout.num_generated:,} generated values"
            if options.generate != "weights":
                what = f"--generate {options.generate}, " + (
                    what if options.generate == "delta" else "LoRA adapters on a frozen target"
                )
            print(f"{verb} {result.path} ({options.mode}, {what})")
    if args.check and exit_code:
        print(
            f"{PROG}: regenerate with `{PROG}` (or the command in each file's header)",
            file=sys.stderr,
        )
    return exit_code


def _refuse_duplicate_outputs(results: list[tuple[GenerateOptions, Generated]]) -> None:
    """Two jobs writing one file would overwrite each other, and --check could never pass."""
    seen: dict[Path, str] = {}
    for options, result in results:
        key = Path(os.path.abspath(result.path))
        if key in seen:
            raise GenerationError(
                f"two jobs write {result.path} (targets {seen[key]} and {options.target}); "
                "give each job its own output"
            )
        seen[key] = options.target


def _refuse_overwriting_targets(results: list[tuple[GenerateOptions, Generated]]) -> None:
    """An output that is a target file (this job's or another's) would replace the code it was
    generated from; refused even with --force (which is for generated and foreign files)."""
    targets = {Path(os.path.realpath(r.loaded.path)): o.target for o, r in results}
    for _, result in results:
        target = targets.get(Path(os.path.realpath(result.path)))
        if target is not None:
            raise GenerationError(
                f"-o {result.path} is the target file of {target}: writing it would replace the "
                "code the hypernetwork is generated from (even with --force); choose another -o "
                "path"
            )


# -- templates ------------------------------------------------------------------------------------


def _templates_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("list", "export"), help="list blocks, or export files")
    parser.add_argument("directory", nargs="?", help="export: where to copy the built-ins")
    parser.add_argument("--force", action="store_true", help="export: overwrite existing files")
    add_debug_argument(parser)


def _run_templates(args: argparse.Namespace) -> int:
    root = builtin_templates_dir()
    files = sorted(p for p in root.rglob("*.jinja"))
    if args.action == "export":
        if not args.directory:
            raise GenerationError(
                "templates export needs a directory: hypernn-gen templates export DIR"
            )
        target = Path(args.directory)
        if target.exists() and not target.is_dir():
            raise GenerationError(
                f"{target} is a file, not a directory; pass a new or existing directory, e.g. "
                "hypernn-gen templates export my_templates"
            )
        clashes = [f for f in files if (target / f.relative_to(root)).exists()]
        if clashes and not args.force:
            raise GenerationError(
                f"{target / clashes[0].relative_to(root)} exists; pass --force to overwrite it"
            )
        for f in files:
            dest = target / f.relative_to(root)
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(f.read_text())
            except OSError as exc:
                raise GenerationError(
                    f"cannot export {dest}: {exc.strerror or type(exc).__name__}; pass a "
                    "writable directory whose subfolders are not files"
                ) from exc
            print(f"exported {dest}")
        print(
            f'Edit a copy, or better, replace its body with {{% extends "builtin/<name>" %}} and '
            f"override only the blocks you change; then pass --template-dir {target}."
        )
        return 0
    env = make_environment()
    print(f"Built-in templates (context version {CONTEXT_VERSION}), in {root}:")
    for f in files:
        name = f.relative_to(root).as_posix()
        blocks = [b.name for b in env.parse(f.read_text()).find_all(jinja2.nodes.Block)]
        print(f"  {name}\n    blocks: {', '.join(blocks)}")
    print("\nThe context: one object, `ctx` (hypernn_gen.render.TemplateContext):")
    for field in dataclasses.fields(TemplateContext):
        print(f"  ctx.{field.name}: {field.type}")
    print("  ctx.condition_dim: int | None (property)")
    return 0


#: Subcommands by name. The first argument selects one; anything else runs DEFAULT_COMMAND with
#: all arguments (so ``hypernn-gen target.py ...`` generates). ``templates`` goes here too.
COMMANDS: dict[str, Command] = {
    "generate": Command(
        "generate a hypernetwork module (the default command)",
        _generate_arguments,
        _run_generate,
    ),
    "templates": Command(
        "list the built-in templates' blocks and context, or export them to start from",
        _templates_arguments,
        _run_templates,
    ),
    "inspect": Command(
        "show the target's parameter layout, chunking and hypernetwork size",
        _inspect_arguments,
        _run_inspect,
    ),
}
DEFAULT_COMMAND = "generate"


# -- entry point ----------------------------------------------------------------------------------


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    commands = "\n".join(f"  {name.ljust(width)}  {cmd.help}" for name, cmd in COMMANDS.items())
    return (
        f"usage: {PROG} TARGET.py[:NAME] [options]\n"
        f"       {PROG} COMMAND ... (see {PROG} COMMAND --help)\n\n"
        f"commands:\n{commands}\n"
    )


class UsageError(Exception):
    """An argparse error, turned into one ``hypernn-gen: error:`` line (exit 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse without the usage block: one error line, with "did you mean" where it helps."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(self._hint(message))

    def _hint(self, message: str) -> str:
        flags = [f for a in self._actions for f in a.option_strings if f.startswith("--")]
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            for word in unknown.group(1).split():
                flag = word.split("=", 1)[0]
                if flag.startswith("--"):
                    close = difflib.get_close_matches(flag, flags, n=1)
                    if close:
                        return f"unrecognized argument {flag}; did you mean {close[0]}?"
            return f"{message}; see {self.prog} --help"
        choice = re.match(r"argument (\S+?)(?:/\S+)?: invalid choice: '([^']*)'", message)
        if choice:
            action = next((a for a in self._actions if choice.group(1) in a.option_strings), None)
            if action is not None and action.choices is not None:
                options = [str(c) for c in action.choices]
                close = difflib.get_close_matches(choice.group(2), options, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"choose {', '.join(options)}"
                return f"argument {choice.group(1)}: invalid choice: {choice.group(2)!r}; {hint}"
        return message


def _fail(message: str, *, debug: bool) -> int:
    if debug:
        traceback.print_exc(file=sys.stderr)
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hypernn-gen`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code.

    Ctrl-C ends with one ``interrupted`` line and exit code 130; a closed stdout (``| head``)
    ends quietly, as Unix tools do.
    """
    try:
        code = _main(argv)
        sys.stdout.flush()
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Python would report the failed flush at exit: point stdout at /dev/null instead.
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # not a real file descriptor (tests capture stdout)
            pass
        return 141  # 128 + SIGPIPE, what a Unix tool killed by the closed pipe returns
    return code


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(_usage(), end="")
        return 0
    if argv and argv[0] == "--version":
        print(f"{PROG} {__version__}")
        return 0
    name, rest = (argv[0], argv[1:]) if argv and argv[0] in COMMANDS else (DEFAULT_COMMAND, argv)
    command = COMMANDS[name]
    parser = _Parser(
        prog=PROG if name == DEFAULT_COMMAND and rest is argv else f"{PROG} {name}",
        description=command.help,
    )
    command.add_arguments(parser)
    try:
        args = parser.parse_args(rest)
    except UsageError as exc:
        return _fail(str(exc), debug=False)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 2
    debug = bool(getattr(args, "debug", False))
    try:
        with load_time_limit(getattr(args, "load_timeout", DEFAULT_LOAD_TIMEOUT)):
            return command.run(args)
    except HypernnGenError as exc:
        return _fail(str(exc), debug=debug)
    except Exception as exc:  # noqa: BLE001 - the CLI must end with a message, not a traceback
        first = (str(exc).strip().splitlines() or [""])[0]
        hint = "" if debug else "; rerun with --debug for the traceback"
        return _fail(f"unexpected {type(exc).__name__}: {first}{hint}", debug=debug)


def console_main() -> int:
    """The ``hypernn-gen`` executable: :func:`main`, then exit even if the target left threads.

    A target that starts a non-daemon thread would keep the process alive after the work is done;
    so once the output is flushed, the process ends with ``os._exit`` when such threads remain.
    """
    code = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    current = threading.current_thread()
    if any(t is not current and t.is_alive() and not t.daemon for t in threading.enumerate()):
        os._exit(code)
    return code
