"""Generator behaviour: golden files, determinism, --check/--force, provenance, templates, errors.

The in-process tests call :func:`hypernn_gen.cli.main` (or :func:`generate`) with the working
directory set to a temporary directory; the subprocess tests run the installed ``hypernn-gen``
console script, as a user would.
"""

from __future__ import annotations

import difflib
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from gen_support import (
    REPO,
    TORCH_TARGETS,
    cli_command,
    hypernetwork_class,
    import_file,
    run_cli,
    run_python,
)
from torch import nn

from hypernn_gen import __version__
from hypernn_gen.cli import main
from hypernn_gen.config import load_jobs
from hypernn_gen.errors import GenerationError
from hypernn_gen.generate import GenerateOptions, generate
from hypernn_gen.runtime.torch import TorchHyperNetwork
from hypernn_gen.write import DIGEST_PREFIX

# -- fixtures -------------------------------------------------------------------------------------

MLP_TARGET = '''"""A small MLP target for the generator tests."""

import torch
from torch import nn

HIDDEN = 16


def make_target() -> nn.Module:
    return nn.Sequential(nn.Linear(8, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 3))


example_input = torch.zeros(2, 8)
'''

#: the same MLP without example inputs (dynamic mode then needs --input-shape)
MLP_NO_INPUT = MLP_TARGET.replace("\n\nexample_input = torch.zeros(2, 8)\n", "\n")


JOB_IDS = [f"{Path(j.target).stem}-{j.mode}" for j in load_jobs(REPO / "pyproject.toml")]
COMMITTED = sorted((REPO / "generated_examples").glob("*_torch_*.py"))


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread per test process: pytest -n 2 on 2 cores would oversubscribe them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with ``targets/mlp.py``; the cwd for the test."""
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "mlp.py").write_text(MLP_TARGET)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``hypernn-gen ARGS`` in-process; returns (exit code, stdout, stderr)."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    """The CLI's error output must be exactly one ``hypernn-gen: error: ...`` line."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert lines[0].startswith("hypernn-gen: error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


def stray_files(directory: Path) -> list[str]:
    """Temporary files a write may have left behind (``.NAME.*.tmp``)."""
    return sorted(p.name for p in directory.rglob("*") if p.name.endswith(".tmp"))


