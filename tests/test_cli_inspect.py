"""``hypernn-gen inspect``: the table, --json, --include/--exclude, and one-line errors (exit 2)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hypernn_gen import cli
from hypernn_gen.cli import main
from hypernn_gen.design import design_layout
from hypernn_gen.load import load_target
from hypernn_gen.trace import trace_target

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ROOT / "generated_examples" / "targets"
SEED = str(TARGETS / "seed_mlp.py")


def write(directory: Path, name: str, source: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(source).lstrip())
    return path


def run_ok(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = main(["inspect", *argv])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    return out


def run_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run a failing ``inspect``; check exit code 2 and exactly one stderr line, no traceback."""
    code = main(["inspect", *argv])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hypernn-gen: error: ")
    return lines[0].removeprefix("hypernn-gen: error: ")


# -- the table ------------------------------------------------------------------------------------


def test_table_lists_every_tensor_with_aligned_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_ok(capsys, SEED)
    lines = out.splitlines()
    assert lines[0] == f"target     {SEED}:make_target"
    assert lines[1] == "framework  torch (factory Sequential)"
    assert lines[2] == "inputs     (1, 8) float32"
    header = lines[4]
    assert header.split() == [
        "path", "shape", "dtype", "count", "offset", "role", "init", "source", "tied"
    ]  # fmt: skip
    rows = lines[5:10]
    assert [r.split()[0] for r in rows] == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight"]
    count_end, offset_end = header.index("count") + 5, header.index("offset") + 6
    counts = ["2,048", "256", "65,536", "256", "1,024"]
    offsets = ["0", "2,048", "2,304", "67,840", "68,096"]
    for row, count, offset in zip(rows, counts, offsets, strict=True):
        assert row[count_end - len(count) : count_end] == count  # right-aligned under "count"
        assert row[offset_end - len(offset) : offset_end] == offset
        assert "generated" in row
    assert "N(0, 0.204)" in rows[0] and "kaiming_uniform_" in rows[0]
    assert lines[10] == ""


