"""Speed and memory of hypernetworks: hyper-nn 0.2.2, the runtime library and generated modules.

    python benchmarks/bench_hypernets.py [--quick] [--out benchmarks/RESULTS.md] [--threads 2]

Prints Markdown tables and writes them, with a description of the machine and the exact
command, to ``--out``:

1. dynamic mode (one weight set per sample), forward+backward and forward-only, batch 64 and
   256, for four targets (seed MLP, a 1.1M-parameter MLP, the CNN and the small transformer of
   ``generated_examples/targets``). Candidates: the target alone (a plain ``nn.Module`` on the
   batch), hyper-nn 0.2.2's ``TorchDynamicHyperNetwork`` (one input per call: a Python loop over
   the samples, as in its README), our runtime ``TorchHyperNetwork(mode="dynamic")``
   (``vmap(functional_call)``, materialises batch x P weights), the generated module (fused
   path) and the generated module under ``torch.compile``;
2. static mode, forward+backward, batch 64, seed MLP;
3. peak memory of dynamic forward+backward at batch 256 for the two MLPs (fresh subprocess per
   candidate, RSS growth) next to the size of one batch x P float32 buffer;
4. wall time of the ``hypernn-gen`` CLI, and the 124M tracing benchmark (``bench_trace.py``);
5. a plot of dynamic forward+backward time against batch size for the seed MLP
   (``dynamic_vs_batch.png`` next to ``--out``);
6. Flax (JAX) dynamic mode, forward+backward, jitted: the target alone, the runtime
   ``FlaxHyperNetwork`` (materialising vmap) and the generated module (fused path), from
   ``bench_flax.py`` run in a subprocess.

Timing: candidates are timed interleaved in one process (round-robin, the starting candidate
rotating every round) after a warm-up, with ``torch.set_num_threads(2)`` (``--threads``); tables
give medians.
Before timing, every generated module is checked against the runtime after
``generated.load_state_dict(runtime.state_dict())`` (outputs and gradients); a mismatch stops
the benchmark. ``--quick`` (the smoke test) runs the seed MLP only, with tiny repetition
counts and without ``torch.compile``, the tracing benchmark and the plot.

The modules are generated with the real CLI into a temporary directory. hyper-nn is imported
from ``/tmp/hypernn_pkg`` (installed there with ``pip install --no-deps --target`` if missing)
and used unpatched.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
TARGETS_DIR = ROOT / "generated_examples" / "targets"
HYPERNN_DIR = Path("/tmp/hypernn_pkg")
HYPERNN_VERSION = "0.2.2"
THREADS = 2  # torch intra-op threads (--threads)
#: glibc malloc settings for the benchmark process and its workers. With glibc's defaults the
#: mmap threshold moves: after a candidate frees a large buffer (the runtime's batch x P
#: weights) it rises, and the next candidates' allocations come from a heap that is trimmed
#: and grown again every step, which made a small candidate 2-3x slower beside a large one
#: than alone (RESULTS.md, section 13). Fixed at glibc's largest threshold, with trimming
#: off, every candidate allocates as it does in a steady loop on its own.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
EMBEDDING_DIM = 32  # the CLI's and the runtime's default; hyper-nn gets the same
COMPILE_LIMIT_S = 120.0
TABLE_BATCHES = (64, 256)
SWEEP_BATCHES = (8, 32, 64, 128, 256)  # the seed MLP's forward+backward, for the plot
QUICK_BATCHES = (16,)  # --quick: hyper-nn's per-sample loop stays cheap
MIB = 2**20

MLP_1M_SOURCE = '''\
"""MLP 64-1024-1024-10 (ReLU), 1.1M parameters: a temporary target of bench_hypernets.py."""

import torch
from torch import nn


def make_target() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 1024),
        nn.ReLU(),
        nn.Linear(1024, 1024),
        nn.ReLU(),
        nn.Linear(1024, 10),
    )


example_input = torch.zeros(1, 64)
'''


# -- targets ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    key: str
    label: str
    path: str  # target file (relative to ROOT, or absolute for the temporary MLP)
    factory: str  # the class or zero-argument function the file defines
    sample_shape: tuple[int, ...]  # one sample's input
    tokens: bool = False  # int64 token ids in [0, 64) instead of float32 N(0, 1)

    @property
    def cli_shape(self) -> str:
        return ",".join(str(d) for d in (1, *self.sample_shape))

    @property
    def condition_dim(self) -> int:
        n = 1
        for d in self.sample_shape:
            n *= d
        return n

    def make_input(self, batch: int) -> Any:
        import torch

        if self.tokens:
            return torch.randint(0, 64, (batch, *self.sample_shape))
        return torch.randn(batch, *self.sample_shape)


def targets(tmp: Path) -> dict[str, Target]:
    mlp = tmp / "mlp_1m.py"
    mlp.write_text(MLP_1M_SOURCE)
    return {
        t.key: t
        for t in (
            Target(
                "seed",
                "seed MLP 8-256-256-4",
                "generated_examples/targets/seed_mlp.py",
                "make_target",
                (8,),
            ),
            Target("mlp", "MLP 64-1024-1024-10", str(mlp), "make_target", (64,)),
            Target(
                "cnn", "CNN (cnn.py)", "generated_examples/targets/cnn.py", "SmallCNN", (1, 8, 8)
            ),
            Target(
                "transformer",
                "transformer (transformer.py)",
                "generated_examples/targets/transformer.py",
                "make_target",
                (16,),
                tokens=True,
            ),
        )
    }


def import_file(path: str | Path, name: str) -> ModuleType:
    path = Path(path) if Path(path).is_absolute() else ROOT / path
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def target_factory(target: Target) -> Callable[[], Any]:
    return getattr(import_file(target.path, f"_bench_target_{target.key}"), target.factory)


def hypernetwork_class(path: str | Path) -> type:
    module = import_file(path, f"_bench_generated_{Path(path).stem}")
    found = [
        v
        for n, v in vars(module).items()
        if isinstance(v, type) and n.endswith("HyperNetwork") and v.__module__ == module.__name__
    ]
    if len(found) != 1:
        raise SystemExit(f"{path}: expected one *HyperNetwork class, found {len(found)}")
    return found[0]


# -- the CLI --------------------------------------------------------------------------------------


def cli_command() -> list[str]:
    exe = shutil.which("hypernn-gen")
    return [exe] if exe else [sys.executable, "-m", "hypernn_gen"]


@dataclass
class Generation:
    target: Target
    mode: str
    path: Path
    seconds: list[float] = field(default_factory=list)
    command: str = ""


def generate(target: Target, mode: str, tmp: Path, runs: int) -> Generation:
    """Run ``hypernn-gen`` ``runs`` times (each into a fresh file); the last file is used."""
    result = Generation(target, mode, tmp / f"{target.key}_{mode}.py")
    for run in range(runs):
        out = tmp / f"gen{run}" / f"{target.key}_{mode}.py"
        out.parent.mkdir(exist_ok=True)
        argv = [*cli_command(), target.path, "--mode", mode, "--input-shape", target.cli_shape]
        if target.tokens:
            argv += ["--input-dtype", "int64"]
        argv += ["-o", str(out)]
        start = time.perf_counter()
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
        result.seconds.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"hypernn-gen failed ({shlex.join(argv)}):\n{proc.stderr}")
        shutil.copyfile(out, result.path)
        shown = (a.replace(str(out.parent), "$TMP").replace(str(tmp), "$TMP") for a in argv)
        result.command = " ".join(["hypernn-gen", *list(shown)[len(cli_command()) :]])
    return result


# -- hyper-nn -------------------------------------------------------------------------------------


def import_hypernn() -> tuple[ModuleType | None, ModuleType | None, str | None]:
    """hyper-nn's dynamic and linear (static) modules, or the reason they are unavailable."""
    if not (HYPERNN_DIR / "hypernn").is_dir():
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--timeout",
                "15",
                "--retries",
                "1",
                "--no-deps",
                "--target",
                str(HYPERNN_DIR),
                f"hyper-nn=={HYPERNN_VERSION}",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            return None, None, f"pip install failed: {last_line(proc.stderr)}"
    if str(HYPERNN_DIR) not in sys.path:
        sys.path.append(str(HYPERNN_DIR))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from hypernn.torch import dynamic_hypernet, linear_hypernet
    except Exception as error:  # noqa: BLE001 - reported in the tables
        return None, None, f"import failed: {type(error).__name__}: {error}"
    return dynamic_hypernet, linear_hypernet, None


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):  # a C++ abort says what() on its own line
        if line.startswith("what():"):
            return line
    return lines[-1] if lines else "no output"


