"""The option schema, the backend table, computed reserved names and the CLI's one-line messages.

Every error here is checked the same way: exit code 2 (130 for Ctrl-C), exactly one stderr line
starting ``hypernn-gen: error:``, no traceback, and the fix named.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hypernn_gen import cli
from hypernn_gen.backends import FAMILIES, FRAMEWORKS
from hypernn_gen.cli import main
from hypernn_gen.config import load_jobs
from hypernn_gen.generate import command_line
from hypernn_gen.options import OPTIONS, GenerateOptions, options_from_namespace
from hypernn_gen.render import template_name

ROOT = Path(__file__).resolve().parents[1]
SEED = str(ROOT / "generated_examples" / "targets" / "seed_mlp.py")

TINY = '''"""15 generated values."""

import torch
from torch import nn


def make_target() -> nn.Module:
    return nn.Linear(4, 3)


example_input = torch.zeros(2, 4)
'''


def one_error(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 2) -> str:
    """Run the CLI; check the exit code, one stderr line, no traceback; return the message."""
    got = main(argv)
    err = capsys.readouterr().err
    assert got == code, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hypernn-gen: ")
    return lines[0].removeprefix("hypernn-gen: error: ")


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.py").write_text(TINY)
    return tmp_path / "tiny.py"


# -- argparse: one line, did you mean -------------------------------------------------------------


def test_unknown_flag_is_one_line_with_did_you_mean(capsys: pytest.CaptureFixture[str]) -> None:
    message = one_error(capsys, [SEED, "--embeding-dim", "8"])
    assert message == "unrecognized argument --embeding-dim; did you mean --embedding-dim?"
    message = one_error(capsys, ["inspect", SEED, "--jsn"])
    assert message == "unrecognized argument --jsn; did you mean --json?"


def test_bad_choice_is_one_line_with_did_you_mean(capsys: pytest.CaptureFixture[str]) -> None:
    message = one_error(capsys, [SEED, "--mode", "dynamc"])
    assert message == "argument --mode: invalid choice: 'dynamc'; did you mean 'dynamic'?"
    message = one_error(capsys, [SEED, "--chunking", "zzz"])
    assert message == "argument --chunking: invalid choice: 'zzz'; choose auto, flat, tensor"


def test_exclusive_flags_and_bad_int_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    message = one_error(capsys, [SEED, "--num-embeddings", "4", "--chunk-dim", "8"])
    assert "--chunk-dim" in message and "--num-embeddings" in message
    assert "invalid int value: 'x'" in one_error(capsys, [SEED, "--embedding-dim", "x"])


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.toml"
    message = one_error(capsys, ["--config", str(missing)])
    assert message == (
        f"--config {missing}: no such file; pass the path of a pyproject.toml with "
        "[tool.hypernn-gen] jobs"
    )


def test_ctrl_c_is_one_line_exit_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_target", interrupted)
    got = main(["inspect", SEED])
    out, err = capsys.readouterr()
    assert (got, out, err) == (130, "", "hypernn-gen: interrupted\n")


def test_closed_stdout_ends_quietly(tmp_path: Path) -> None:
    """``hypernn-gen inspect ... | head -1``: no BrokenPipe traceback, no message."""
    proc = subprocess.run(
        f"{shlex.quote(sys.executable)} -m hypernn_gen inspect {shlex.quote(SEED)} | head -1",
        shell=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert proc.stdout == f"target     {SEED}:make_target\n"
    assert proc.stderr == ""


def test_config_that_is_a_folder_bad_toml_or_not_utf8(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    message = one_error(capsys, ["--config", str(tmp_path)])
    assert message == (
        f"--config {tmp_path}: is a directory, not a file; pass the path of a pyproject.toml "
        "with [tool.hypernn-gen] jobs"
    )
    bad = tmp_path / "bad.toml"
    bad.write_text("[tool.hypernn-gen\n")
    message = one_error(capsys, ["--config", str(bad)])
    assert message.startswith(f"{bad}: invalid TOML: ") and "(at line 1, column 18)" in message
    assert message.endswith("fix that line (https://toml.io)")
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'[tool.hypernn-gen]\nnote = "caf\xe9"\n')
    message = one_error(capsys, ["--config", str(latin)])
    assert message == f"{latin} is not UTF-8 (byte 30); save it as UTF-8, as TOML requires"


# -- pyproject through the schema -----------------------------------------------------------------


def _pyproject(directory: Path, text: str) -> Path:
    path = directory / "pyproject.toml"
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def test_pyproject_bool_is_not_an_integer(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _pyproject(tiny.parent, '[[tool.hypernn-gen.jobs]]\ntarget = "tiny.py"\nembedding-dim = true\n')
    message = one_error(capsys, [])
    assert message == (
        "pyproject.toml [[tool.hypernn-gen.jobs]] #1: embedding-dim must be an integer, got True"
    )


def test_pyproject_num_embeddings_and_chunk_dim_are_refused(
    tiny: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _pyproject(
        tiny.parent,
        """
        [tool.hypernn-gen]
        chunk-dim = 4

        [[tool.hypernn-gen.jobs]]
        target = "tiny.py"
        num-embeddings = 4
        """,
    )
    message = one_error(capsys, [])
    assert message == (
        "--num-embeddings and --chunk-dim both set the chunk size and exclude each other; "
        "give only one"
    )
    assert not (tiny.parent / "tiny_torch_static.py").exists()


def test_unknown_top_level_key_names_its_table(
    tiny: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _pyproject(
        tiny.parent,
        """
        [tool.hypernn-gen]
        embeding-dim = 8

        [[tool.hypernn-gen.jobs]]
        target = "tiny.py"
        """,
    )
    message = one_error(capsys, [])
    assert message == (
        "pyproject.toml [tool.hypernn-gen]: unknown key 'embeding-dim'; "
        "did you mean 'embedding-dim'?"
    )


def test_every_schema_row_is_a_flag_a_field_and_a_pyproject_key(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    cli._generate_arguments(parser)
    dests = {a.dest: a for a in parser._actions}
    fields = set(GenerateOptions.__dataclass_fields__)
    keys = []
    for option in OPTIONS:
        assert option.name in fields and option.name in dests
        assert option.cli_flag in dests[option.name].option_strings
        keys.append(f"{option.toml_key} = {_toml(option)}")
    path = _pyproject(
        tmp_path,
        '[[tool.hypernn-gen.jobs]]\ntarget = "t.py"\nmode = "dynamic"\n'
        + "\n".join(k for k in keys if not k.startswith("mode "))
        + "\n",
    )
    (job,) = load_jobs(path)
    for option in OPTIONS:
        assert getattr(job, option.name) != option.default or option.name == "mode", option.name


def _toml(option) -> str:  # noqa: ANN001 - a value different from the default, per kind
    samples = {
        "int": "7",
        "widths": "[5, 6]",
        "shape": "[3]",
        "shapes": '["1,8"]',
        "globs": '["x*"]',
        "path": '"somewhere"',
        "float": "0.5",
    }
    if option.kind == "choice":
        return f'"{next(c for c in option.choices if c != option.default)}"'
    return samples[option.kind]


def test_command_line_parses_back_to_the_same_options(tmp_path: Path) -> None:
    """The header's regeneration command, parsed by the CLI, gives the options it came from."""
    options = GenerateOptions(
        target=SEED,
        backend="torch",
        mode="dynamic",
        embedding_dim=8,
        chunk_dim=40,
        chunking="tensor",
        generator_hidden=(5,),
        init_scheme="hyperfan-out",
        condition_shape=(3,),
        condition_dtype="float64",
        embedding_hidden=(7, 7),
        input_shapes=((1, 8), (2, 3)),
        input_dtype="float64",
        include=("a*",),
        exclude=("b",),
        template_dir="tpl",
        formatter="ruff",
    )

    class Loaded:
        path = SEED

    text = command_line(options, Loaded(), tmp_path / "x.py")  # type: ignore[arg-type]
    words = shlex.split(text)
    assert words[0] == "hypernn-gen"
    parser = argparse.ArgumentParser()
    cli._generate_arguments(parser)
    args = parser.parse_args(words[1:])
    parsed = GenerateOptions(target=args.target, **options_from_namespace(args))
    assert Path(parsed.target).resolve() == Path(SEED).resolve()
    for option in OPTIONS:
        if option.name not in ("output", "template_dir"):
            assert getattr(parsed, option.name) == getattr(options, option.name), option.name


