"""hyper-nn's README example as generated code: ``policy_torch_static.py``.

    python examples/hyper_nn_seed/readme_generated.py

``policy_torch_static.py`` was written by ``hypernn-gen`` from ``policy.py`` (the README's
8-256-256-4 network) with the README's sizes, ``embedding_dim=32`` and ``num_embeddings=512``;
the pyproject job is the same as

    hypernn-gen examples/hyper_nn_seed/policy.py --mode static --num-embeddings 512 \\
        -o examples/hyper_nn_seed/policy_torch_static.py

The file depends on PyTorch only. Its embedding table and weight generator are the runtime
library's defaults (a learned table and one linear layer), not the README's custom
``StaticEmbeddingModule``/``StaticWeightGenerator``; to change them in generated code, override
the ``embedding``/``weight_generator`` blocks of the template (docs/templates.md). Because the
generated classes keep the runtime's parameter names, a runtime ``TorchHyperNetwork`` with the
same sizes and its default modules loads into the generated one, and both compute the same thing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from policy import make_target  # noqa: E402
from policy_torch_static import NUM_EMBEDDINGS, PolicyHyperNetwork  # noqa: E402

from hypernn_gen.runtime.torch import TorchHyperNetwork  # noqa: E402


def main() -> int:
    torch.manual_seed(0)
    hypernetwork = PolicyHyperNetwork()  # builds its own make_target()
    inp = torch.zeros((1, 8))
    # the generated file's fast path returns (output, None); ask for the flat vector
    output, generated_params = hypernetwork(inp, return_params=True)
    # pass in previously generated params
    again, _ = hypernetwork(inp, generated_params=generated_params)
    assert torch.equal(again, output)

    n_target = sum(p.numel() for p in make_target().parameters())
    n_hyper = sum(p.numel() for p in hypernetwork.parameters() if p.requires_grad)
    print(f"output: {tuple(output.shape)}")
    print(f"generated_params: {tuple(generated_params.shape)} (the target has {n_target:,})")
    print(f"num_embeddings: {NUM_EMBEDDINGS}, hypernetwork trainable parameters: {n_hyper:,}")

    # The runtime library with the same sizes and default modules: same parameter names.
    runtime = TorchHyperNetwork(make_target(), embedding_dim=32, num_embeddings=512)
    hypernetwork.load_state_dict(runtime.state_dict())
    x = torch.randn(16, 8)
    generated_out, _ = hypernetwork(x)
    runtime_out, _ = runtime(x)
    torch.testing.assert_close(generated_out, runtime_out)
    print("runtime state_dict loaded into the generated module: same outputs")
    print("generated example: ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