# -- candidates and timing ----------------------------------------------------------------------


@dataclass
class Candidate:
    """A thing to time: ``call(x)`` returns the output tensor; ``module`` owns the parameters."""

    name: str
    module: Any = None
    call: Callable[[Any], Any] | None = None
    error: str | None = None
    set_training: Callable[[bool], None] | None = None
    loop: bool = False  # per-sample Python loop: warmed up on a few samples only
    compiled: bool = False  # warmed up at full batch only (a new shape recompiles)

    def train(self, training: bool) -> None:
        self.module.train(training)
        if self.set_training is not None:
            self.set_training(training)


def step_fn(candidate: Candidate, kind: str) -> Callable[[Any], None]:
    import torch

    if kind == "fwdbwd":

        def step(x: Any) -> None:
            candidate.call(x).square().mean().backward()
            candidate.module.zero_grad(set_to_none=True)
    else:

        def step(x: Any) -> None:
            with torch.no_grad():
                candidate.call(x)

    return step


@dataclass
class Cell:
    target: str
    kind: str  # "fwdbwd" (train mode) or "fwd" (eval mode, no_grad)
    batch: int
    times: dict[str, list[float]] = field(default_factory=dict)  # seconds per call
    errors: dict[str, str] = field(default_factory=dict)

    def median_ms(self, name: str) -> float | None:
        t = self.times.get(name)
        return statistics.median(t) * 1e3 if t else None


@dataclass
class Budget:
    cell_s: float  # rounds start until this much time has passed (after warm-up)
    min_rounds: int
    max_rounds: int
    slow_s: float  # full-batch warm-up is skipped for eager candidates estimated slower


def time_cell(
    cell: Cell, candidates: list[Candidate], make_input: Callable[[int], Any], budget: Budget
) -> Cell:
    """Warm up, then time the candidates interleaved (round-robin, rotating start).

    Rounds continue until ``budget.cell_s`` has passed (at least ``min_rounds``, at most
    ``max_rounds``), so fast cells get many repetitions and slow ones the minimum.
    """
    x = make_input(cell.batch)
    small = x[: min(cell.batch, 8)]
    live, steps = [], {}
    for c in candidates:
        if c.error is not None:
            cell.errors[c.name] = c.error
            continue
        c.train(cell.kind == "fwdbwd")
        step = step_fn(c, cell.kind)
        try:
            if c.compiled:
                step(x)
            else:
                step(small)
                start = time.perf_counter()
                step(small)
                per_call = (time.perf_counter() - start) * cell.batch / small.shape[0]
                if not c.loop and per_call <= budget.slow_s:
                    step(x)
        except Exception as error:  # noqa: BLE001 - reported in the table
            cell.errors[c.name] = f"{type(error).__name__}: {error}".splitlines()[0][:160]
            continue
        live.append(c)
        steps[c.name] = step
        cell.times[c.name] = []
    gc.collect()
    gc.disable()
    deadline = time.perf_counter() + budget.cell_s
    try:
        r = 0
        while (
            live
            and r < budget.max_rounds
            and (r < budget.min_rounds or time.perf_counter() < deadline)
        ):
            for c in live[r % len(live) :] + live[: r % len(live)]:
                start = time.perf_counter()
                steps[c.name](x)
                cell.times[c.name].append(time.perf_counter() - start)
            r += 1
    finally:
        gc.enable()
    return cell


