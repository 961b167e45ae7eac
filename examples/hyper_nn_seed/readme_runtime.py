"""hyper-nn's README example on hypernn-gen's runtime library: only the imports changed.

    python examples/hyper_nn_seed/readme_runtime.py

The code between the two ``----`` lines is hyper-nn's README example for its
``TorchHyperNetwork``, the 8-256-256-4 policy network. Its three ``from hypernn.torch...``
imports became the one ``from hypernn_gen.runtime.torch import ...`` line; nothing else changed.
The second part is hyper-nn's "custom constructors with functools.partial" example, likewise.
The lines after them use keywords that differ (see docs/from-hyper-nn.md).
"""

# ---- hyper-nn's README example (only the imports changed) ----------------------------------
import torch
import torch.nn as nn

from hypernn_gen.runtime.torch import TorchEmbeddingModule, TorchHyperNetwork, TorchWeightGenerator

target_network = nn.Sequential(
    nn.Linear(8, 256),
    nn.Tanh(),
    nn.Linear(256, 256),
    nn.Tanh(),
    nn.Linear(256, 4, bias=False),
)


class StaticEmbeddingModule(TorchEmbeddingModule):
    def __init__(self, embedding_dim: int, num_embeddings: int):
        super().__init__(embedding_dim, num_embeddings)
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)

    def forward(self):
        indices = torch.arange(self.num_embeddings)
        return self.embedding(indices)


class StaticWeightGenerator(TorchWeightGenerator):
    def __init__(self, embedding_dim: int, hidden_dim: int):
        super().__init__(embedding_dim, hidden_dim)
        self.embedding_network = nn.Sequential(
            nn.Linear(embedding_dim, 32),
            nn.ReLU(),
            nn.Linear(32, hidden_dim),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.embedding_network(embedding).view(-1)


hypernetwork = TorchHyperNetwork(
    target_network,
    embedding_module_constructor=StaticEmbeddingModule,
    weight_generator_constructor=StaticWeightGenerator,
    embedding_dim=32,
    num_embeddings=512,
)

# now we can use the hypernetwork like any other nn.Module
inp = torch.zeros((1, 8))
output, generated_params = hypernetwork(inp)
# ---- end of the README example -------------------------------------------------------------

# ---- hyper-nn's "custom constructors with functools.partial" (only the imports changed) ----
from functools import partial  # noqa: E402


class CustomStaticWeightGenerator(TorchWeightGenerator):
    def __init__(self, embedding_dim: int, hidden_dim: int, embedding_network_hidden_dim: int):
        super().__init__(embedding_dim, hidden_dim)
        self.embedding_network = nn.Sequential(
            nn.Linear(embedding_dim, embedding_network_hidden_dim),
            nn.ReLU(),
            nn.Linear(embedding_network_hidden_dim, hidden_dim),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.embedding_network(embedding).view(-1)


weight_generator_constructor = partial(CustomStaticWeightGenerator, embedding_network_hidden_dim=64)

custom_hypernetwork = TorchHyperNetwork(
    target_network,
    embedding_module_constructor=StaticEmbeddingModule,
    weight_generator_constructor=weight_generator_constructor,
    embedding_dim=32,
    num_embeddings=512,
)
# ---- end -----------------------------------------------------------------------------------

if __name__ == "__main__":
    n_target = sum(p.numel() for p in target_network.parameters())
    n_hyper = sum(p.numel() for p in hypernetwork.parameters() if p.requires_grad)
    print(f"output: {tuple(output.shape)}")
    print(f"generated_params: {tuple(generated_params.shape)} (the target has {n_target:,})")
    print(f"hypernetwork trainable parameters: {n_hyper:,}")
    # hyper-nn passed earlier weights back as `params=`; here the keyword is `generated_params=`
    again, _ = hypernetwork(inp, generated_params=generated_params)
    assert torch.equal(again, output)
    custom_output, _ = custom_hypernetwork(inp)
    print(f"custom (partial) generator output: {tuple(custom_output.shape)}")
    print("readme example: ok")
