"""Hostile inputs and environments (issue 14): every case ends in one line, exit 2, nothing lost.

Each failure case checks the exit code, exactly one ``hypernn-gen: error:`` line on stderr, no
traceback, that the fix is named, and that no file was lost or half-written. Cases that could
hang run in a subprocess with a timeout, so a regression fails instead of blocking the suite.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from hypernn_gen.cli import main
from hypernn_gen.load import load_target

ROOT = Path(__file__).resolve().parents[1]

TINY = """
import torch
from torch import nn


def make_target():
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


example_input = torch.zeros(2, 4)
"""


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "tiny.py").write_text(TINY)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source).lstrip())
    return path


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert lines[0].startswith("hypernn-gen: error: "), lines[0]
    assert "Traceback" not in err
    assert "unexpected" not in lines[0], lines[0]
    return lines[0]


def run_tool(cwd: Path, *args: str, timeout: float = 120, stdin: int | None = None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "hypernn_gen", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=stdin,
    )


def pyproject(root: Path, jobs: str) -> None:
    (root / "pyproject.toml").write_text(
        "[tool.hypernn-gen]\nembedding-dim = 4\n\n" + textwrap.dedent(jobs)
    )


# -- --check and jobs -----------------------------------------------------------------------------


def test_check_passes_from_a_subfolder(work: Path, capsys, monkeypatch) -> None:
    pyproject(work, '[[tool.hypernn-gen.jobs]]\ntarget = "tiny.py"\noutput = "gen/tiny_gen.py"\n')
    assert cli(capsys, "--config", str(work / "pyproject.toml"))[0] == 0
    at_root = (work / "gen" / "tiny_gen.py").read_text()
    assert "command:  hypernn-gen tiny.py" in at_root
    (work / "sub").mkdir()
    monkeypatch.chdir(work / "sub")
    code, out, _ = cli(capsys, "--check", "--config", str(work / "pyproject.toml"))
    assert code == 0 and out.startswith("ok"), out
    # and regenerating from there writes nothing new
    assert cli(capsys, "--config", str(work / "pyproject.toml"))[1].startswith("unchanged")
    assert (work / "gen" / "tiny_gen.py").read_text() == at_root


def test_two_jobs_with_one_output_are_refused(work: Path, capsys) -> None:
    (work / "tiny2.py").write_text(TINY)
    pyproject(
        work,
        """
        [[tool.hypernn-gen.jobs]]
        target = "tiny.py"
        output = "gen.py"

        [[tool.hypernn-gen.jobs]]
        target = "tiny2.py"
        output = "./gen.py"
        """,
    )
    code, out, err = cli(capsys)
    assert code == 2 and out == ""
    line = one_error(err)
    assert "two jobs write" in line and "tiny.py" in line and "tiny2.py" in line
    assert "its own output" in line
    assert not (work / "gen.py").exists()


# -- hangs ----------------------------------------------------------------------------------------


def test_endless_loop_at_import_hits_the_load_timeout(work: Path, capsys) -> None:
    write(work / "loop.py", TINY + "\nwhile True:\n    pass\n")
    start = time.monotonic()
    code, _, err = cli(capsys, "loop.py", "--load-timeout", "1", "-o", "out.py")
    assert time.monotonic() - start < 30
    assert code == 2
    line = one_error(err)
    assert "longer than 1 s" in line and "--load-timeout" in line and "loop.py" in line
    assert not (work / "out.py").exists()


def test_a_bad_load_timeout_is_a_usage_error(work: Path, capsys) -> None:
    code, _, err = cli(capsys, "tiny.py", "--load-timeout", "-3")
    assert code == 2 and "--load-timeout" in err and "seconds >= 0" in err


def test_input_at_import_reads_eof_instead_of_waiting(work: Path) -> None:
    write(work / "asks.py", "name = input('size? ')\n" + TINY)
    result = run_tool(work, "asks.py", "-o", "out.py", stdin=subprocess.PIPE, timeout=120)
    assert result.returncode == 2, result.stderr
    line = one_error(result.stderr.replace("size? ", ""))
    assert "EOFError" in line and "asks.py line 1" in line and "fix the target file" in line
    assert not (work / "out.py").exists()


def test_a_target_that_leaves_a_thread_running_still_exits(work: Path) -> None:
    write(
        work / "threads.py",
        "import threading, time\n"
        "threading.Thread(target=time.sleep, args=(3600,)).start()\n" + TINY,
    )
    result = run_tool(work, "threads.py", "-o", "out.py", timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("wrote")
    assert "# hypernn-gen: sha256=" in (work / "out.py").read_text().splitlines()[-1]


def test_output_fifo_is_refused_without_blocking(work: Path, capsys) -> None:
    os.mkfifo(work / "pipe.py")
    for extra in ((), ("--force",), ("--check",), ("--diff",)):
        code, _, err = cli(capsys, "tiny.py", "-o", "pipe.py", *extra)
        assert code == 2
        line = one_error(err)
        assert "pipe.py is a FIFO" in line and "regular file" in line
    assert (work / "pipe.py").is_fifo()


# -- nothing a person wrote is replaced -----------------------------------------------------------


def test_force_never_replaces_a_symlink(work: Path, capsys) -> None:
    mine = work / "mine.py"
    mine.write_text("# my own code\n")
    (work / "link.py").symlink_to(mine)
    code, _, err = cli(capsys, "tiny.py", "-o", "link.py", "--force")
    assert code == 2
    line = one_error(err)
    assert "symbolic link" in line and "remove the link" in line
    assert (work / "link.py").is_symlink() and mine.read_text() == "# my own code\n"


def test_force_never_replaces_a_device(work: Path, capsys) -> None:
    code, _, err = cli(capsys, "tiny.py", "-o", "/dev/null", "--force")
    assert code == 2
    assert "/dev/null is a device or special file" in one_error(err)
    assert Path("/dev/null").is_char_device()


def test_a_target_that_chdirs_does_not_move_the_output(work: Path, capsys) -> None:
    (work / "elsewhere").mkdir()
    write(
        work / "moves.py",
        "import os\nos.chdir(os.path.join(os.path.dirname(__file__), 'elsewhere'))\n" + TINY,
    )
    code, out, _ = cli(capsys, "moves.py", "-o", "out.py")
    assert code == 0 and "out.py" in out
    assert (work / "out.py").exists() and not (work / "elsewhere" / "out.py").exists()
    assert Path.cwd() == work


def test_a_stale_temp_file_of_ours_is_cleaned(work: Path, capsys) -> None:
    stale = work / ".out.py.abc123.tmp"
    stale.write_text("half a file")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    fresh = work / ".out.py.def456.tmp"  # a concurrent run's: too young to touch
    fresh.write_text("being written")
    other = work / ".notes.abc.tmp"  # not ours
    other.write_text("keep")
    os.utime(other, (old, old))
    assert cli(capsys, "tiny.py", "-o", "out.py")[0] == 0
    assert not stale.exists() and fresh.exists() and other.exists()


def test_force_never_replaces_the_target_file(work: Path, capsys) -> None:
    mine = (work / "tiny.py").read_text()
    (work / "link_to_tiny.py").symlink_to(work / "tiny.py")
    for spec, out in (("tiny.py", "tiny.py"), ("link_to_tiny.py", "./tiny.py")):
        code, _, err = cli(capsys, spec, "-o", out, "--force")
        assert code == 2
        line = one_error(err)
        assert "is the target file of" in line and "even with --force" in line
        assert "choose another -o path" in line
        assert (work / "tiny.py").read_text() == mine
    pyproject(  # a job's output that is another job's target
        work,
        """
        [[tool.hypernn-gen.jobs]]
        target = "tiny.py"
        output = "two.py"

        [[tool.hypernn-gen.jobs]]
        target = "two.py"
        """,
    )
    (work / "two.py").write_text(mine)
    code, _, err = cli(capsys, "--force")
    assert code == 2 and "-o two.py is the target file of two.py" in one_error(err)
    assert (work / "two.py").read_text() == mine


def test_a_real_ctrl_c_while_loading_is_one_line_exit_130(work: Path) -> None:
    import signal

    write(
        work / "slow.py",
        "import pathlib, time\npathlib.Path('started').touch()\ntime.sleep(120)\n" + TINY,
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "hypernn_gen", "slow.py", "-o", "out.py"],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own SIGINT handler, as in a terminal
    )
    deadline = time.monotonic() + 120
    while not (work / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out, err) == (130, "", "hypernn-gen: interrupted\n")
    assert not (work / "out.py").exists()


# -- OS errors: one line naming the real path -----------------------------------------------------


def test_read_only_folder_names_the_output_not_the_temp(work: Path, capsys, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(work / "ro" / ".out.py.x.tmp"))

    (work / "ro").mkdir()
    monkeypatch.setattr("hypernn_gen.write.tempfile.mkstemp", refuse)
    code, _, err = cli(capsys, "tiny.py", "-o", "ro/out.py")
    assert code == 2
    line = one_error(err)
    assert "ro/out.py" in line and "Permission denied" in line and "writable" in line
    assert ".out.py." not in line
    assert list((work / "ro").iterdir()) == []


def test_disk_full_leaves_the_old_file_and_no_temp(work: Path, capsys, monkeypatch) -> None:
    assert cli(capsys, "tiny.py", "-o", "out.py", "--embedding-dim", "4")[0] == 0
    old = (work / "out.py").read_text()

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("hypernn_gen.write.os.write", full)
    code, _, err = cli(capsys, "tiny.py", "-o", "out.py")
    assert code == 2
    line = one_error(err)
    assert "out.py" in line and "No space left" in line and "free some space" in line
    assert (work / "out.py").read_text() == old
    assert sorted(p.name for p in work.iterdir() if p.name.endswith(".tmp")) == []


def test_a_proc_path_is_one_line(work: Path, capsys) -> None:
    code, _, err = cli(capsys, "tiny.py", "-o", "/proc/self/hypernn_out.py", "--force")
    assert code == 2
    line = one_error(err)
    assert "/proc/self/hypernn_out.py" in line and "choose another -o path" in line


# -- unusual but valid targets --------------------------------------------------------------------


def test_a_file_name_starting_with_a_digit_gives_valid_classes(work: Path, capsys) -> None:
    (work / "2layer_mlp.py").write_text(TINY)
    code, _, err = cli(capsys, "2layer_mlp.py", "-o", "gen.py")
    assert code == 0, err
    source = (work / "gen.py").read_text()
    compile(source, "gen.py", "exec")
    assert re.search(r"^class Target2layerMlp\w*", source, re.M)


def test_a_target_in_a_package_with_relative_imports(work: Path, capsys) -> None:
    write(work / "pkg" / "__init__.py", "")
    write(work / "pkg" / "models" / "__init__.py", "")
    write(
        work / "pkg" / "models" / "layers.py",
        "from torch import nn\n\nclass Block(nn.Module):\n    def __init__(self):\n"
        "        super().__init__()\n        self.fc = nn.Linear(4, 3)\n\n"
        "    def forward(self, x):\n        return self.fc(x)\n",
    )
    write(
        work / "pkg" / "models" / "net.py",
        "import torch\nfrom .layers import Block\n\n\ndef make_target():\n    return Block()\n\n\n"
        "example_input = torch.zeros(2, 4)\n",
    )
    loaded = load_target("pkg/models/net.py")
    assert loaded.source_module.__name__ == "pkg.models.net"
    built = loaded.factory()
    assert type(built).__name__ == "Block"
    assert [tuple(p.shape) for p in built.parameters()] == [(3, 4), (3,)]
    code, out, err = cli(capsys, "inspect", "pkg/models/net.py", "--json", "--chunking", "flat")
    assert code == 0, err
    assert json.loads(out)["flat_size"] == 15
    # the generated file is standalone: the relative import became an absolute one
    assert cli(capsys, "pkg/models/net.py", "-o", "gen.py")[0] == 0
    source = (work / "gen.py").read_text()
    assert "from pkg.models.layers import Block" in source and "from .layers" not in source
    check = "import gen, torch; n = gen.__dict__; print('ok')"
    result = subprocess.run([sys.executable, "-c", check], cwd=work, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize(
    "prefix", [b"# -*- coding: latin-1 -*-\n", b"\xef\xbb\xbf"], ids=["latin1", "bom"]
)
def test_coding_line_and_bom_are_valid_python(work: Path, capsys, prefix: bytes) -> None:
    encoding = "latin-1" if b"latin" in prefix else "utf-8"
    body = '"""Caf\u00e9 net."""\n' + TINY + "\nLABEL = 'd\u00e9j\u00e0'\n"
    (work / "enc.py").write_bytes(prefix + body.encode(encoding))
    loaded = load_target("enc.py")
    assert loaded.source_module.LABEL == "d\u00e9j\u00e0"
    code, _, err = cli(capsys, "enc.py", "-o", "gen.py")
    assert code == 0, err
    source = (work / "gen.py").read_text(encoding="utf-8")
    assert "\ufeff" not in source
    compile(source, "gen.py", "exec")


def test_prints_at_import_stay_off_stdout(work: Path, capsys) -> None:
    write(work / "chatty.py", "print('hello from the target')\n" + TINY)
    code, out, err = cli(capsys, "inspect", "chatty.py", "--json", "--chunking", "flat")
    assert code == 0
    assert json.loads(out)["flat_size"] == 4 * 3 + 3 + 3 * 2 + 2
    assert "hello from the target" in err
    code, out, err = cli(capsys, "chatty.py", "-o", "gen.py", "--diff")
    assert code == 0
    assert out.startswith("--- gen.py") and "hello" not in out


# -- specific messages instead of "unexpected ..." or a generic fix -------------------------------

LAZY_FACTORY = (
    "import torch\nfrom torch import nn\n\n\ndef make_target():\n    return nn.LazyLinear(3)\n"
)
CLASS = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = {layer}

    def forward(self, x):
        return self.fc(x)


example_input = torch.zeros(2, 4)
"""


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (LAZY_FACTORY + "\nexample_input = torch.zeros(2, 4)\n", "lazy"),
        (CLASS.format(layer="nn.LazyLinear(3)"), "lazy module"),
        (LAZY_FACTORY.replace("nn.LazyLinear(3)", "nn.Linear(4, 3).cuda()"), ".cuda()"),
        (CLASS.format(layer="nn.Linear(4, 3).cuda()"), ".cuda()"),
    ],
    ids=["lazy-factory", "lazy-class", "cuda-factory", "cuda-class"],
)
def test_lazy_modules_and_cuda_get_a_specific_fix(work: Path, capsys, source, expected) -> None:
    write(work / "special.py", source)
    code, _, err = cli(capsys, "special.py", "-o", "gen.py")
    assert code == 2
    line = one_error(err)
    assert expected in line
    fix = "in_features" if expected.startswith("lazy") else "build it on the CPU"
    assert fix in line and "builds with no arguments" not in line
    assert not (work / "gen.py").exists()