# -- checks ---------------------------------------------------------------------------------------


def assert_same(what: str, got: Any, want: Any) -> None:
    """``assert_close`` with rtol 1e-4 and an absolute floor of 1e-4 x the reference's max."""
    import torch

    scale = float(want.detach().abs().max()) if want.numel() else 0.0
    try:
        torch.testing.assert_close(
            got.detach(), want.detach(), rtol=1e-4, atol=max(1e-4 * scale, 1e-7)
        )
    except AssertionError as error:
        raise SystemExit(f"MISMATCH: {what}:\n{error}") from None


@contextlib.contextmanager
def no_dropout(*modules: Any):
    """Dropout off (p=0) so that train-mode outputs are deterministic; restored afterwards."""
    from torch import nn

    saved = [(m, m.p) for root in modules for m in root.modules() if isinstance(m, nn.Dropout)]
    for m, _ in saved:
        m.p = 0.0
    try:
        yield
    finally:
        for m, p in saved:
            m.p = p


def check_grads(what: str, got: Any, want: Any) -> None:
    reference = dict(want.named_parameters())
    for name, p in got.named_parameters():
        if p.grad is None and reference[name].grad is None:
            continue
        if p.grad is None or reference[name].grad is None:
            raise SystemExit(f"MISMATCH: {what}: gradient of {name} missing on one side")
        assert_same(f"{what}: gradient of {name}", p.grad, reference[name].grad)


def verify_dynamic(target: Target, runtime: Any, generated: Any) -> None:
    """Generated (fused and materialising paths) == runtime: outputs, params, gradients."""
    import torch

    x = target.make_input(8)
    with no_dropout(runtime, generated):
        for training in (False, True):  # eval first: train mode updates BatchNorm statistics
            runtime.train(training)
            generated.train(training)
            with torch.set_grad_enabled(training):
                want, want_params = runtime(x)
                got, got_params = generated(x)
                if got_params is not None:
                    raise SystemExit(f"{target.label}: the fused path returned params, not None")
                assert_same(f"{target.label} generated vs runtime (training={training})", got, want)
                if training:
                    want.square().mean().backward()
                    got.square().mean().backward()
                    check_grads(f"{target.label} fused vs runtime", generated, runtime)
                    runtime.zero_grad(set_to_none=True)
                    generated.zero_grad(set_to_none=True)
                got, got_params = generated(x, return_params=True)
                assert_same(f"{target.label} materialising path vs runtime", got, want)
                assert_same(f"{target.label} generated params vs runtime", got_params, want_params)


def verify_static(label: str, runtime: Any, generated: Any, x: Any) -> None:
    want, want_params = runtime(x)
    got, _ = generated(x)  # the fast path: no flat vector
    assert_same(f"{label} static generated vs runtime", got, want)
    got_params = generated(x, return_params=True)[1]
    assert_same(f"{label} static generated params vs runtime", got_params, want_params)
    want.square().mean().backward()
    got.square().mean().backward()
    check_grads(f"{label} static generated vs runtime", generated, runtime)
    runtime.zero_grad(set_to_none=True)
    generated.zero_grad(set_to_none=True)


# -- torch.compile --------------------------------------------------------------------------------


class CompileTimeout(Exception):
    pass


@contextlib.contextmanager
def alarm(seconds: float):
    def handler(signum: int, frame: Any) -> None:
        raise CompileTimeout(f"compilation took more than {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


COMPILE_SETTINGS = (("fwdbwd", 64), ("fwdbwd", 256), ("fwd", 64), ("fwd", 256))


def compile_all(
    compiled: Any, candidate: Candidate, target: Target, settings: tuple[tuple[str, int], ...]
) -> dict[str, float]:
    """First call (compilation) of each setting, each under the time limit; seconds per setting."""
    seconds = {}
    for kind, batch in settings:
        candidate.train(kind == "fwdbwd")
        x = target.make_input(batch)
        start = time.perf_counter()
        with alarm(COMPILE_LIMIT_S):
            step_fn(candidate, kind)(x)
        seconds[f"{kind}@{batch}"] = time.perf_counter() - start
    return seconds


def compile_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: can the generated module be compiled for every setting in time?

    Run first so that a crash (inductor kernels can abort the process) or a hang cannot take
    the benchmark down; it also fills the inductor cache for the in-process compile.
    """
    import torch

    torch.set_num_threads(spec["threads"])
    target = Target(**{**spec["target"], "sample_shape": tuple(spec["target"]["sample_shape"])})
    torch.manual_seed(0)
    module = hypernetwork_class(spec["generated"])()
    candidate = Candidate("compiled", module=module, call=None, compiled=True)
    compiled = torch.compile(module)
    candidate.call = lambda x: compiled(x)[0]
    settings = tuple(tuple(s) for s in spec["settings"])
    try:
        return {"seconds": compile_all(compiled, candidate, target, settings)}
    except Exception as error:  # noqa: BLE001 - reported
        return {"error": f"{type(error).__name__}: {error}".splitlines()[0][:200]}


def probe_compile(target: Target, generated: Path, settings: tuple) -> dict[str, Any]:
    spec = {
        "target": target.__dict__,
        "generated": str(generated),
        "settings": settings,
        "threads": torch_threads(),
    }
    argv = [sys.executable, __file__, "--worker", "compile", "--spec", json.dumps(spec)]
    try:
        proc = subprocess.run(
            argv,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
            timeout=COMPILE_LIMIT_S * len(settings) + 60,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"compilation took more than {COMPILE_LIMIT_S:.0f} s"}
    if proc.returncode != 0:
        return {
            "error": f"the compiling process died (exit {proc.returncode}): "
            f"{last_line(proc.stderr)}"[:240]
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- memory ---------------------------------------------------------------------------------------


def memory_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: peak RSS growth of one forward+backward, after one warm-up step."""
    import torch

    torch.set_num_threads(spec["threads"])
    sys.path.insert(0, str(BENCH_DIR))
    from bench_trace import measure  # noqa: E402 - RSS sampled every ms + getrusage

    from hypernn_gen.runtime.torch import TorchHyperNetwork

    target = Target(**{**spec["target"], "sample_shape": tuple(spec["target"]["sample_shape"])})
    torch.manual_seed(0)
    name = spec["candidate"]
    if name == "target":
        module = target_factory(target)()
        call = module
    elif name == "runtime":
        module = TorchHyperNetwork(
            target_factory(target)(), mode="dynamic", condition_dim=target.condition_dim
        )
        call = lambda x: module(x)[0]  # noqa: E731
    else:
        module = hypernetwork_class(spec["generated"])()
        call = lambda x: module(x)[0]  # noqa: E731
    module.train()
    x = target.make_input(spec["batch"])

    def step() -> None:
        call(x).square().mean().backward()
        module.zero_grad(set_to_none=True)

    start = time.perf_counter()
    step()  # warm-up
    one = time.perf_counter() - start
    gc.collect()
    repeats = max(1, min(20, int(0.5 / max(one, 1e-6))))  # several steps: the sampler sees the peak
    _, peak_mib, _ = measure(lambda: [step() for _ in range(repeats)])
    return {"peak_mib": peak_mib, "repeats": repeats}


def measure_memory(target: Target, generated: Path, candidate: str, batch: int) -> float | str:
    spec = {
        "target": target.__dict__,
        "generated": str(generated),
        "candidate": candidate,
        "batch": batch,
        "threads": torch_threads(),
    }
    # Freed blocks go back to the OS at once (no malloc-threshold growth), so RSS growth
    # after the warm-up step is the step's own peak.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    argv = [sys.executable, __file__, "--worker", "memory", "--spec", json.dumps(spec)]
    proc = subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, check=False, env=env, timeout=600
    )
    if proc.returncode != 0:
        return f"failed: {last_line(proc.stderr)}"[:200]
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"])