def test_totals_chunking_and_hypernetwork_size(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_ok(capsys, SEED)
    totals = {line[:21].strip(): line[21:].split() for line in out.splitlines()[11:]}
    assert totals["generated parameters"] == ["69,120", "in", "5", "tensors"]
    assert totals["state values"][0] == "0"
    assert totals["flat size"] == ["69,120"]
    # the default: chunks of 256 values hold whole rows of every layer (rows of 8 and 256), each
    # tensor from a chunk boundary: 2,048 / 256 + 1 + 65,536 / 256 + 1 + 1,024 / 256 chunks
    n, c = 8 + 1 + 256 + 1 + 4, 256
    assert totals["default chunking"][:6] == [f"{n * c:,}", "270", "embeddings", "x", "256"] + [
        "values"
    ]
    assert n * c == 69_120  # no padding
    hyper = n * 32 + 32 * c + c + 2 * 5
    assert totals["hypernetwork (D=32)"][0] == f"{hyper:,}" == "17,098"
    assert totals["compression"][0] == f"{69_120 / hyper:.2f}x"


def test_state_rows_tied_aliases_and_notes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = run_ok(capsys, str(TARGETS / "transformer.py"))
    row = next(line for line in out.splitlines() if line.startswith("tok_emb.weight"))
    assert row.split()[-1] == "head.weight"
    mask = next(line for line in out.splitlines() if line.startswith("block.causal_mask"))
    assert mask.split()[1:5] == ["(16,", "16)", "bool", "256"]
    assert "state (buffer)" in mask
    assert not any(line.startswith("head.weight") for line in out.splitlines())

    out = run_ok(capsys, str(TARGETS / "cnn.py"))
    assert "const 1" in next(ln for ln in out.splitlines() if ln.startswith("features.1.weight"))

    path = write(
        tmp_path,
        "datadep.py",
        """
        import torch
        from torch import nn
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(2, 2)
            def forward(self, x):
                return x if x.sum() > 0 else self.fc(x)
        example_input = torch.zeros(1, 2)
        """,
    )
    out = run_ok(capsys, str(path))
    notes = out.split("\nnotes:\n")[1].split("\n\n")[0].splitlines()
    assert len(notes) == 1 and notes[0].startswith("  - input shape (1, 2) not checked")


def fusion_section(out: str) -> list[list[str]]:
    """The rows of the report's last section (the dynamic-mode fusion plan), split on 2+ spaces."""
    section = out.split("\n\ndynamic mode:")[1].splitlines()[1:]
    rows = [line for line in section if not line.startswith("  predicted cost:")]
    return [re.split(r"\s{2,}", line.strip()) for line in rows]


def test_predicted_cost_of_the_fused_layers(capsys: pytest.CaptureFixture[str]) -> None:
    """Shared products per target product: S + 1 per layer, or where every row lies in one
    chunk from a chunk boundary, 1 and one shared row (1 + 1 / out; k > 1 rows to a chunk: 2)."""
    sizes = {"0": (256, 8), "2": (256, 256), "4": (4, 256)}
    total = sum(o * i for o, i in sizes.values())

    def predicted(out: str) -> str:
        return next(ln for ln in out.splitlines() if "predicted cost:" in ln).split()[2]

    # default chunks of 256: 0.weight has 32 rows to a chunk, 2.weight and 4.weight one
    cost = 256 * 8 * 2 + 256 * 256 * (1 + 1 / 256) + 4 * 256 * (1 + 1 / 4)
    assert predicted(run_ok(capsys, SEED)) == f"{cost / total:.2f}x" == "1.04x"
    flat = run_ok(capsys, SEED, "--chunking", "flat")  # 263-value chunks: every row spans 2
    assert {r[0]: r[1:] for r in fusion_section(flat)}["0"] == ["fused", "linear (S=2)"]
    assert predicted(flat) == "3.00x"


def test_fusion_plan_of_a_torch_target(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Which path every module takes, as the generated file's FUSED and PER_SAMPLE say."""
    out = run_ok(capsys, str(TARGETS / "cnn.py"))
    generated = (ROOT / "generated_examples" / "cnn_torch_dynamic.py").read_text()
    fused = re.findall(r'\("([^"]*)", "(\w+)", \S+, \S+, (\d+), False\),', generated)
    assert len(fused) == 5
    rows = fusion_section(out)
    assert [row for row in rows if row[1] == "fused"] == [
        [path, "fused", kind + (f" (S={s})" if s != "0" else "")] for path, kind, s in fused
    ]
    assert rows[0] == ["<root>", "whole batch", "owns no generated tensor"]
    path = write(
        tmp_path,
        "mixed.py",
        """
        import torch
        from torch import nn
        class Scaled(nn.Module):
            def __init__(self):
                super().__init__()
                self.gain = nn.Parameter(torch.ones(4))
            def forward(self, x):
                return x * self.gain
        class Mixer(nn.Module):
            def __init__(self):
                super().__init__()
                self.mix = nn.Parameter(torch.ones(4, 4))
                self.inner = nn.Linear(4, 4)
            def forward(self, x):
                return self.inner(x @ self.mix)
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 4)
                self.scaled = Scaled()
                self.mixer = Mixer()
                self.act = nn.ReLU()
                self.wide = nn.Conv1d(4, 4, 3, groups=2)
            def forward(self, x):
                h = self.act(self.mixer(self.scaled(self.fc(x))))
                return self.wide(h.unsqueeze(-1).expand(-1, -1, 3))
        example_input = torch.zeros(1, 4)
        """,
    )
    c = json.loads(run_ok(capsys, f"{path}:Net", "--json"))["chunking"]["chunk_dim"]
    s = max((4 * o + 3) // c - 4 * o // c + 1 for o in range(4))  # fc's rows of 4 from 0
    rows = fusion_section(run_ok(capsys, f"{path}:Net"))
    assert rows[:6] == [
        ["<root>", "whole batch", "owns no generated tensor"],
        ["fc", "fused", f"linear (S={s})"],
        ["scaled", "fused", "direct: parameters broadcast per sample (gain at rank 2)"],
        [
            "mixer",
            "per sample (vmap)",
            "mix is used by matmul, not only broadcast elementwise into batched tensors",
        ],
        ["mixer.inner", "per sample (vmap)", "inside mixer"],
        ["act", "whole batch", "owns no generated tensor"],
    ]
    assert rows[6][:2] == ["wide", "fused"] and rows[6][2].startswith("conv1d (S=")
    out = run_ok(capsys, str(ROOT / "tests" / "zoo" / "rnn.py"))
    assert out.splitlines()[-1].startswith(
        "dynamic mode: not supported: dynamic mode cannot generate lstm (LSTM)"
    )


def test_output_is_deterministic(capsys: pytest.CaptureFixture[str]) -> None:
    spec = str(TARGETS / "transformer.py")
    assert run_ok(capsys, spec) == run_ok(capsys, spec)


def test_input_shape_and_dtype_options(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_ok(
        capsys,
        str(TARGETS / "transformer.py"),
        "--input-shape",
        "4,8",
        "--input-dtype",
        "int32",
    )
    assert out.splitlines()[2] == "inputs     (4, 8) int32"


# -- --json ---------------------------------------------------------------------------------------


def test_json_is_the_layout_plus_chunking(capsys: pytest.CaptureFixture[str]) -> None:
    data = json.loads(run_ok(capsys, str(TARGETS / "transformer.py"), "--json"))
    traced = trace_target(load_target(str(TARGETS / "transformer.py")))
    layout, expected = design_layout(traced)  # the default chunking, with its offsets
    assert layout.flat_size > traced.flat_size  # every tensor from a chunk boundary
    chunking = data.pop("chunking")
    fusion = data.pop("fusion")  # what a dynamic file would fuse, and what not (and why)
    assert set(fusion) == {"fused", "per_sample", "modules"} and fusion["per_sample"]
    assert fusion["modules"][0]["path"] == "" and fusion["modules"][0]["route"] == "per sample"
    assert {m["route"] for m in fusion["modules"][1:]} == {"inside"}  # the root runs per sample
    assert data == json.loads(layout.to_json())
    hyper = expected.num_embeddings * 32 + 32 * expected.chunk_dim + expected.chunk_dim + 2 * 16
    assert chunking == {
        "num_embeddings": expected.num_embeddings,
        "chunk_dim": expected.chunk_dim,
        "total": expected.total,
        "embedding_dim": 32,
        "hypernetwork_params": hyper,
        "compression": round(layout.num_generated / hyper, 4),
    }


def test_include_and_exclude(capsys: pytest.CaptureFixture[str]) -> None:
    data = json.loads(run_ok(capsys, SEED, "--json", "--exclude", "*.bias", "--include", "[02].*"))
    roles = {t["path"]: (t["role"], t["reason"]) for t in data["tensors"]}
    assert roles == {
        "0.weight": ("generated", ""),
        "0.bias": ("state", "excluded"),
        "2.weight": ("generated", ""),
        "2.bias": ("state", "excluded"),
        "4.weight": ("state", "excluded"),
    }
    assert data["num_generated"] == 8 * 256 + 256 * 256
    out = run_ok(capsys, SEED, "--exclude", "4.*")
    assert "state (excluded)" in next(ln for ln in out.splitlines() if ln.startswith("4.weight"))


# -- errors ---------------------------------------------------------------------------------------


BAD_TARGETS = {
    "syntax.py": ("import torch\nx = (\n", "syntax error in {path} line 2"),
    "raises.py": (
        "import torch\n\nraise KeyError('missing')\n",
        "importing {path} failed: KeyError: 'missing' ({path} line 3); fix the target file",
    ),
    "nomodule.py": ("import torch\nx = 1\n", "{path} defines no torch or flax module"),
    "ctorargs.py": (
        "from torch import nn\nclass Net(nn.Module):\n    def __init__(self, width):\n"
        "        super().__init__()\n",
        "Net() needs arguments (width), but {path}:Net must build with none; pass a "
        "zero-argument factory make_target() or a module instance, e.g. {path}:make_target",
    ),
    "frozen.py": (
        "from torch import nn\nnet = nn.Linear(2, 2).requires_grad_(False)\n",
        "Linear has no trainable floating-point parameters to generate",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_TARGETS))
def test_bad_targets_fail_with_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str
) -> None:
    source, expected = BAD_TARGETS[name]
    path = write(tmp_path, name, source)
    assert expected.format(path=path) in run_error(capsys, str(path))


def test_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    message = run_error(capsys, str(tmp_path / "absent.py"))
    assert "absent.py not found" in message and "check the path" in message


def test_name_not_found(capsys: pytest.CaptureFixture[str]) -> None:
    message = run_error(capsys, f"{TARGETS / 'transformer.py'}:GPT")
    assert message.endswith(
        "has no 'GPT'; candidates: Block, TinyGPT, make_target. Pass one as "
        + str(TARGETS / "transformer.py")
        + ":NAME"
    )


def test_bad_input_shape_text(capsys: pytest.CaptureFixture[str]) -> None:
    message = run_error(capsys, SEED, "--input-shape", "1xx8")
    assert message.startswith(
        "bad --input-shape '1xx8': expected comma-separated positive integers"
    )


def test_input_shape_that_does_not_fit(capsys: pytest.CaptureFixture[str]) -> None:
    message = run_error(capsys, SEED, "--input-shape", "1,9")
    assert message.startswith("input shape (1, 9) does not fit the target: RuntimeError:")
    assert message.endswith("pass the shapes the target's forward expects with --input-shape")


def test_unmatched_pattern(capsys: pytest.CaptureFixture[str]) -> None:
    message = run_error(capsys, SEED, "--include", "layers.*")
    assert message.startswith("--include 'layers.*' matches no parameter; parameter paths look")


def test_linen_target_without_inputs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("flax")
    path = write(
        tmp_path,
        "linen_bare.py",
        """
        import flax.linen as nn
        class MLP(nn.Module):
            @nn.compact
            def __call__(self, x):
                return nn.Dense(3)(x)
        """,
    )
    message = run_error(capsys, str(path))
    assert "--input-shape 1,8" in message and "example_input" in message


def test_debug_shows_the_traceback(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["inspect", str(tmp_path / "absent.py"), "--debug"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback (most recent call last)" in err and "TargetLoadError" in err
    assert err.splitlines()[-1].startswith("hypernn-gen: error: ")


def test_unexpected_exception(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("kaput\nmore detail")

    monkeypatch.setattr(cli, "trace_selected", broken)
    message = run_error(capsys, SEED)
    assert message == "unexpected RuntimeError: kaput; rerun with --debug for the traceback"
    assert main(["inspect", SEED, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "kaput" in err


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect"]) == 2
    assert "the following arguments are required: TARGET" in capsys.readouterr().err
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("hypernn-gen ")
    assert main(["--help"]) == 0
    assert "inspect" in capsys.readouterr().out


# -- Flax -----------------------------------------------------------------------------------------


def test_inspect_linen_target(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("hypernn_gen.trace_flax")
    out = run_ok(capsys, str(TARGETS / "linen_cnn.py"))
    assert out.splitlines()[1] == "framework  linen (class SmallCNN)"
    rows = {line.split()[0]: line for line in out.splitlines()[5:13]}
    assert "state (collection)" in rows["BatchNorm_0.mean"]
    assert "generated" in rows["Conv_0.kernel"]
    assert fusion_section(out) == [
        ["Conv_0", "fused", "conv (S=1)"],  # the default chunks hold whole rows
        ["Dense_0", "fused", "dense (S=1)"],
        ["BatchNorm_0", "per sample", "BatchNorm has no fused form"],
    ]


def test_inspect_nnx_target_json(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("hypernn_gen.trace_flax")
    data = json.loads(run_ok(capsys, str(TARGETS / "nnx_mlp.py"), "--json"))
    assert data["framework"] == "nnx"
    fused = [(f["path"], f["kind"], f["segments"]) for f in data["fusion"]["fused"]]
    assert fused == [("hidden1", "dense", 1), ("hidden2", "dense", 1), ("out", "dense", 1)]
    assert data["num_generated"] == 8 * 64 + 64 + 64 * 64 + 64 + 64 * 4


# -- python -m hypernn_gen ------------------------------------------------------------------------


def test_python_dash_m(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "hypernn_gen", "inspect", "targets/seed_mlp.py", "--json"],
        cwd=ROOT / "generated_examples",
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["num_generated"] == 69_120
    bad = subprocess.run(
        [sys.executable, "-m", "hypernn_gen", "inspect", "targets/seed_mlp.py:Nope"],
        cwd=ROOT / "generated_examples",
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert bad.returncode == 2
    assert bad.stdout == "" and "Traceback" not in bad.stderr
    assert bad.stderr.splitlines() == [
        "hypernn-gen: error: targets/seed_mlp.py has no 'Nope'; candidates: make_target. "
        "Pass one as targets/seed_mlp.py:NAME"
    ]


def test_delta_plan_says_every_sample_runs_alone(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Flax --generate delta builds base + delta per sample: inspect must not claim a fused
    plan, and the generated dynamic file indeed fuses nothing."""
    path = str(TARGETS / "linen_mlp.py")
    out = run_ok(capsys, path, "--generate", "delta")
    assert "dynamic mode: every sample runs through the whole target alone (vmap)" in out
    assert fusion_section(out) == [
        [
            "<root>",
            "per sample (vmap)",
            "--generate delta builds each sample's weights (base + delta)",
        ]
    ]
    written = tmp_path / "delta.py"
    assert cli.main([path, "--mode", "dynamic", "--generate", "delta", "-o", str(written)]) == 0
    source = written.read_text()
    assert "install_fusion(" not in source and "Fused" not in source


def test_torch_delta_plan_is_fused_and_counts_the_base_product(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Torch --generate delta fuses as --generate weights does (W x_b + D_b x_b): the same
    routes, one more shared product per fused layer (the frozen base's), and the generated
    dynamic file installs the fused layers with the base passed to them."""
    path = str(TARGETS / "seed_mlp.py")
    out, weights = run_ok(capsys, path, "--generate", "delta"), run_ok(capsys, path)
    assert fusion_section(out) == fusion_section(weights)
    assert ["0", "fused", "linear (S=1)"] in fusion_section(out)

    def predicted(text: str) -> float:
        line = next(ln for ln in text.splitlines() if "predicted cost:" in ln)
        return float(line.split()[2].rstrip("x"))

    assert predicted(out) == pytest.approx(predicted(weights) + 1.0, abs=0.006)
    assert "S + 2 each: the frozen base's too" in out
    written = tmp_path / "delta.py"
    assert cli.main([path, "--mode", "dynamic", "--generate", "delta", "-o", str(written)]) == 0
    source = written.read_text()
    assert "install_fusion(" in source and "delta=True" in source