# -- golden files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(len(JOB_IDS)), ids=JOB_IDS)
def test_committed_files_match_regeneration(index: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each pyproject job, generated in memory with its own output path, equals the committed file."""
    monkeypatch.chdir(REPO)
    options = load_jobs(REPO / "pyproject.toml")[index]
    result = generate(options)
    committed = (REPO / result.path).read_text()
    if result.text != committed:
        diff = "".join(
            difflib.unified_diff(
                committed.splitlines(keepends=True),
                result.text.splitlines(keepends=True),
                f"{result.path} (committed)",
                f"{result.path} (regenerated)",
            )
        )
        pytest.fail(f"{result.path} is stale; run `hypernn-gen --force` in the repo root\n{diff}")


def test_every_committed_example_is_a_pyproject_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """No orphan in generated_examples/: each file there is the output of some job."""
    monkeypatch.chdir(REPO)
    outputs = {str(job_output(o)) for o in load_jobs(REPO / "pyproject.toml")}
    committed = {str(p.relative_to(REPO)) for p in COMMITTED}
    assert committed <= outputs, sorted(committed - outputs)


def job_output(options: GenerateOptions) -> Path:
    """Where a job writes (``-o`` may name a file or a directory), relative to the repo."""
    assert options.output is not None
    out = Path(options.output)
    if options.output.endswith("/") or (REPO / out).is_dir():
        stem = Path(options.target.partition(":")[0]).stem
        return out / f"{stem}_torch_{options.mode}.py"
    return out


def test_check_passes_on_the_repo() -> None:
    proc = run_cli(["--check"], cwd=REPO, timeout=600)  # every job: ~30 s alone, slow under load
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ok = [line for line in proc.stdout.splitlines() if line.startswith("ok")]
    assert len(ok) == len(JOB_IDS), proc.stdout


# -- determinism ----------------------------------------------------------------------------------


def _copy_jobs(tmp_path: Path) -> None:
    """targets/*.py and a pyproject whose jobs mirror the repo's, writing to out/."""
    (tmp_path / "targets").mkdir()
    for name in TORCH_TARGETS:
        src = REPO / "generated_examples" / "targets" / f"{name}.py"
        (tmp_path / "targets" / f"{name}.py").write_text(src.read_text())
    jobs = "".join(
        f'\n[[tool.hypernn-gen.jobs]]\ntarget = "targets/{name}.py"\nmode = "{mode}"\n'
        for name in TORCH_TARGETS
        for mode in ("static", "dynamic")
    )
    (tmp_path / "pyproject.toml").write_text(
        f'[tool.hypernn-gen]\nembedding-dim = 32\noutput = "out/"\n{jobs}'
    )


@pytest.fixture(scope="module")
def in_process_outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Every job of a copy of the repo's jobs, generated in this process: {output path: text}."""
    root = tmp_path_factory.mktemp("reference")
    _copy_jobs(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        results = [generate(options) for options in load_jobs(root / "pyproject.toml")]
    return {str(r.path): r.text for r in results}


@pytest.mark.slow
@pytest.mark.parametrize("seed", ["0", "1", "12345"])
def test_output_does_not_depend_on_the_hash_seed(
    seed: str, tmp_path: Path, in_process_outputs: dict[str, str]
) -> None:
    """Every job generated in a subprocess with PYTHONHASHSEED=seed equals in-process generation.

    The in-process reference ran under this interpreter's own (random) hash seed, so the three
    seeds and the reference compare four hash seeds byte for byte.
    """
    _copy_jobs(tmp_path)
    proc = run_cli([], cwd=tmp_path, env={"PYTHONHASHSEED": seed})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = {str(p.relative_to(tmp_path)): p.read_text() for p in (tmp_path / "out").glob("*.py")}
    assert sorted(written) == sorted(in_process_outputs)  # one file per job
    for name, text in in_process_outputs.items():
        assert written[name] == text, f"{name} differs under PYTHONHASHSEED={seed}"


# -- --check, --diff, writing ---------------------------------------------------------------------


def test_check_reports_current_stale_edited_and_missing(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["targets/mlp.py", "--backend", "torch", "-o", "gen.py"]
    code, out, _ = cli(capsys, *args)
    assert code == 0 and "wrote" in out
    path = work / "gen.py"

    code, out, _ = cli(capsys, *args, "--check")
    assert (code, out.split()) == (0, ["ok", "gen.py"])

    # generated with other options: stale (and --diff shows what would change)
    assert cli(capsys, *args[:-2], "--embedding-dim", "16", "-o", "gen.py")[0] == 0
    code, out, err = cli(capsys, *args, "--check")
    assert code == 1
    assert "FAILED    gen.py: stale" in out
    assert "regenerate" in err
    code, out, _ = cli(capsys, *args, "--diff")
    assert code == 0
    assert "-EMBEDDING_DIM = 16" in out and "+EMBEDDING_DIM = 32" in out
    assert "embedding_dim=16" in path.read_text()  # --diff wrote nothing

    # edited by hand
    assert cli(capsys, *args)[0] == 0
    path.write_text(path.read_text().replace("HIDDEN = 16", "HIDDEN = 17"))
    code, out, _ = cli(capsys, *args, "--check")
    assert code == 1 and "gen.py: edited by hand" in out

    # missing
    path.unlink()
    code, out, _ = cli(capsys, *args, "--check")
    assert code == 1 and "gen.py: missing" in out
    assert not path.exists()  # --check writes nothing


def test_check_on_a_current_file_after_diff_prints_nothing(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["targets/mlp.py", "--backend", "torch", "-o", "gen.py"]
    assert cli(capsys, *args)[0] == 0
    assert cli(capsys, *args, "--diff") == (0, "", "")


def test_writing_refuses_hand_edited_and_foreign_files(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["targets/mlp.py", "--backend", "torch", "-o", "gen.py"]
    path = work / "gen.py"
    assert cli(capsys, *args)[0] == 0
    fresh = path.read_text()

    edited = fresh.replace("nn.Tanh()", "nn.ReLU()")
    assert edited != fresh
    path.write_text(edited)
    code, out, err = cli(capsys, *args)
    assert code == 2 and out == ""
    line = one_line_error(err)
    assert "gen.py was edited by hand" in line and "--force" in line
    assert path.read_text() == edited

    foreign = "print('my own file')\n"
    path.write_text(foreign)
    code, _, err = cli(capsys, *args)
    assert code == 2
    line = one_line_error(err)
    assert "gen.py exists and was not written by hypernn-gen" in line and "--force" in line
    assert path.read_text() == foreign

    code, out, _ = cli(capsys, *args, "--force")
    assert code == 0 and "wrote" in out
    assert path.read_text() == fresh
    code, out, _ = cli(capsys, *args)  # a current file is left alone
    assert code == 0 and out.startswith("unchanged")
    assert stray_files(work) == []


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(
    work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["targets/mlp.py", "--backend", "torch", "-o", "out/gen.py"]
    assert cli(capsys, *args, "--embedding-dim", "16")[0] == 0
    old = (work / "out" / "gen.py").read_text()

    def refuse(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("hypernn_gen.write.os.replace", refuse)
    code, _, err = cli(capsys, *args)
    assert code == 2
    line = one_line_error(err)
    assert "No space left on device" in line and "out/gen.py" in line and "free some space" in line
    assert ".gen.py." not in line  # our hidden temporary file is not what the user should fix
    assert (work / "out" / "gen.py").read_text() == old
    assert sorted(p.name for p in (work / "out").iterdir()) == ["gen.py"]


def test_written_file_ends_with_its_digest(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import hashlib

    assert cli(capsys, "targets/mlp.py", "-o", "gen.py")[0] == 0
    text = (work / "gen.py").read_text()
    body, _, last = text.rstrip("\n").rpartition("\n")
    assert last == DIGEST_PREFIX + hashlib.sha256((body + "\n").encode()).hexdigest()


# -- provenance header ----------------------------------------------------------------------------


def header_lines(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


def test_provenance_header(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--mode", "dynamic", "--embedding-dim", "12", "--num-embeddings", "7", "-o", "out/"]
    assert cli(capsys, "targets/mlp.py", *args)[0] == 0
    path = work / "out" / "mlp_torch_dynamic.py"
    text = path.read_text()
    header = "\n".join(header_lines(text))

    # the layout digest, computed independently by the runtime's tracer
    target_net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    digest = TorchHyperNetwork(target_net, num_embeddings=7).layout.digest()  # both flat
    flat = 8 * 16 + 16 + 16 * 3 + 3
    assert f"hypernn-gen {__version__}: a dynamic hypernetwork for Mlp" in header
    assert "# target:   targets/mlp.py:make_target (torch, factory)" in header
    assert (
        "# options:  backend=torch mode=dynamic embedding_dim=12 num_embeddings=7 "
        f"chunk_dim={-(-flat // 7)}" in header
    )
    assert f"{flat:,} values" in header and f"digest {digest}" in header
    command = (
        "hypernn-gen targets/mlp.py --backend torch --mode dynamic --embedding-dim 12 "
        "--num-embeddings 7 -o out/mlp_torch_dynamic.py"
    )
    assert f"# command:  {command}" in header

    # no absolute paths, no timestamps, anywhere in the file
    assert str(work) not in text and str(REPO) not in text and str(Path.home()) not in text
    assert not re.search(r"\b\d{4}-\d{2}-\d{2}\b|\b\d{1,2}:\d{2}(:\d{2})?\b", text)

    # the target given as an absolute path: the same file, byte for byte
    path.unlink()
    assert cli(capsys, str(work / "targets" / "mlp.py"), *args)[0] == 0
    assert path.read_text() == text

    # the header's command, run from the same directory, regenerates the identical file
    path.unlink()
    argv = shlex.split(header.split("# command:  ", 1)[1].splitlines()[0])
    assert argv[0] == "hypernn-gen"
    proc = run_cli(argv[1:], cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert path.read_text() == text


def test_header_digest_matches_the_module_constant(work: Path) -> None:
    result = generate(GenerateOptions(target="targets/mlp.py", output="gen.py"))
    (work / "gen.py").write_text(result.text)
    module = import_file(work / "gen.py")
    assert f"digest {module.LAYOUT_DIGEST}" in result.text
    assert module.LAYOUT_DIGEST == result.layout.digest()


# -- templates ------------------------------------------------------------------------------------


def write_template(directory: Path, text: str) -> Path:
    path = directory / "torch" / "hypernetwork.py.jinja"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return path


def test_template_dir_can_extend_the_builtin_and_override_a_block(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_template(
        work / "tpl",
        '{% extends "builtin/torch/hypernetwork.py.jinja" %}\n'
        "{% block main %}\n"
        'if __name__ == "__main__":\n'
        "    net = {{ ctx.names.hypernetwork }}()\n"
        '    print("custom smoke", tuple(net.generate_params().shape), {{ ctx.embedding_dim }})\n'
        "{% endblock main %}\n",
    )
    code, _, err = cli(capsys, "targets/mlp.py", "--template-dir", "tpl", "-o", "gen.py")
    assert code == 0, err
    text = (work / "gen.py").read_text()
    assert 'print("custom smoke"' in text
    assert "Smoke example" not in text  # the built-in block was replaced
    assert "--template-dir tpl -o gen.py" in text  # and the header says how to regenerate
    proc = run_python(["gen.py"], cwd=work)
    assert proc.returncode == 0, proc.stderr
    flat_size = int(re.search(r"^FLAT_SIZE = ([\d_]+)$", text, re.M).group(1))
    assert flat_size >= 8 * 16 + 16 + 16 * 3 + 3  # the default layout pads to chunk boundaries
    assert proc.stdout.strip() == f"custom smoke ({flat_size},) 32"


def test_template_reading_an_unknown_context_name_fails_with_file_and_line(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_template(
        work / "tpl",
        '{% extends "builtin/torch/hypernetwork.py.jinja" %}\n'
        "{% block main %}\n"
        "# fine: {{ ctx.mode }}\n"
        "# broken: {{ ctx.nope }}\n"
        "{% endblock main %}\n",
    )
    code, out, err = cli(capsys, "targets/mlp.py", "--template-dir", "tpl", "-o", "gen.py")
    assert code == 2 and out == ""
    line = one_line_error(err)
    # the file as the loader found it (--template-dir as given), and the template line
    assert f"{Path('tpl', 'torch', 'hypernetwork.py.jinja')}:4:" in line, line
    assert path.read_text().splitlines()[3] == "# broken: {{ ctx.nope }}"
    assert "nope" in line
    assert not (work / "gen.py").exists()
    assert stray_files(work) == []


def test_template_syntax_error_names_file_and_line(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_template(work / "tpl", "# ok\n# ok\n{% if ctx.mode %}\n")
    code, _, err = cli(capsys, "targets/mlp.py", "--template-dir", "tpl", "-o", "gen.py")
    assert code == 2
    line = one_line_error(err)
    assert "hypernetwork.py.jinja:" in line and "template syntax error" in line


def test_template_rendering_invalid_python_fails_naming_the_template(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_template(
        work / "tpl",
        '{% extends "builtin/torch/hypernetwork.py.jinja" %}\n'
        "{% block main %}\n"
        "def broken(: pass\n"
        "{% endblock main %}\n",
    )
    code, _, err = cli(capsys, "targets/mlp.py", "--template-dir", "tpl", "-o", "gen.py")
    assert code == 2
    line = one_line_error(err)
    assert "torch/hypernetwork.py.jinja rendered invalid Python" in line
    assert "def broken(: pass" in line and "fix the template" in line
    assert not (work / "gen.py").exists()


def test_template_dir_that_does_not_exist(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "targets/mlp.py", "--template-dir", "nowhere", "-o", "gen.py")
    assert code == 2
    assert "--template-dir nowhere is not a directory" in one_line_error(err)


# -- formatter, running the generated files -------------------------------------------------------


def test_ruff_formatter_output_imports_and_runs(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    if shutil.which("ruff") is None:
        pytest.skip("ruff is not installed (pip install ruff)")
    code, _, err = cli(capsys, "targets/mlp.py", "--formatter", "ruff", "-o", "gen.py")
    assert code == 0, err
    text = (work / "gen.py").read_text()
    assert "--formatter ruff -o gen.py" in text
    proc = run_python(["gen.py"], cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert "output: (2, 3)" in proc.stdout

    module = import_file(work / "gen.py")
    net = hypernetwork_class(module)()
    out, params = net(torch.randn(5, 8), return_params=True)
    assert out.shape == (5, 3) and params.shape == (module.FLAT_SIZE,)


EXPECTED_OUTPUT = {"seed_mlp": (1, 4), "cnn": (2, 10), "transformer": (2, 16, 64)}


@pytest.mark.parametrize("path", COMMITTED, ids=[p.stem for p in COMMITTED])
def test_generated_example_runs_as_a_script(path: Path) -> None:
    proc = run_python([str(path.relative_to(REPO))], cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    name, mode = re.fullmatch(r"(.+)_torch_(static|dynamic)(_\w+)?", path.stem).group(1, 2)
    module_text = path.read_text()
    flat = int(re.search(r"^FLAT_SIZE = ([\d_]+)$", module_text, re.M).group(1))
    batch = EXPECTED_OUTPUT[name][0]
    params = (flat,) if mode == "static" else (batch, flat)
    assert f"output: {EXPECTED_OUTPUT[name]}" in proc.stdout, proc.stdout
    assert f"generated_params: {params}" in proc.stdout, proc.stdout


def test_generated_files_do_not_need_hypernn_gen(tmp_path: Path) -> None:
    """Every committed example imports and runs with ``hypernn_gen`` made unimportable."""
    for path in COMMITTED:
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+hypernn_gen", text, re.M), path
    script = (
        "import runpy, sys\n"
        "sys.modules['hypernn_gen'] = None  # any import of hypernn_gen now fails\n"
        "try:\n"
        "    import hypernn_gen\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('poisoning failed')\n"
        f"for path in {[str(p) for p in COMMITTED]!r}:\n"
        "    runpy.run_path(path, run_name='__main__')\n"
        "print('all ran', 'hypernn_gen' in sys.modules and sys.modules['hypernn_gen'] is None)\n"
    )
    proc = run_python(["-c", script], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("generated_params:") == len(COMMITTED)
    assert proc.stdout.strip().endswith("all ran True")


def test_check_layout_refuses_a_target_of_another_shape(tmp_path: Path) -> None:
    path = REPO / "generated_examples" / "seed_mlp_torch_static.py"
    module = import_file(path)
    other = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    with pytest.raises(
        ValueError, match=r"\('0.weight', \(256, 8\)\) != \('0.weight', \(32, 8\)\)"
    ):
        module.check_layout(other, module.GENERATED)
    with pytest.raises(ValueError, match="regenerate the file for the new target"):
        hypernetwork_class(module)(other)
    fewer = nn.Sequential(nn.Linear(8, 256), nn.Tanh(), nn.Linear(256, 256))
    with pytest.raises(ValueError, match="5 generated tensors expected, the target has 4"):
        module.check_layout(fewer, module.GENERATED)
    module.check_layout(module.make_target(), module.GENERATED)  # the right shape passes


# -- bad input ------------------------------------------------------------------------------------


def test_wrong_backend_says_which_to_use(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "targets/mlp.py", "--backend", "flax", "-o", "gen.py")
    assert code == 2 and out == ""
    line = one_line_error(err)
    assert "targets/mlp.py:make_target is a torch target" in line
    assert line.endswith("use --backend torch")
    assert not (work / "gen.py").exists()


def test_dynamic_mode_without_example_input_asks_for_input_shape(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (work / "targets" / "bare.py").write_text(MLP_NO_INPUT)
    code, _, err = cli(capsys, "targets/bare.py", "--mode", "dynamic", "-o", "gen.py")
    assert code == 2
    line = one_line_error(err)
    assert "dynamic mode needs the shape of the conditioning input" in line
    assert "pass --input-shape" in line
    # ... and with it, the file is generated and its condition shape is the one given
    code, _, err = cli(
        capsys, "targets/bare.py", "--mode", "dynamic", "--input-shape", "3,8", "-o", "gen.py"
    )
    assert code == 0, err
    text = (work / "gen.py").read_text()
    assert "CONDITION_SHAPE = (8,)" in text and "--input-shape 3,8" in text
    # static mode needs no example input
    assert cli(capsys, "targets/bare.py", "-o", "static.py")[0] == 0


@pytest.mark.parametrize("name", ["GENERATED", "check_layout", "MlpHyperNetwork"])
def test_target_defining_a_reserved_name_is_refused(
    name: str, work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = (
        MLP_TARGET.replace("HIDDEN", name)
        if name.isupper()
        else MLP_TARGET.replace(
            "def make_target", f"def {name}() -> int:\n    return 16\n\n\ndef make_target"
        ).replace("nn.Linear(8, HIDDEN)", f"nn.Linear(8, {name}())")
    )
    (work / "targets" / "mlp.py").write_text(source)
    code, _, err = cli(capsys, "targets/mlp.py", "-o", "gen.py")
    assert code == 2
    line = one_line_error(err)
    assert f"defines {name!r}, a name the generated file needs for itself" in line
    assert "rename it" in line


TIED_TARGET = '''"""Tied weights and an excluded layer: every optional block of the template renders."""

import torch
from torch import nn


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("offset", torch.zeros(6))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.emb(idx) + self.offset)))


example_input = torch.zeros(2, 5, dtype=torch.long)
'''


@pytest.mark.parametrize("name", ["FLAT_SIZE", "FUSED", "Shared", "install_fusion"])
def test_target_using_a_template_helper_name_is_refused(
    name: str, work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = MLP_TARGET.replace("HIDDEN = 16", f"{name} = 16").replace("HIDDEN", name)
    (work / "targets" / "mlp.py").write_text(source)
    code, _, err = cli(capsys, "targets/mlp.py", "--mode", "dynamic", "-o", "gen.py")
    assert code == 2
    assert f"defines {name!r}, a name the generated file needs" in one_line_error(err)


def test_reserved_name_the_target_does_not_use_is_fine(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (work / "targets" / "mlp.py").write_text(MLP_TARGET + "\nGENERATED = 'unrelated'\n")
    code, _, err = cli(capsys, "targets/mlp.py", "-o", "gen.py")
    assert code == 0, err
    assert "unrelated" not in (work / "gen.py").read_text()


def test_missing_target_file(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "targets/nope.py", "-o", "gen.py")
    assert code == 2 and out == ""
    line = one_line_error(err)
    assert "target file targets/nope.py not found" in line


# -- pyproject configuration ----------------------------------------------------------------------


def test_unknown_pyproject_key_suggests_the_right_one(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pyproject = work / "pyproject.toml"
    pyproject.write_text(
        '[tool.hypernn-gen]\nembeding-dim = 16\n\n[[tool.hypernn-gen.jobs]]\ntarget = "targets/mlp.py"\n'
    )
    with pytest.raises(
        GenerationError, match=r"unknown key 'embeding-dim'; did you mean 'embedding-dim'\?"
    ):
        load_jobs(pyproject)
    code, _, err = cli(capsys, "--config", "pyproject.toml")
    assert code == 2
    assert "did you mean 'embedding-dim'?" in one_line_error(err)

    pyproject.write_text(
        '[tool.hypernn-gen]\n\n[[tool.hypernn-gen.jobs]]\ntarget = "targets/mlp.py"\nmdoe = "dynamic"\n'
    )
    with pytest.raises(GenerationError, match=r"#1: unknown key 'mdoe'; did you mean 'mode'\?"):
        load_jobs(pyproject)


def test_jobs_run_from_a_pyproject_given_with_config(
    work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    project = work / "project"
    project.mkdir()
    (work / "targets").rename(project / "targets")
    (project / "pyproject.toml").write_text(
        "[tool.hypernn-gen]\n"
        "embedding-dim = 8\n"
        'output = "gen/"\n\n'
        "[[tool.hypernn-gen.jobs]]\n"
        'target = "targets/mlp.py"\n\n'
        "[[tool.hypernn-gen.jobs]]\n"
        'target = "targets/mlp.py:make_target"\n'
        'mode = "dynamic"\n'
        "num-embeddings = 5\n"
        'output = "gen/dyn.py"\n'
    )
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths in the pyproject are relative to its directory
    code, out, err = cli(capsys, "--config", "../project/pyproject.toml")
    assert code == 0, err
    static = project / "gen" / "mlp_torch_static.py"
    dynamic = project / "gen" / "dyn.py"
    assert static.exists() and dynamic.exists()
    assert sorted(p.name for p in (project / "gen").iterdir()) == ["dyn.py", "mlp_torch_static.py"]
    assert "EMBEDDING_DIM = 8" in static.read_text()
    assert (
        "NUM_EMBEDDINGS = 5" in dynamic.read_text() and "EMBEDDING_DIM = 8" in dynamic.read_text()
    )
    assert len(out.strip().splitlines()) == 2

    code, out, _ = cli(capsys, "--config", "../project/pyproject.toml", "--check")
    assert code == 0 and out.count("ok ") == 2
    dynamic.unlink()
    code, out, _ = cli(capsys, "--config", "../project/pyproject.toml", "--check")
    assert code == 1 and "dyn.py: missing" in out


def test_pyproject_output_directory_that_does_not_exist_yet(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``output = "gen/"`` names a directory even before it exists: one file per job in it."""
    (work / "pyproject.toml").write_text(
        '[tool.hypernn-gen]\noutput = "gen/"\n\n'
        '[[tool.hypernn-gen.jobs]]\ntarget = "targets/mlp.py"\n\n'
        '[[tool.hypernn-gen.jobs]]\ntarget = "targets/mlp.py"\nmode = "dynamic"\n'
    )
    assert [o.output for o in load_jobs(work / "pyproject.toml")] == ["gen/", "gen/"]
    code, _, err = cli(capsys, "--config", "pyproject.toml")
    assert code == 0, err
    assert (work / "gen").is_dir()
    assert sorted(p.name for p in (work / "gen").iterdir()) == [
        "mlp_torch_dynamic.py",
        "mlp_torch_static.py",
    ]


def test_pyproject_without_jobs(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (work / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    code, _, err = cli(capsys, "--config", "pyproject.toml")
    assert code == 2
    assert "has no [tool.hypernn-gen] section" in one_line_error(err)


def test_cli_command_helper_runs_the_installed_script() -> None:
    # guards the subprocess tests above: they must run this checkout's hypernn-gen
    proc = run_cli(["--version"], cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == f"hypernn-gen {__version__}"
    assert cli_command()


def test_pyproject_jobs_without_tomllib(work: Path) -> None:
    """On Python 3.10 there is no tomllib; jobs are read with tomli (black requires it there)."""
    (work / "pyproject.toml").write_text(
        '[tool.hypernn-gen]\noutput = "gen/"\n\n[[tool.hypernn-gen.jobs]]\ntarget = "targets/mlp.py"\n'
    )
    script = (
        "import sys, tomllib\n"
        "sys.modules['tomli'] = tomllib  # stands in for the tomli package\n"
        "sys.modules['tomllib'] = None  # as on Python 3.10\n"
        "from hypernn_gen.cli import main\n"
        "sys.exit(main(['--config', 'pyproject.toml']))\n"
    )
    proc = run_python(["-c", script], cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert (work / "gen" / "mlp_torch_static.py").exists()


def test_committed_files_have_sorted_imports() -> None:
    """Every committed generated file's imports are in isort order (ruff's ``I`` rules): the
    standard library, then the rest, ``import x`` before ``from x import y`` in each group."""
    import shutil
    import subprocess

    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed")
    root = Path(__file__).resolve().parents[1]
    files = [
        str(p)
        for folder in ("generated_examples", "examples")
        for p in sorted((root / folder).rglob("*.py"))
        if p.read_text(encoding="utf-8").startswith("# Generated by hypernn-gen")
    ]
    assert len(files) > 20
    done = subprocess.run(
        [ruff, "check", "--isolated", "--select", "I", *files], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-2000:]
