"""Large targets: generate without allocating the target, build on ``meta``, materialise later.

* A generated hypernetwork built under ``torch.device("meta")`` holds no memory; after
  ``to_empty(device="cpu")`` and ``reset_parameters()`` it equals one built on the CPU from the
  same random state, bit for bit (parameters, target state, the non-persistent index buffers
  ``to_empty`` leaves uninitialised) and computes the same output. Checked on a 2-layer GPT
  (d 128) in the style of ``benchmarks/targets/gpt124m.py`` and on every committed example.
* (slow) Generating for the 124M GPT-2 with the CLI takes well under a minute, the process's own
  memory (anonymous RSS) rises by far less than the target's float32 size (475 MiB), and the file
  stays small: the layout is one line per tensor.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from hypernn_gen.generate import GenerateOptions, generate

REPO = Path(__file__).resolve().parents[1]
GPT124M = REPO / "benchmarks" / "targets" / "gpt124m.py"
EXAMPLES = REPO / "generated_examples"
SMALL_GPT = "GPTConfig(block_size=64, vocab_size=512, n_layer=2, n_head=4, n_embd=128)"
_names = itertools.count()


def import_file(path: Path) -> ModuleType:
    name = f"_large_target_test_{path.stem}_{next(_names)}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def hypernetwork_class(module: ModuleType) -> type[nn.Module]:
    (cls,) = (v for k, v in vars(module).items() if k.endswith("HyperNetwork"))
    return cls


def small_gpt_file(directory: Path) -> Path:
    """benchmarks/targets/gpt124m.py with a 2-layer, d 128, vocab 512 configuration."""
    source = GPT124M.read_text()
    make = "def make_target() -> GPT:\n    return GPT(GPTConfig())\n"
    example = "example_input = torch.zeros(1, 1024, dtype=torch.long)\n"
    assert make in source and example in source, "gpt124m.py changed; update this test"
    source = source.replace(make, make.replace("GPTConfig()", SMALL_GPT))
    source = source.replace(example, "example_input = torch.zeros(2, 16, dtype=torch.long)\n")
    path = directory / "gpt_small.py"
    path.write_text(source)
    return path


def factory_name(module: ModuleType) -> str:
    """The target's factory, from the header line ``# target:   path.py:NAME (torch, kind)``."""
    (line,) = (
        line
        for line in Path(module.__file__).read_text().splitlines()
        if line.startswith("# target:")
    )
    return line.split()[2].rpartition(":")[2]


def materialised(cls: type[nn.Module], seed: int) -> nn.Module:
    """Built on meta (asserting nothing was allocated), then to_empty + reset_parameters."""
    with torch.device("meta"):
        hypernetwork = cls()
    tensors = [*hypernetwork.parameters(), *hypernetwork.buffers()]
    assert tensors and all(t.is_meta for t in tensors)
    hypernetwork.to_empty(device="cpu")
    torch.manual_seed(seed)
    hypernetwork.reset_parameters()
    return hypernetwork


def reference(cls: type[nn.Module], module: ModuleType, seed: int) -> nn.Module:
    """The same hypernetwork built on the CPU, drawing from the same random state.

    ``reset_parameters`` makes ``__init__``'s draws once the target is built; it builds the
    target itself only when the target keeps state (buffers, frozen parameters).
    """
    if hasattr(cls, "_init_target_state"):
        torch.manual_seed(seed)
        return cls()
    target = getattr(module, factory_name(module))()
    torch.manual_seed(seed)
    return cls(target)


def assert_identical(built: nn.Module, ref: nn.Module) -> None:
    ours, theirs = built.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    # non-persistent buffers (param_sizes, the fused-layer indices) are not in the state_dict
    ours, theirs = dict(built.named_buffers()), dict(ref.named_buffers())
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