def test_a_builder_that_reads_values_on_meta_is_built_for_real(work: Path, capsys) -> None:
    """timm's ConvNeXt reads its drop-path rates with ``torch.linspace(...).tolist()``: on the
    meta device that fails ("Cannot copy out of meta tensor"), which is no device move; the
    target is built for real (seeded) and the header says so."""
    write(
        work / "rates.py",
        "import torch\nfrom torch import nn\n\n\ndef make_target():\n"
        "    rates = torch.linspace(0, 0.1, 3).tolist()\n"
        "    return nn.Sequential(nn.Linear(4, 3), nn.Dropout(rates[1]), nn.Linear(3, 2))\n\n\n"
        "example_input = torch.zeros(2, 4)\n",
    )
    code, out, err = cli(capsys, "rates.py", "-o", "gen.py")
    assert code == 0 and out.startswith("wrote"), err
    source = (work / "gen.py").read_text()
    assert "traced by a real build under torch.manual_seed(0)" in source
    assert "the target moves itself to a device" not in err


def test_a_template_that_raises_names_its_file(work: Path, capsys) -> None:
    write(work / "tpl" / "torch" / "hypernetwork.py.jinja", "{{ ctx.embedding_dim // 0 }}\n")
    code, _, err = cli(capsys, "tiny.py", "--template-dir", "tpl", "-o", "gen.py")
    assert code == 2
    line = one_error(err)
    assert "tpl/torch/hypernetwork.py.jinja:1" in line and "ZeroDivisionError" in line
    assert "fix that template" in line and not (work / "gen.py").exists()