# -- building the candidates ---------------------------------------------------------------------


CANDIDATES = ("target", "hyper-nn loop", "runtime vmap", "generated", "generated + compile")


@dataclass
class DynamicSetup:
    target: Target
    flat_size: int
    target_params: int
    candidates: dict[str, Candidate]
    compile_note: str = ""
    compile_seconds: dict[str, float] = field(default_factory=dict)
    probe_seconds: dict[str, float] = field(default_factory=dict)


def build_dynamic(
    target: Target,
    generation: Generation,
    hypernn_dynamic: ModuleType | None,
    hypernn_error: str | None,
    use_compile: bool,
) -> DynamicSetup:
    import torch

    from hypernn_gen.runtime.torch import TorchHyperNetwork

    factory = target_factory(target)
    torch.manual_seed(0)
    plain = factory()
    runtime = TorchHyperNetwork(factory(), mode="dynamic", condition_dim=target.condition_dim)
    cls = hypernetwork_class(generation.path)
    generated = cls()
    generated.load_state_dict(runtime.state_dict())
    verify_dynamic(target, runtime, generated)
    print(
        f"  verified: generated == runtime for {target.label} (outputs, params, gradients)",
        file=sys.stderr,
    )

    candidates = {
        "target": Candidate("target", module=plain, call=plain),
        "runtime vmap": Candidate("runtime vmap", module=runtime, call=lambda x: runtime(x)[0]),
        "generated": Candidate("generated", module=generated, call=lambda x: generated(x)[0]),
    }

    if hypernn_dynamic is None:
        candidates["hyper-nn loop"] = Candidate("hyper-nn loop", error=hypernn_error)
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hn = hypernn_dynamic.TorchDynamicHyperNetwork(
                    input_dim=target.condition_dim,
                    target_network=factory(),
                    embedding_dim=EMBEDDING_DIM,
                    num_embeddings=runtime.num_embeddings,
                )

            def loop(x: Any) -> Any:  # one input per call, as hyper-nn's README does
                return torch.cat(
                    [
                        hn(
                            x[i : i + 1],
                            generate_params_kwargs={"x": x[i : i + 1].flatten(1).float()},
                        )
                        for i in range(x.shape[0])
                    ]
                )

            def set_training(training: bool) -> None:  # its functional target is kept in a list
                for functional in hn.functional_target_network.functional:
                    functional.train(training)

            candidates["hyper-nn loop"] = Candidate(
                "hyper-nn loop", module=hn, call=loop, set_training=set_training, loop=True
            )
        except Exception as error:  # noqa: BLE001 - reported in the table
            candidates["hyper-nn loop"] = Candidate(
                "hyper-nn loop", error=f"{type(error).__name__}: {error}"[:160]
            )

    setup = DynamicSetup(
        target, runtime.layout.flat_size, sum(p.numel() for p in plain.parameters()), candidates
    )
    name = "generated + compile"
    if not use_compile:
        candidates[name] = Candidate(name, error="skipped (--quick)")
        return setup
    probe = probe_compile(target, generation.path, COMPILE_SETTINGS)
    if "error" in probe:
        candidates[name] = Candidate(name, error=f"n/a: {probe['error']}")
        setup.compile_note = probe["error"]
        return setup
    setup.probe_seconds = probe["seconds"]
    compiled_module = cls()
    compiled_module.load_state_dict(runtime.state_dict())
    compiled = torch.compile(compiled_module)
    candidate = Candidate(name, module=compiled, call=lambda x: compiled(x)[0], compiled=True)
    try:
        setup.compile_seconds = compile_all(compiled, candidate, target, COMPILE_SETTINGS)
        x = target.make_input(64)
        compiled.eval()
        with torch.no_grad():
            assert_same(
                f"{target.label} compiled vs eager generated", compiled(x)[0], compiled_module(x)[0]
            )
    except SystemExit as error:
        candidates[name] = Candidate(name, error=f"n/a: {error}".splitlines()[0][:160])
        setup.compile_note = " ".join(str(error).split())[:600]  # in full under the notes
        return setup
    except Exception as error:  # noqa: BLE001 - reported in the table
        message = " ".join(f"{type(error).__name__}: {error}".split())  # one line
        candidates[name] = Candidate(name, error=f"n/a: {message}"[:160])
        setup.compile_note = f"in the benchmark process: {message}"[:600]
        traceback.print_exc()
        return setup
    candidates[name] = candidate
    return setup