# -- sizes checked once the layout is known -------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--embedding-dim", "10000000000"], "over 1000x; use a smaller --embedding-dim"),
        (["--num-embeddings", "1000"], "for a target of 15 generated values, over 1000x"),
        (["--chunk-dim", "100000"], "make 100,000 outputs for 15 generated values, mostly"),
    ],
)
def test_absurd_sizes_are_refused_with_the_numbers(
    tiny: Path, capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    for command in (["inspect", "tiny.py"], ["tiny.py", "-o", "gen.py"]):
        message = one_error(capsys, [*command, *args])
        assert expected in message, message
        assert "--num-embeddings" in message or "--chunk-dim" in message
    assert not (tiny.parent / "gen.py").exists()


def test_default_sizes_of_a_tiny_target_pass(
    tiny: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tiny.py", "-o", "gen.py"]) == 0
    capsys.readouterr()
    module = {}
    exec((tiny.parent / "gen.py").read_text(), module)  # noqa: S102 - our own generated file
    assert module["FLAT_SIZE"] >= 15


# -- the backend table ----------------------------------------------------------------------------


def test_backend_table_names_real_objects() -> None:
    assert FAMILIES == ("torch", "flax")
    assert {b.family for b in FRAMEWORKS.values()} == set(FAMILIES)
    for framework, backend in FRAMEWORKS.items():
        assert template_name(framework) == backend.template
        assert (ROOT / "templates" / backend.template).is_file()
        assert callable(backend.load("tracer")) and callable(backend.load("fusion_planner"))
        runtime = backend.load("runtime_class")
        assert runtime.__name__.endswith("HyperNetwork")
        assert backend.kernel_module == f"hypernn_gen.kernel.{framework}"
    assert importlib.import_module("hypernn_gen.backends")  # imports no framework at import time


def test_backend_contradicting_the_target(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ([SEED], ["inspect", SEED]):
        message = one_error(
            capsys,
            [*command, "--backend", "flax", "-o", "/nonexistent/x.py"]
            if command == [SEED]
            else [*command, "--backend", "flax"],
        )
        assert message.endswith(
            "is a torch target but --backend flax was given; use --backend torch"
        )


# -- reserved names, computed from the rendered module --------------------------------------------


def test_user_template_helper_clashing_with_the_target_is_refused(
    tiny: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    templates = tiny.parent / "tpl" / "torch"
    templates.mkdir(parents=True)
    (templates / "hypernetwork.py.jinja").write_text(
        '{% extends "builtin/torch/hypernetwork.py.jinja" %}\n'
        "{% block layout %}\n{{ super() }}\n\ndef width() -> int:\n    return 3\n"
        "{% endblock layout %}\n"
    )
    # without the clash the user template renders, and its helper is in the file
    assert main(["tiny.py", "--template-dir", "tpl", "-o", "ok.py"]) == 0
    capsys.readouterr()
    assert "def width() -> int:" in (tiny.parent / "ok.py").read_text()
    # a target that defines the same name is refused, as a built-in name would be
    tiny.write_text(
        TINY.replace(
            "def make_target", "def width() -> int:\n    return 3\n\n\ndef make_target"
        ).replace("nn.Linear(4, 3)", "nn.Linear(4, width())")
    )
    message = one_error(capsys, ["tiny.py", "--template-dir", "tpl", "-o", "bad.py"])
    assert message.endswith(
        "defines 'width', a name the generated file needs for itself; rename it in the target file"
    )
    assert not (tiny.parent / "bad.py").exists()
    # the built-in templates do not bind it: the same target generates without --template-dir
    assert main(["tiny.py", "-o", "builtin.py"]) == 0
    capsys.readouterr()


def test_a_helper_name_the_rendering_does_not_bind_is_no_clash(
    tiny: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """TIED is bound only when the target ties weights; an untied target may use the name."""
    tiny.write_text(TINY.replace("nn.Linear(4, 3)", "nn.Linear(4, TIED)") + "\nTIED = 3\n")
    assert main(["tiny.py", "-o", "gen.py"]) == 0
    capsys.readouterr()
    text = (tiny.parent / "gen.py").read_text()
    assert len(re.findall(r"^TIED = ", text, flags=re.M)) == 1


# -- README commands ------------------------------------------------------------------------------


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    found = re.findall(r"^\s*(hypernn-gen [^#`\n]*?)\s*(?:#.*)?$", text, flags=re.M)
    found += re.findall(r"`(hypernn-gen [^`]*)`", text)
    found += re.findall(r"&& (hypernn-gen [^&\n]*?)(?: &&|$)", text, flags=re.M)
    return sorted(set(c.strip() for c in found))


def test_readme_lists_commands() -> None:
    assert any("inspect --mode dynamic" in c for c in readme_commands())
    assert len(readme_commands()) >= 10


def test_every_readme_command_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each ``hypernn-gen ...`` line of README.md exits 0, run in a directory that has the files
    it names (copies of the example targets) and writing only there."""
    import shutil

    targets = ROOT / "generated_examples" / "targets"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "path" / "to").mkdir(parents=True)
    seed = (targets / "seed_mlp.py").read_text()
    policy = "\n\ndef make_policy() -> nn.Module:\n    return make_target()\n"
    (tmp_path / "path" / "to" / "target.py").write_text(seed + policy)
    for name, source in {
        "seed_mlp.py": "seed_mlp.py",
        "policy.py": "seed_mlp.py",
        "sine.py": "seed_mlp.py",
        "cnn.py": "cnn.py",
        "transformer.py": "transformer.py",
    }.items():
        shutil.copy(targets / source, tmp_path / name)
    for part in ("templates", "targets"):
        shutil.copytree(ROOT / "generated_examples" / part, tmp_path / "generated_examples" / part)
    _pyproject(tmp_path, '[[tool.hypernn-gen.jobs]]\ntarget = "seed_mlp.py"\noutput = "job.py"\n')
    for command in readme_commands():
        words = shlex.split(command.replace("/tmp/", f"{tmp_path}/"))[1:]
        if words[:1] == ["inspect"] and not any(w.endswith(".py") for w in words):
            words.insert(1, "seed_mlp.py")  # prose that names the command without a target
        if words == ["--check"]:
            assert main([]) == 0  # --check after the jobs were written with their options
        code = main(words)
        out, err = capsys.readouterr()
        assert code == 0, f"{command}: {err}"
        assert err == "", command
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.py")}
    expected = {"job.py", "policy_hyper.py", "seed_mlp_sinusoidal.py", "seed_hypernet.py"}
    assert expected | {"out/target_torch_static.py"} <= written