def test_a_template_that_is_not_utf8(work: Path, capsys) -> None:
    path = work / "tpl" / "torch" / "hypernetwork.py.jinja"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"caf\xe9 {{ ctx.embedding_dim }}\n")
    code, _, err = cli(capsys, "tiny.py", "--template-dir", "tpl", "-o", "gen.py")
    assert code == 2
    line = one_error(err)
    assert "not UTF-8" in line and "tpl" in line and "save the template as UTF-8" in line


def test_templates_export_onto_a_file(work: Path, capsys) -> None:
    (work / "afile").write_text("mine\n")
    code, out, err = cli(capsys, "templates", "export", "afile")
    assert code == 2 and out == ""
    line = one_error(err)
    assert "afile is a file, not a directory" in line
    assert (work / "afile").read_text() == "mine\n"


def test_the_unchecked_input_shape_note_is_printed(work: Path, capsys) -> None:
    write(
        work / "item.py",
        CLASS.format(layer="nn.Linear(4, 3)").replace(
            "return self.fc(x)", "return self.fc(x) * float(x.sum().item() + 1)"
        ),
    )
    code, out, err = cli(capsys, "item.py", "-o", "gen.py")
    assert code == 0 and out.startswith("wrote")
    notes = [line for line in err.splitlines() if line.startswith("hypernn-gen: note: ")]
    assert len(notes) == 1 and "not checked" in notes[0] and "gen.py" in notes[0]
    assert "not checked" in (work / "gen.py").read_text()