# -- Markdown -------------------------------------------------------------------------------------


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def fmt_ratio(r: float) -> str:
    return f"{r:.2f}x" if r < 10 else f"{r:.0f}x" if r >= 100 else f"{r:.1f}x"


def cell_text(cell: Cell, name: str) -> str:
    if name in cell.errors:  # long reasons are in full under "Failures and notes"
        error = cell.errors[name].replace("|", "/")
        return error if len(error) <= 40 else error[:37].rstrip() + "... (notes)"
    ms, base = cell.median_ms(name), cell.median_ms("target")
    if ms is None:
        return "-"
    if name == "target" or not base:
        return fmt_ms(ms)
    return f"{fmt_ms(ms)} ({fmt_ratio(ms / base)})"


def speedup(cell: Cell, slower: str) -> str:
    a, b = cell.median_ms(slower), cell.median_ms("generated")
    return f"**{fmt_ratio(a / b)}**" if a and b else "-"


def dynamic_table(
    cells: list[Cell], setups: dict[str, DynamicSetup], kind: str, batches: tuple[int, ...]
) -> str:
    head = (
        "| target | P (generated) | batch | target alone (ms) | hyper-nn 0.2.2 loop | "
        "runtime vmap(functional_call) | generated (fused) | generated + torch.compile | "
        "generated vs hyper-nn | generated vs vmap | rounds |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = [head]
    for cell in cells:
        if cell.kind != kind or cell.batch not in batches or cell.target not in setups:
            continue
        setup = setups[cell.target]
        rounds = max((len(t) for t in cell.times.values()), default=0)
        rows.append(
            f"| {setup.target.label} | {setup.flat_size:,} | {cell.batch} | "
            + " | ".join(cell_text(cell, n) for n in CANDIDATES)
            + f" | {speedup(cell, 'hyper-nn loop')} | {speedup(cell, 'runtime vmap')} | {rounds} |"
        )
    return "\n".join(rows)


def static_table(cell: Cell, flat_size: int, note: str) -> str:
    names = ("target", "hyper-nn static", "runtime", "generated")
    rounds = max((len(t) for t in cell.times.values()), default=0)
    return (
        "| target | P (generated) | batch | target alone (ms) | hyper-nn 0.2.2 static "
        f"({note}) | runtime | generated | generated vs hyper-nn | generated vs runtime | rounds |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        f"| seed MLP 8-256-256-4 | {flat_size:,} | {cell.batch} | "
        + " | ".join(cell_text(cell, n) for n in names)
        + f" | {speedup(cell, 'hyper-nn static')} | {speedup(cell, 'runtime')} | {rounds} |"
    )


def machine_description() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 2**20:.0f} GiB RAM"

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    import torch

    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    return (
        f"- CPU: {cpu}, {os.cpu_count()} cores visible{memory}; torch threads: "
        f"{torch.get_num_threads()}\n"
        f"- Python {platform.python_version()}, torch {torch.__version__}, jax {version('jax')}, "
        f"flax {version('flax')}, hyper-nn {HYPERNN_VERSION} (from {HYPERNN_DIR}), "
        f"{platform.system()} {platform.release()}\n"
        f"- scheduling priority (nice) of the benchmark: {os.getpriority(os.PRIO_PROCESS, 0)} "
        "(other users' jobs run at 0)\n"
        f"- load average (1/5/15 min) at the start: {load}"
    )


def plot(cells: list[Cell], path: Path) -> str:
    """Seed MLP, dynamic forward+backward, time vs batch; returns a note for RESULTS.md."""
    try:
        import matplotlib
    except ImportError:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "matplotlib"],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            return (
                f"plot skipped: matplotlib is missing and could not be installed "
                f"({last_line(proc.stderr)})"
            )
        import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    series = [c for c in cells if c.target == "seed" and c.kind == "fwdbwd"]
    series.sort(key=lambda c: c.batch)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = {
        "target": "target alone",
        "hyper-nn loop": "hyper-nn 0.2.2 (per-sample loop)",
        "runtime vmap": "runtime vmap(functional_call)",
        "generated": "generated (fused)",
    }
    for name, label in labels.items():
        points = [(c.batch, c.median_ms(name)) for c in series if c.median_ms(name)]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("forward + backward, median ms")
    ax.set_title(
        "Dynamic hypernetwork, seed MLP (69,120 generated values)\n"
        f"forward+backward, fp32, CPU, torch threads: {torch_threads()}",
        fontsize=10,
    )
    batches = [c.batch for c in series]
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return ""


# -- main -----------------------------------------------------------------------------------------