@pytest.fixture(scope="module")
def small_gpt_static(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    directory = tmp_path_factory.mktemp("gpt_small")
    target = small_gpt_file(directory)
    out = directory / "gpt_small_torch_static.py"
    out.write_text(
        generate(GenerateOptions(target=str(target), mode="static", output=str(out))).text
    )
    return import_file(out)


def test_gpt_like_static_hypernetwork_builds_on_meta_and_materialises(
    small_gpt_static: ModuleType,
) -> None:
    module = small_gpt_static
    cls = hypernetwork_class(module)
    assert not hasattr(cls, "_init_target_state")  # nanoGPT keeps no buffers
    built = materialised(cls, seed=7)
    ref = reference(cls, module, seed=7)
    assert_identical(built, ref)

    tokens = torch.randint(0, 512, (2, 16))
    out, flat = built(tokens, return_params=True)
    expected, _ = ref(tokens, return_params=True)
    assert out.shape == (2, 16, 512) and flat.shape == (module.FLAT_SIZE,)
    fast, none = built(tokens)  # the fast path (no flat vector) equals it to rounding
    assert none is None
    torch.testing.assert_close(fast, out, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out).all()
    assert torch.equal(out, expected)
    # the generated weights start at the target's own scale (GPT-2 init: std 0.02)
    wte = built.unflatten_params(flat)["transformer.wte.weight"]
    assert 0.01 < wte.std().item() < 0.04

    loss = out.logsumexp(-1).mean()
    loss.backward()
    trainable = [p for p in built.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)


def test_reset_parameters_reinitialises_exactly_like_init(small_gpt_static: ModuleType) -> None:
    """On a live module: the same random state gives back the values ``__init__`` drew."""
    module = small_gpt_static
    cls = hypernetwork_class(module)
    built = reference(cls, module, seed=3)
    expected = {k: v.clone() for k, v in built.state_dict().items()}
    with torch.no_grad():
        for p in built.parameters():
            p.add_(1.0)
    torch.manual_seed(3)
    built.reset_parameters()
    for name, value in built.state_dict().items():
        assert torch.equal(value, expected[name]), name


EXAMPLE_FILES = sorted(p.name for p in EXAMPLES.glob("*_torch_*.py"))


@pytest.mark.parametrize("filename", EXAMPLE_FILES)
def test_committed_examples_build_on_meta(filename: str) -> None:
    """Both modes, fused-layer index buffers, and target state (BatchNorm statistics, a
    non-persistent causal mask) come back after to_empty + reset_parameters."""
    module = import_file(EXAMPLES / filename)
    cls = hypernetwork_class(module)
    built = materialised(cls, seed=11)
    ref = reference(cls, module, seed=11)
    assert_identical(built, ref)
    built.eval(), ref.eval()
    x = {
        "seed_mlp": lambda: torch.randn(4, 8),
        "cnn": lambda: torch.randn(4, 1, 8, 8),
        "transformer": lambda: torch.randint(0, 64, (4, 16)),
    }[filename.split("_torch_")[0]]()
    with torch.no_grad():
        out, _ = built(x)
        expected, _ = ref(x)
    assert torch.isfinite(out).all()
    assert torch.equal(out, expected)


# -- the 124M target through the CLI --------------------------------------------------------------

# Fresh process: import torch and the CLI, then generate while a thread samples the anonymous
# RSS (RssAnon: the process's own memory; the total RSS also counts pages of torch's shared
# libraries, which varies with what other processes have loaded) every millisecond.
DRIVER = """
import json, resource, sys, threading, time
start = time.perf_counter()
import torch
from hypernn_gen.cli import main

def anon_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))

imported = anon_kib()
peak = imported
done = threading.Event()

def sample():
    global peak
    while not done.is_set():
        peak = max(peak, anon_kib())
        time.sleep(0.001)

sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
code = main([sys.argv[1], "--mode", "static", "-o", sys.argv[2]])
done.set()
sampler.join()
peak = max(peak, anon_kib())
print(json.dumps({"code": code, "seconds": time.perf_counter() - start, "imported_kib": imported,
                  "peak_anon_kib": peak,
                  "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_generating_for_gpt2_124m_is_fast_small_and_never_allocates_the_target(
    tmp_path: Path,
) -> None:
    out = tmp_path / "gpt124m_torch_static.py"
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, str(GPT124M), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.splitlines()[-1])
    assert measured["code"] == 0, result.stderr

    text = out.read_text()
    layout_lines = [line for line in text.splitlines() if line.lstrip().startswith("ParamSlice(")]
    float32_bytes = 124_439_808 * 4  # the layout header says so too
    assert "124,439,808 values" in text
    increase = (measured["peak_anon_kib"] - measured["imported_kib"]) * 1024

    assert measured["seconds"] < 60, measured
    assert out.stat().st_size < 200_000
    assert len(layout_lines) == 148  # one line per generated tensor (lm_head is tied to wte)
    assert text.count("\n") < 1500
    # Tracing happens on the meta device: the process's own memory rises by a fraction of the
    # 475 MiB the target's float32 parameters would take (about 100 MiB measured, 75 MiB of it
    # torch importing torch._dynamo on the first nn.init call on a meta tensor), never by the
    # target itself.
    assert increase < float32_bytes / 2, measured