# -- the example call is checked during generation ------------------------------------------------


def test_int64_into_a_linear_fails_at_generation(work: Path, capsys) -> None:
    write(
        work / "lin.py",
        "from torch import nn\n\n\ndef make_target():\n    return nn.Linear(4, 3)\n",
    )
    code, _, err = cli(
        capsys, "lin.py", "--input-shape", "2,4", "--input-dtype", "int64", "-o", "g.py"
    )
    assert code == 2
    line = one_error(err)
    assert "input dtype int64 does not fit" in line and "--input-dtype" in line
    assert not (work / "g.py").exists()
    # the reference: the plain target on the CPU refuses the same call
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.nn.Linear(4, 3)(torch.zeros(2, 4, dtype=torch.int64))
    code, out, _ = cli(capsys, "lin.py", "--input-shape", "2,4", "-o", "g.py")
    assert code == 0 and out.startswith("wrote")


def test_nnx_targets_are_checked_against_the_input_shape(work: Path, capsys) -> None:
    pytest.importorskip("flax.nnx")
    target = ROOT / "generated_examples" / "targets" / "nnx_mlp.py"
    code, _, err = cli(capsys, "inspect", str(target), "--input-shape", "2,5")
    assert code == 2
    line = one_error(err)
    assert "input shape (2, 5) does not fit" in line and "--input-shape" in line
    assert "nnx_mlp.py line" in line
    assert cli(capsys, "inspect", str(target), "--input-shape", "2,8")[0] == 0


