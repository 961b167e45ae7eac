"""load_target: finding the target in a file, its framework, its example inputs, and every error."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from hypernn_gen.errors import TargetLoadError
from hypernn_gen.load import InputSpec, load_target, parse_input_shape

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ROOT / "generated_examples" / "targets"


def write(directory: Path, name: str, source: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(source).lstrip())
    return path


def load_error(spec: str | Path, **kwargs: object) -> str:
    with pytest.raises(TargetLoadError) as info:
        load_target(str(spec), **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- finding the target ---------------------------------------------------------------------------


def test_factory_with_example_input() -> None:
    before = list(sys.path)
    loaded = load_target(str(TARGETS / "seed_mlp.py"))
    assert sys.path == before
    assert (loaded.name, loaded.kind, loaded.framework) == ("make_target", "factory", "torch")
    assert loaded.path == TARGETS / "seed_mlp.py"
    assert loaded.spec == str(TARGETS / "seed_mlp.py")
    assert loaded.obj is loaded.source_module.make_target
    assert loaded.input_specs == (InputSpec((1, 8), "float32"),)
    assert loaded.example_inputs is not None
    assert loaded.example_inputs[0] is loaded.source_module.example_input
    assert loaded.source_module.__name__.startswith("_hypernn_gen_target_")
    assert sys.modules[loaded.source_module.__name__] is loaded.source_module
    built = loaded.factory()
    assert isinstance(built, nn.Sequential)
    assert [tuple(p.shape) for p in built.parameters()] == [
        (256, 8),
        (256,),
        (256, 256),
        (256,),
        (4, 256),
    ]


def test_only_class_in_file_is_found_and_relative_paths_use_cwd() -> None:
    loaded = load_target("targets/cnn.py", cwd=ROOT / "generated_examples")
    assert (loaded.name, loaded.kind, loaded.framework) == ("SmallCNN", "class", "torch")
    assert loaded.display == "targets/cnn.py:SmallCNN"
    assert loaded.input_specs == (InputSpec((2, 1, 8, 8), "float32"),)
    assert type(loaded.factory()).__name__ == "SmallCNN"


def test_explicit_name_picks_a_class_among_several() -> None:
    loaded = load_target(f"{TARGETS / 'transformer.py'}:TinyGPT")
    assert (loaded.name, loaded.kind) == ("TinyGPT", "class")
    assert loaded.input_specs == (InputSpec((2, 16), "int64"),)


def test_instance_created_in_the_file(tmp_path: Path) -> None:
    write(
        tmp_path,
        "inst.py",
        """
        from torch import nn
        net = nn.Linear(3, 2)
        """,
    )
    loaded = load_target(str(tmp_path / "inst.py"))
    assert (loaded.name, loaded.kind, loaded.framework) == ("net", "instance", "torch")
    assert loaded.factory is None
    assert loaded.obj is loaded.source_module.net
    assert loaded.input_specs == () and loaded.example_inputs is None


def test_imported_instances_and_classes_are_not_candidates(tmp_path: Path) -> None:
    write(tmp_path, "shared_parts_a.py", "from torch import nn\nshared = nn.Linear(2, 2)\n")
    write(
        tmp_path,
        "owner.py",
        """
        from torch import nn
        from shared_parts_a import shared

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = nn.Linear(2, 2)
        """,
    )
    loaded = load_target(str(tmp_path / "owner.py"))
    assert (loaded.name, loaded.kind) == ("Net", "class")


def test_sibling_imports_resolve_at_import_and_in_the_factory(tmp_path: Path) -> None:
    write(
        tmp_path,
        "sibling_model_b.py",
        """
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 4)
        """,
    )
    write(tmp_path, "sibling_lazy_b.py", "from torch import nn\nLAYER = nn.Linear\n")
    write(
        tmp_path,
        "top.py",
        """
        from torch import nn
        from sibling_model_b import Net

        def make_target():
            from sibling_lazy_b import LAYER  # imported only when the factory runs
            return nn.Sequential(Net(), LAYER(4, 2))
        """,
    )
    before = list(sys.path)
    sys.modules.pop("sibling_lazy_b", None)
    loaded = load_target(str(tmp_path / "top.py"))
    assert sys.path == before and str(tmp_path) not in sys.path
    sys.modules.pop("sibling_lazy_b", None)
    built = loaded.factory()
    assert [n for n, _ in built.named_parameters()] == [
        "0.fc.weight",
        "0.fc.bias",
        "1.weight",
        "1.bias",
    ]
    assert sys.path == before


def test_factory_is_probed_on_the_meta_device(tmp_path: Path) -> None:
    write(
        tmp_path,
        "probe.py",
        """
        from torch import nn
        devices = []

        def make_target():
            layer = nn.Linear(1000, 1000)
            devices.append(layer.weight.device.type)
            return layer
        """,
    )
    loaded = load_target(str(tmp_path / "probe.py"))
    assert loaded.source_module.devices == ["meta"]


def test_loading_twice_gives_a_fresh_module(tmp_path: Path) -> None:
    path = write(tmp_path, "again.py", "from torch import nn\nnet = nn.Linear(2, 2)\n")
    first, second = load_target(str(path)), load_target(str(path))
    assert first.source_module is not second.source_module
    assert first.source_module.__name__ == second.source_module.__name__


def test_torch_target_does_not_import_jax() -> None:
    code = (
        "import sys; from hypernn_gen.load import load_target; "
        f"load_target({str(TARGETS / 'seed_mlp.py')!r}); print('jax' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


# -- example inputs -------------------------------------------------------------------------------


def test_input_shapes_override_the_file_example() -> None:
    loaded = load_target(
        str(TARGETS / "seed_mlp.py"), input_shapes=[(4, 8), "2,8"], input_dtype="float64"
    )
    assert loaded.input_specs == (InputSpec((4, 8), "float64"), InputSpec((2, 8), "float64"))
    assert loaded.example_inputs is None


def test_example_inputs_tuple(tmp_path: Path) -> None:
    write(
        tmp_path,
        "pair.py",
        """
        import torch
        from torch import nn
        net = nn.Bilinear(3, 4, 2)
        example_inputs = (torch.zeros(5, 3), torch.zeros(5, 4, dtype=torch.float16))
        """,
    )
    loaded = load_target(str(tmp_path / "pair.py"))
    assert loaded.input_specs == (InputSpec((5, 3), "float32"), InputSpec((5, 4), "float16"))
    assert len(loaded.example_inputs) == 2


@pytest.mark.parametrize(
    ("text", "shape"),
    [("1,8", (1, 8)), (" 2, 1, 8, 8 ", (2, 1, 8, 8)), ("(3, 4)", (3, 4)), ("8,", (8,))],
)
def test_parse_input_shape(text: str, shape: tuple[int, ...]) -> None:
    assert parse_input_shape(text) == shape


@pytest.mark.parametrize("text", ["1,x", "", "0,8", "-1", "1,,8", "1.5"])
def test_bad_input_shape_text(text: str) -> None:
    with pytest.raises(TargetLoadError, match=r"bad --input-shape .*e\.g\. --input-shape 1,8"):
        parse_input_shape(text)
    message = load_error(TARGETS / "seed_mlp.py", input_shapes=[text])
    assert message.startswith(f"bad --input-shape {text!r}")


def test_bad_input_shape_tuple() -> None:
    message = load_error(TARGETS / "seed_mlp.py", input_shapes=[(1, 0)])
    assert "bad input shape (1, 0)" in message and "--input-shape 1,8" in message


def test_bad_input_dtype() -> None:
    message = load_error(TARGETS / "seed_mlp.py", input_shapes=[(1, 8)], input_dtype="floaty")
    assert "unknown --input-dtype 'floaty'" in message and "float32" in message


def test_example_input_that_is_not_a_tensor(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "notensor.py",
        "from torch import nn\nnet = nn.Linear(2, 2)\nexample_input = [1, 2]\n",
    )
    message = load_error(path)
    assert "example_input in" in message and "holds an int" in message
    assert "--input-shape 1,8" in message


# -- errors ---------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    message = load_error(tmp_path / "nope.py")
    assert "nope.py not found" in message and "check the path" in message


def test_directory_and_non_python_file(tmp_path: Path) -> None:
    assert "is a directory" in load_error(tmp_path)
    text = write(tmp_path, "model.txt", "x = 1\n")
    assert "is not a Python file" in load_error(text)


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "broken.py", "import torch\n\ndef f(:\n    pass\n")
    message = load_error(path)
    assert message.startswith(f"syntax error in {path} line 3:")
    assert message.endswith("fix the target file")


def test_exception_while_importing_names_innermost_target_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "raises.py",
        """
        import torch

        def helper():
            raise ValueError("width must be even.\\nsecond line")

        helper()
        """,
    )
    message = load_error(path)
    assert message == (
        f"importing {path} failed: ValueError: width must be even ({path} line 4); "
        "fix the target file"
    )


def test_exception_in_a_sibling_module_points_at_the_import_line(tmp_path: Path) -> None:
    write(tmp_path, "sibling_bad_c.py", "x = 1 / 0\n")
    path = write(tmp_path, "imports_bad.py", "import torch\nimport sibling_bad_c\n")
    message = load_error(path)
    assert f"ZeroDivisionError: division by zero ({path} line 2)" in message
    assert "sibling_bad_c" not in sys.modules


def test_missing_package(tmp_path: Path) -> None:
    path = write(tmp_path, "needs.py", "import hypernn_gen_no_such_package\n")
    message = load_error(path)
    assert "ModuleNotFoundError: No module named 'hypernn_gen_no_such_package'" in message
    assert "install the missing package" in message


def test_name_not_found_lists_candidates(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "two.py",
        """
        from torch import nn
        class Zeta(nn.Module): pass
        class Alpha(nn.Module): pass
        """,
    )
    message = load_error(f"{path}:Gamma")
    assert message == f"{path} has no 'Gamma'; candidates: Alpha, Zeta. Pass one as {path}:NAME"


def test_several_candidates_are_listed_sorted(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "many.py",
        """
        from torch import nn
        class Zeta(nn.Module): pass
        class Alpha(nn.Module): pass
        net = nn.Linear(1, 1)
        """,
    )
    message = load_error(path)
    assert "defines several modules (Alpha, Zeta, net)" in message
    assert f"{path}:Alpha" in message and "make_target()" in message


def test_target_and_make_target_together(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "both.py",
        "from torch import nn\ntarget = nn.Linear(1, 1)\ndef make_target():\n    return target\n",
    )
    assert "defines both target and make_target" in load_error(path)


def test_no_module_found(tmp_path: Path) -> None:
    path = write(tmp_path, "empty.py", "import torch\nx = torch.zeros(3)\n")
    message = load_error(path)
    assert "defines no torch or flax module" in message
    assert "make_target()" in message and f"{path}:NAME" in message


def test_name_that_is_not_a_module(tmp_path: Path) -> None:
    path = write(tmp_path, "value.py", "import torch\nWIDTH = 3\nclass Config:\n    pass\n")
    assert f"{path}:WIDTH is an int, not a torch or flax module" in load_error(f"{path}:WIDTH")
    assert "is the class Config, not a torch" in load_error(f"{path}:Config")


def test_bad_name_syntax(tmp_path: Path) -> None:
    path = write(tmp_path, "ok.py", "from torch import nn\nnet = nn.Linear(1, 1)\n")
    assert "must be a Python identifier" in load_error(f"{path}:1net")


@pytest.mark.parametrize("explicit", [False, True])
def test_class_needing_arguments(tmp_path: Path, explicit: bool) -> None:
    path = write(
        tmp_path,
        "args.py",
        """
        from torch import nn
        class Net(nn.Module):
            def __init__(self, width, depth=2):
                super().__init__()
                self.fc = nn.Linear(width, width)
        """,
    )
    message = load_error(f"{path}:Net" if explicit else path)
    assert message == (
        f"Net() needs arguments (width), but {path}:Net must build with none; pass a "
        f"zero-argument factory make_target() or a module instance, e.g. {path}:make_target"
    )


def test_factory_needing_arguments(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "fargs.py",
        "from torch import nn\ndef make_target(n):\n    return nn.Linear(n, n)\n",
    )
    assert "make_target() needs arguments (n)" in load_error(path)


def test_factory_raising(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "fraise.py",
        "from torch import nn\n\ndef make_target():\n    raise RuntimeError('no weights here')\n",
    )
    message = load_error(path)
    assert message == (
        f"calling make_target() failed: RuntimeError: no weights here ({path} line 4); "
        "fix the factory so it builds the target with no arguments"
    )


def test_factory_returning_something_else(tmp_path: Path) -> None:
    path = write(tmp_path, "fint.py", "import torch\n\ndef make_target():\n    return 3\n")
    message = load_error(path)
    assert "make_target() returned int, not a torch or flax module instance" in message
    assert "return the module instance" in message


# -- Flax -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("file", "name", "kind", "framework", "spec"),
    [
        ("linen_mlp.py", "MLP", "class", "linen", InputSpec((1, 8), "float32")),
        ("linen_cnn.py", "SmallCNN", "class", "linen", InputSpec((2, 8, 8, 1), "float32")),
        ("linen_transformer.py", "make_target", "factory", "linen", InputSpec((2, 16), "int32")),
        ("nnx_mlp.py", "make_target", "factory", "nnx", InputSpec((1, 8), "float32")),
        ("nnx_cnn.py", "make_target", "factory", "nnx", InputSpec((2, 8, 8, 1), "float32")),
        ("nnx_transformer.py", "make_target", "factory", "nnx", InputSpec((2, 16), "int32")),
    ],
)
def test_flax_targets(file: str, name: str, kind: str, framework: str, spec: InputSpec) -> None:
    pytest.importorskip("flax")
    loaded = load_target(str(TARGETS / file))
    assert (loaded.name, loaded.kind, loaded.framework) == (name, kind, framework)
    assert loaded.input_specs == (spec,)


def test_nnx_factory_using_outer_rngs_still_loads(tmp_path: Path) -> None:
    pytest.importorskip("flax")
    path = write(
        tmp_path,
        "outer_rngs.py",
        """
        from flax import nnx
        rngs = nnx.Rngs(0)

        def make_target():
            return nnx.Linear(2, 3, rngs=rngs)
        """,
    )
    loaded = load_target(str(path))
    assert (loaded.kind, loaded.framework) == ("factory", "nnx")


def test_nnx_class_needing_rngs(tmp_path: Path) -> None:
    pytest.importorskip("flax")
    path = write(
        tmp_path,
        "nnx_args.py",
        """
        from flax import nnx
        class Net(nnx.Module):
            def __init__(self, *, rngs):
                self.fc = nnx.Linear(2, 2, rngs=rngs)
        """,
    )
    assert "Net() needs arguments (rngs)" in load_error(path)


def test_linen_target_without_example_inputs(tmp_path: Path) -> None:
    pytest.importorskip("flax")
    path = write(
        tmp_path,
        "linen_noinput.py",
        """
        import flax.linen as nn
        class MLP(nn.Module):
            @nn.compact
            def __call__(self, x):
                return nn.Dense(3)(x)
        """,
    )
    message = load_error(path)
    assert message.startswith(f"{path}:MLP is a Flax linen module, which needs example inputs")
    assert "--input-shape 1,8" in message and "define example_input" in message
    loaded = load_target(str(path), input_shapes=["1,8"])
    assert loaded.input_specs == (InputSpec((1, 8), "float32"),)


def test_torch_module_check_uses_only_imported_frameworks() -> None:
    loaded = load_target(str(TARGETS / "seed_mlp.py"))
    assert isinstance(loaded.factory(), torch.nn.Module)