class Benchmark:
    """One run of every section; ``report()`` turns the results into Markdown."""

    def __init__(self, quick: bool, out: Path, command: str) -> None:
        self.quick = quick
        self.out = out
        self.command = command
        self.started = time.perf_counter()
        self.budget = (
            Budget(cell_s=0.5, min_rounds=2, max_rounds=5, slow_s=1.0)
            if quick
            else Budget(cell_s=6.0, min_rounds=3, max_rounds=200, slow_s=1.5)
        )
        self.machine = machine_description()
        self.failures: list[str] = []
        self.generations: dict[tuple[str, str], Generation] = {}
        self.setups: dict[str, DynamicSetup] = {}
        self.cells: list[Cell] = []
        self.static: tuple[Cell, int] | None = None
        self.memory_rows: list[tuple[Target, int, dict[str, float | str]]] = []
        self.trace_text = "skipped (--quick)."
        self.plot_note = "plot skipped (--quick)."
        self.flax_text = "not run."

    def log(self, message: str) -> None:
        elapsed = time.perf_counter() - self.started
        print(f"[{elapsed:6.1f} s] {message}", file=sys.stderr, flush=True)

    def run(self, tmp: Path) -> None:
        all_targets = targets(tmp)
        keys = ("seed",) if self.quick else ("seed", "mlp", "cnn", "transformer")
        self.generate(all_targets, keys, tmp)
        dynamic_nn, linear_nn, hypernn_error = import_hypernn()
        if hypernn_error:
            self.failures.append(f"hyper-nn {HYPERNN_VERSION}: {hypernn_error}")
        for key in keys:
            self.dynamic(all_targets[key], dynamic_nn, hypernn_error)
        self.static_mode(all_targets["seed"], linear_nn, hypernn_error)
        for key in ("seed",) if self.quick else ("seed", "mlp"):
            self.memory(all_targets[key])
        if not self.quick:
            self.trace()
            self.plot_note = plot(self.cells, self.out.parent / "dynamic_vs_batch.png")
            if self.plot_note:
                self.failures.append(self.plot_note)
        self.flax()

    # -- sections -----------------------------------------------------------------------------

    def generate(self, all_targets: dict[str, Target], keys: tuple[str, ...], tmp: Path) -> None:
        """The modules, written by the CLI (and timed: section 4)."""
        jobs = [
            (key, mode)
            for key in keys
            for mode in ("dynamic", "static")
            if mode == "dynamic" or key in ("seed", "cnn")
        ]
        for key, mode in jobs:
            runs = 1 if self.quick or key not in ("seed", "cnn") else 3
            self.log(f"hypernn-gen {key} --mode {mode} (x{runs})")
            if not self.quick:
                self.generations[key, mode] = generate(all_targets[key], mode, tmp, runs)
        if self.quick:  # concurrently, to keep the smoke test short: not times to quote
            with ThreadPoolExecutor(len(jobs)) as pool:
                done = pool.map(lambda job: generate(all_targets[job[0]], job[1], tmp, 1), jobs)
                self.generations = dict(zip(jobs, done, strict=True))

    def dynamic(self, target: Target, dynamic_nn: ModuleType | None, error: str | None) -> None:
        self.log(f"building and verifying {target.label}")
        setup = build_dynamic(
            target, self.generations[target.key, "dynamic"], dynamic_nn, error, not self.quick
        )
        self.setups[target.key] = setup
        if setup.compile_note:
            self.failures.append(
                f"torch.compile of the generated {target.label}: {setup.compile_note}"
            )
        if self.quick:
            plan = [(kind, b) for kind in ("fwdbwd", "fwd") for b in QUICK_BATCHES]
        else:
            sweep = SWEEP_BATCHES if target.key == "seed" else TABLE_BATCHES
            plan = [("fwdbwd", b) for b in sweep] + [("fwd", b) for b in TABLE_BATCHES]
        for kind, batch in plan:
            names = [
                n
                for n in CANDIDATES
                if n != "generated + compile" or batch in TABLE_BATCHES or setup.candidates[n].error
            ]
            cell = time_cell(
                Cell(target.key, kind, batch),
                [setup.candidates[n] for n in names],
                target.make_input,
                self.budget,
            )
            self.cells.append(cell)
            self.log(
                f"  {kind} batch {batch}: "
                + ", ".join(f"{n} {fmt_ms(cell.median_ms(n))}" for n in names if cell.times.get(n))
            )
            for n, e in cell.errors.items():
                if not e.startswith(("skipped", "n/a")):
                    self.failures.append(f"{n}, {target.label}, {kind} batch {batch}: {e}")
        setup.candidates = {}  # free the models before the next target
        gc.collect()

    def static_mode(self, seed: Target, linear_nn: ModuleType | None, error: str | None) -> None:
        """Static mode, seed MLP, forward+backward at batch 64."""
        import torch

        from hypernn_gen.runtime.torch import TorchHyperNetwork

        self.log("static mode, seed MLP")
        factory = target_factory(seed)
        torch.manual_seed(0)
        plain = factory()
        runtime = TorchHyperNetwork(factory())
        generated = hypernetwork_class(self.generations["seed", "static"].path)()
        generated.load_state_dict(runtime.state_dict())
        verify_static(seed.label, runtime, generated, seed.make_input(8))
        if linear_nn is None:
            hyper_nn = Candidate("hyper-nn static", error=error)
        else:
            try:
                hn = linear_nn.TorchLinearHyperNetwork.from_target(
                    factory(), embedding_dim=EMBEDDING_DIM, num_embeddings=runtime.num_embeddings
                )
                hyper_nn = Candidate("hyper-nn static", module=hn, call=hn)
            except Exception as e:  # noqa: BLE001 - reported in the table
                hyper_nn = Candidate("hyper-nn static", error=f"{type(e).__name__}: {e}")
        candidates = [
            Candidate("target", module=plain, call=plain),
            hyper_nn,
            Candidate("runtime", module=runtime, call=lambda x: runtime(x)[0]),
            Candidate("generated", module=generated, call=lambda x: generated(x)[0]),
        ]
        cell = time_cell(Cell("seed", "fwdbwd", 64), candidates, seed.make_input, self.budget)
        self.static = (cell, runtime.layout.flat_size)

    def memory(self, target: Target) -> None:
        """Peak memory of dynamic forward+backward at batch 256, one subprocess per candidate."""
        names = ("runtime", "generated") if self.quick else ("target", "runtime", "generated")
        path = self.generations[target.key, "dynamic"].path
        self.log(f"memory: {target.label}, " + ", ".join(names))
        if self.quick:  # concurrently (separate processes: their RSS figures stay separate)
            with ThreadPoolExecutor(len(names)) as pool:
                values = pool.map(lambda n: measure_memory(target, path, n, 256), names)
                result = dict(zip(names, values, strict=True))
        else:
            result = {name: measure_memory(target, path, name, 256) for name in names}
        for name, value in result.items():
            if isinstance(value, str):
                self.failures.append(f"memory of {name}, {target.label}: {value}")
        self.memory_rows.append((target, self.setups[target.key].flat_size, result))

    def trace(self) -> None:
        """The 124M tracing benchmark, through bench_trace.main."""
        self.log("bench_trace.py --runs 3")
        sys.path.insert(0, str(BENCH_DIR))
        import bench_trace

        buffer = io.StringIO()
        try:
            with contextlib.redirect_stdout(buffer):
                code = bench_trace.main(["--runs", "3"])
            self.trace_text = buffer.getvalue().strip()
            if code != 0:
                self.failures.append("bench_trace.py: the peak memory exceeded its limit")
        except SystemExit as error:
            self.trace_text = f"failed: {error}"
            self.failures.append(f"bench_trace.py: {error}")

    def flax(self) -> None:
        """Section 6: ``bench_flax.py`` in a subprocess (JAX keeps its own threads and memory)."""
        self.log("bench_flax.py" + (" --quick" if self.quick else ""))
        args = [sys.executable, str(BENCH_DIR / "bench_flax.py")]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(
            args + (["--quick"] if self.quick else []),
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        self.flax_text = proc.stdout.strip()
        if proc.returncode != 0:
            self.flax_text = f"failed: {last_line(proc.stderr)}"
            self.failures.append(f"bench_flax.py: {last_line(proc.stderr)}")

    # -- the report ---------------------------------------------------------------------------

    def report(self) -> str:
        total = time.perf_counter() - self.started
        load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
        batches = QUICK_BATCHES if self.quick else TABLE_BATCHES
        parts = [
            "# hypernn-gen benchmarks",
            "",
            f"Command (from the repository root): `{self.command}` ({total / 60:.1f} min in all)."
            + (
                " **Quick smoke run: tiny repetition counts, not figures to quote.**"
                if self.quick
                else ""
            ),
            "",
            "## Machine",
            "",
            f"{self.machine}; at the end: {load}",
            "",
            "## How it is measured",
            "",
            *method_notes(self.budget),
            "",
            "## 1. Dynamic mode, forward+backward",
            "",
            "Median ms per step (ratio to the target alone).",
            "",
            dynamic_table(self.cells, self.setups, "fwdbwd", batches),
            "",
            "## 1b. Dynamic mode, forward-only (eval, no_grad)",
            "",
            dynamic_table(self.cells, self.setups, "fwd", batches),
            "",
            *compile_notes(self.setups),
        ]
        if self.static is not None:
            parts += [
                "## 2. Static mode, forward+backward, batch 64",
                "",
                "hyper-nn's `TorchHyperNetwork.from_target` cannot be used alone (its "
                "`generate_params` is abstract); its static hypernetwork with a default "
                "generator, `TorchLinearHyperNetwork.from_target(target, embedding_dim=32, "
                "num_embeddings=<ours>)`, is used. The generated static module was checked "
                "equal to the runtime (outputs, params, gradients) first.",
                "",
                static_table(*self.static, "TorchLinearHyperNetwork.from_target"),
                "",
            ]
        parts += [*memory_table(self.memory_rows), "", *generation_table(self.generations)]
        parts += [
            "",
            "Tracing a 124M-parameter GPT (`python benchmarks/bench_trace.py --runs 3`):",
            "",
            self.trace_text,
            "",
        ]
        if not self.quick:
            parts += [
                "## 5. Dynamic forward+backward vs batch size (seed MLP)",
                "",
                self.plot_note
                or "![dynamic forward+backward time vs batch size](dynamic_vs_batch.png)",
                "",
                dynamic_table(self.cells, {"seed": self.setups["seed"]}, "fwdbwd", SWEEP_BATCHES),
                "",
            ]
        parts += [
            "## 6. Flax (JAX), forward+backward (jitted)",
            "",
            "Linen MLPs; median ms per step (ratio to the target alone). The runtime "
            "materialises batch x P weights under `jax.vmap`; the generated dynamic module's "
            "fused path builds no per-sample weights (see `hypernn_gen/fuse_flax.py`); the "
            "generated static module makes one weight set for the batch. Each generated module "
            "was checked against its runtime twin (outputs and gradients) first; "
            "`python benchmarks/bench_flax.py` runs this section alone.",
            "",
            self.flax_text,
            "",
            "## Failures and notes",
            "",
            *([f"- {f}" for f in self.failures] or ["- none"]),
        ]
        return "\n".join(parts) + "\n"


def method_notes(budget: Budget) -> list[str]:
    return [
        "- Every table cell is the **median** of interleaved repetitions: in each round every "
        "candidate runs once, the starting candidate rotating; rounds go on for "
        f"{budget.cell_s:g} s (at least {budget.min_rounds}; `rounds` in the tables). Warm-up "
        "first: one call on 8 samples and one on the full batch (the full-batch warm-up is "
        f"skipped when the 8-sample call extrapolates beyond {budget.slow_s:g} s and for "
        "hyper-nn's per-sample loop, whose iterations are all alike). The machine is shared "
        "and noisy (2-3x between runs; see the load averages above), so read the ratios, which "
        "come from the same rounds, rather than the absolute times.",
        "- `--threads` (default 2) sets torch's intra-op threads, here and in the workers. Under "
        "heavy outside load two threads degrade badly (each parallel region waits for a "
        "descheduled partner thread: a 1 ms step then has 100+ ms outliers), which inflates "
        "candidates made of many small operations; one thread is much steadier.",
        "- glibc malloc is fixed for the run (`"
        + " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items())
        + "`, set by the script): with the moving default threshold a small candidate timed "
        "beside one that frees large buffers ran 2-3x slower than alone.",
        "- Ratios in brackets are to the target alone on the same batch; the speed-up columns "
        "divide the other candidate's median by the generated module's (eager, fused path).",
        "- forward+backward: train mode, `loss = output.square().mean()`, `backward()`, "
        "`zero_grad(set_to_none=True)`. forward-only: eval mode under `torch.no_grad()`.",
        "- fp32 throughout; every hypernetwork has `embedding_dim=32` and the same number of "
        "embeddings (the runtime's default chunking, which the CLI also uses).",
        "- **hyper-nn 0.2.2**: `TorchDynamicHyperNetwork(input_dim, target, embedding_dim=32, "
        "num_embeddings=<ours>)`, unpatched. It takes one input per call (its RNN-cell "
        "embedding has a batch of one), so the batch is a Python loop over the samples, as in "
        "its README; its condition is the sample flattened to `(1, -1)` and cast to float32 "
        "(token ids for the transformer), and train/eval mode is set on its functional target "
        "explicitly (it keeps it in a list, out of `.train()`'s reach).",
        '- **runtime**: `hypernn_gen.runtime.torch.TorchHyperNetwork(target, mode="dynamic", '
        "condition_dim=...)`: `vmap(functional_call)` over per-sample weights (batch x P "
        "values).",
        "- **generated**: the module written by `hypernn-gen <target> --mode dynamic "
        "--input-shape ...` into a temporary directory, called as `module(x)`: the fused path, "
        "which returns `(output, None)`. Before timing, after "
        "`generated.load_state_dict(runtime.state_dict())`, its outputs (eval and train mode, "
        "dropout off), generated parameters (materialising path) and all gradients were "
        "checked equal to the runtime's with `assert_close(rtol=1e-4, atol=1e-4 x "
        "max|reference|)`; the benchmark stops on a mismatch.",
        "- **torch.compile**: `torch.compile(generated)`, default settings, compiled first in a "
        "separate process (a crash, or a compilation over "
        f"{COMPILE_LIMIT_S:.0f} s for one setting, is reported as n/a), then again in the "
        "benchmark process; its output was checked against the eager module.",
    ]


def compile_notes(setups: dict[str, DynamicSetup]) -> list[str]:
    lines = []
    for setup in setups.values():
        if setup.probe_seconds:
            first = ", ".join(f"{k} {v:.1f} s" for k, v in setup.probe_seconds.items())
            again = ", ".join(f"{k} {v:.1f} s" for k, v in setup.compile_seconds.items())
            lines.append(
                f"- {setup.target.label}: in a fresh process (inductor cache as found): {first};"
                f" again in the benchmark process: {again}"
            )
        elif setup.compile_note:
            lines.append(f"- {setup.target.label}: n/a, {setup.compile_note}")
    if not lines:
        return []
    return [
        "Compilation time of `torch.compile(generated)`, first call of each setting "
        "(fwdbwd: train mode with backward; fwd: eval + no_grad; @ batch):",
        "",
        *lines,
        "",
    ]


def memory_table(rows: list[tuple[Target, int, dict[str, float | str]]]) -> list[str]:
    lines = [
        "## 3. Peak memory, dynamic forward+backward, batch 256",
        "",
        "A fresh subprocess per candidate (`MALLOC_MMAP_THRESHOLD_=65536`, so freed memory "
        "returns to the OS at once): one warm-up step, then the peak RSS above the RSS before "
        "the measured steps (sampled every ms and cross-checked with `getrusage`: "
        "`bench_trace.measure`). B x P x 4 is the size of one float32 buffer holding every "
        "sample's weights.",
        "",
        "| target | P (generated) | B x P x 4 bytes (MiB) | target alone (MiB) | runtime vmap "
        "(MiB) | generated, fused (MiB) | runtime / generated |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for target, flat, result in rows:
        cells = []
        for name in ("target", "runtime", "generated"):
            value = result.get(name)
            cells.append(
                "-" if value is None else value if isinstance(value, str) else f"{value:,.1f}"
            )
        rt, gn = result.get("runtime"), result.get("generated")
        ok = isinstance(rt, float) and isinstance(gn, float) and gn > 0
        lines.append(
            f"| {target.label} | {flat:,} | {256 * flat * 4 / MIB:,.1f} | "
            + " | ".join(cells)
            + f" | {fmt_ratio(rt / gn) if ok else '-'} |"
        )
    return lines


def generation_table(generations: dict[tuple[str, str], Generation]) -> list[str]:
    lines = [
        "## 4. Generation and tracing time",
        "",
        "Wall time of one `hypernn-gen` subprocess (start-up, load, trace, render, format, "
        "write) and its median over the runs.",
        "",
        "| command | runs | median (s) | all runs (s) |",
        "|---|---:|---:|---:|",
    ]
    for g in generations.values():
        runs = ", ".join(f"{s:.2f}" for s in g.seconds)
        lines.append(
            f"| `{g.command}` | {len(g.seconds)} | {statistics.median(g.seconds):.2f} | {runs} |"
        )
    return lines


def fixed_allocator() -> None:
    """Run again with :data:`MALLOC_ENV` (read by glibc at start-up only) unless already set."""
    if platform.system() != "Linux" or all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="seed MLP only, tiny repetition counts (smoke test)"
    )
    parser.add_argument(
        "--out",
        default=str(BENCH_DIR / "RESULTS.md"),
        help="Markdown file to write (default benchmarks/RESULTS.md); the plot goes next to it",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=THREADS,
        help=f"torch intra-op threads (default {THREADS}; workers use the same)",
    )
    parser.add_argument("--worker", choices=("compile", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore", message=".*functorch.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*batching rule.*")
    if args.worker:
        sys.path.insert(0, str(ROOT))
        worker = compile_worker if args.worker == "compile" else memory_worker
        print(json.dumps(worker(json.loads(args.spec))))
        return 0

    import torch

    torch.set_num_threads(args.threads)
    command = shlex.join(
        ["python", os.path.relpath(__file__, ROOT), *(sys.argv[1:] if argv is None else argv)]
    )
    out = Path(args.out).resolve()
    bench = Benchmark(args.quick, out, command)
    with tempfile.TemporaryDirectory(prefix="bench_hypernets_") as tmp:
        bench.run(Path(tmp))
    report = bench.report()
    print(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    bench.log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    fixed_allocator()
    sys.exit(main())