# -- a forward that never returns hits the same limit ---------------------------------------------

LOOPING_FORWARD = CLASS.format(layer="nn.Linear(4, 3)").replace(
    "return self.fc(x)", "while True:\n            pass"
)
LOOPING_LINEN = """
import jax.numpy as jnp
from flax import linen as nn


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        while True:
            pass


example_input = jnp.zeros((2, 4))
"""


@pytest.mark.parametrize(
    ("source", "args"),
    [
        (LOOPING_FORWARD, ()),
        (LOOPING_FORWARD, ("--mode", "dynamic")),
        (LOOPING_FORWARD, ("inspect",)),
        (LOOPING_LINEN, ()),
    ],
    ids=["torch-static", "torch-dynamic", "torch-inspect", "linen-eval-shape"],
)
def test_a_forward_that_loops_hits_the_load_timeout(work: Path, capsys, source, args) -> None:
    if "flax" in source:
        pytest.importorskip("flax.linen")
    write(work / "spin.py", source)
    inspect = args == ("inspect",)
    command = ["inspect", "spin.py"] if inspect else ["spin.py", *args, "-o", "out.py"]
    start = time.monotonic()
    code, out, err = cli(capsys, *command, "--load-timeout", "1")
    assert time.monotonic() - start < 60
    assert code == 2 and out == ""
    line = one_error(err)
    assert "loading and tracing spin.py took longer than 1 s" in line
    assert "in its forward" in line and "--load-timeout" in line
    assert not (work / "out.py").exists()


# -- excluded tensors are never generated, so their dtype does not matter -------------------------

COMPLEX = {
    "torch": """
        import torch
        from torch import nn


        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 3)
                self.phase = nn.Parameter(torch.full((3,), 0.5 + 0.25j, dtype=torch.complex64))

            def forward(self, x):
                return self.fc(x) * self.phase.real
        """,
    "nnx": """
        import jax.numpy as jnp
        from flax import nnx


        class Net(nnx.Module):
            def __init__(self, rngs=None):
                self.fc = nnx.Linear(4, 3, rngs=rngs or nnx.Rngs(0))
                self.phase = nnx.Param(jnp.full((3,), 0.5 + 0.25j, jnp.complex64))

            def __call__(self, x):
                return self.fc(x) * self.phase[...].real
        """,
    "linen": """
        import jax.numpy as jnp
        from flax import linen as nn


        class Net(nn.Module):
            @nn.compact
            def __call__(self, x):
                phase = self.param("phase", lambda k, s: jnp.full(s, 0.5 + 0.25j, jnp.complex64), (3,))
                return nn.Dense(3)(x) * phase.real
        """,
}
KEEP_OUT = {
    "torch": ("requires_grad=False", "nn.Parameter(torch.full(", "nn.Parameter(torch.full("),
    "nnx": ("nnx.Variable instead of an nnx.Param", "nnx.Param(", "nnx.Variable("),
    "linen": (
        "collection other than 'params'",
        'self.param("phase", ',
        'self.variable("consts", "phase", ',
    ),
}


@pytest.mark.parametrize("framework", ["torch", "nnx", "linen"])
def test_complex_parameters_are_accepted_when_excluded(work: Path, capsys, framework) -> None:
    if framework != "torch":
        pytest.importorskip("flax.nnx")
    source = textwrap.dedent(COMPLEX[framework]) + (
        "\n\nexample_input = "
        + ("torch.zeros(2, 4)" if framework == "torch" else "jnp.zeros((2, 4))")
        + "\n"
    )
    write(work / "cplx.py", source)
    code, _, err = cli(capsys, "cplx.py", "-o", "gen.py")
    assert code == 2
    line = one_error(err)
    advice, old, new = KEEP_OUT[framework]
    assert "'phase' has dtype complex64" in line and "--exclude 'phase'" in line
    assert advice in line, line
    other = {"torch": "nnx", "nnx": "requires_grad", "linen": "requires_grad"}[framework]
    assert other not in line  # advice of this framework only
    assert not (work / "gen.py").exists()
    # the advised --exclude works: the file runs its own example, phase stays the target's
    code, out, _ = cli(
        capsys, "cplx.py", "--exclude", "phase", "-o", "gen.py", "--chunking", "flat"
    )
    assert code == 0 and "2 tensors" in out, out
    result = run_python_file(work, "gen.py")
    assert result.returncode == 0, result.stderr
    assert "output: (2, 3)" in result.stdout and "generated_params: (15,)" in result.stdout
    # and so does the framework's own way of keeping it out
    kept_out = source.replace(old, new, 1)
    if framework == "linen":
        kept_out = kept_out.replace("(3,))", "(3,)).value", 1).replace(
            "lambda k, s: jnp.full(s,", "lambda s: jnp.full(s,", 1
        )
    if framework == "torch":
        kept_out = kept_out.replace("complex64))", "complex64), requires_grad=False)", 1)
    write(work / "kept.py", kept_out)
    code, out, err = cli(capsys, "kept.py", "-o", "kept_gen.py")  # runs the example call too
    assert code == 0 and "2 tensors" in out, err
    if framework == "torch":  # (Flax files: the --exclude one above ran; a jax import is slow)
        result = run_python_file(work, "kept_gen.py")
        assert result.returncode == 0, result.stderr


def run_python_file(cwd: Path, name: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH="", OMP_NUM_THREADS="1")  # no hypernn_gen at run time
    return subprocess.run(
        [sys.executable, name], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_complex_and_a_typo_in_exclude(work: Path, capsys) -> None:
    write(
        work / "cplx.py",
        textwrap.dedent(COMPLEX["torch"]) + "\nexample_input = torch.zeros(2, 4)\n",
    )
    code, _, err = cli(capsys, "cplx.py", "--exclude", "fc.*", "-o", "gen.py")
    assert code == 2 and "--exclude 'phase'" in one_error(err)
    code, _, err = cli(capsys, "cplx.py", "--exclude", "phase", "--exclude", "nope.*", "-o", "g.py")
    assert code == 2
    line = one_error(err)
    assert "--exclude 'nope.*' matches no parameter" in line and "phase" in line


# -- recurrent layers in dynamic mode: the advice works --------------------------------------------

LSTM = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.LSTM(4, 8, batch_first=True)
        self.head = nn.Linear(8, 8)

    def forward(self, x):
        return self.head(self.fc(x)[0][:, -1])


example_input = torch.zeros(2, 5, 4)
"""
LSTM_CELL = (
    CLASS.format(layer="nn.LSTMCell(4, 8)")
    .replace("return self.fc(x)", "return self.fc(x[:, 0])[0]")
    .replace("torch.zeros(2, 4)", "torch.zeros(2, 5, 4)")
)
GATES = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.gates = nn.Linear(4 + 8, 4 * 8)

    def forward(self, x):
        h = c = x.new_zeros(x.shape[0], 8)
        for t in range(x.shape[1]):
            i, f, g, o = self.gates(torch.cat([x[:, t], h], -1)).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        return h


example_input = torch.zeros(2, 5, 4)
"""


def test_recurrent_layers_in_dynamic_mode_get_advice_that_works(work: Path, capsys) -> None:
    write(work / "rnn.py", LSTM)
    write(work / "cell.py", LSTM_CELL)
    for name, kind, extra in (
        ("rnn.py", "fc (LSTM)", ()),
        ("rnn.py", "fc (LSTM)", ("--exclude", "fc.*")),  # vmap runs it even when excluded
        ("cell.py", "fc (LSTMCell)", ()),  # the cells have no batching rule either
    ):
        code, _, err = cli(capsys, name, "--mode", "dynamic", *extra, "-o", "dyn.py")
        assert code == 2
        line = one_error(err)
        assert f"dynamic mode cannot generate {kind}" in line and "even with its parameters" in line
        assert "use static mode" in line and "nn.Linear gates" in line and "--exclude" not in line
        assert not (work / "dyn.py").exists()
    # the advice, end to end: static mode, and a recurrence written with nn.Linear gates
    write(work / "gates.py", GATES)
    for name, mode in (("rnn.py", "static"), ("gates.py", "dynamic")):
        code, out, err = cli(capsys, name, "--mode", mode, "-o", f"{mode}.py")
        assert code == 0, err
        result = run_python_file(work, f"{mode}.py")
        assert result.returncode == 0, result.stderr
        assert "output: (2, 8)" in result.stdout, result.stdout
