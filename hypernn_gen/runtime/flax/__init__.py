"""Hypernetworks for Flax targets, built at run time: Linen and NNX.

    from hypernn_gen.runtime.flax import FlaxHyperNetwork, NNXHyperNetwork

Both follow the contract in :mod:`hypernn_gen.layout` and the vocabulary of
:mod:`hypernn_gen.runtime.torch` (``embedding_module``, ``weight_generator``, ``param_scale``,
``param_shift``; calls return ``(output, generated_params)``).

``flatten_params(layout, params)``/``unflatten_params(layout, flat)`` convert between the flat
vector and the target's parameter tree for either API; :class:`NNXHyperNetwork` also has them as
methods (its layout is known at construction, a Linen one only from the inputs).
"""

from ._common import TargetHyperNetworkError, flatten_params, unflatten_params
from ._linen import (
    DynamicEmbedding,
    FlaxEmbeddingModule,
    FlaxHyperNetwork,
    FlaxWeightGenerator,
    GroupedLinearWeightGenerator,
    LinearWeightGenerator,
    MLPWeightGenerator,
    StaticEmbedding,
)
from ._nnx import (
    GeneratedSlot,
    NNXDynamicEmbedding,
    NNXEmbeddingModule,
    NNXGroupedLinearWeightGenerator,
    NNXHyperNetwork,
    NNXLinearWeightGenerator,
    NNXMLPWeightGenerator,
    NNXStaticEmbedding,
    NNXWeightGenerator,
)

__all__ = [
    "DynamicEmbedding",
    "FlaxEmbeddingModule",
    "FlaxHyperNetwork",
    "FlaxWeightGenerator",
    "GeneratedSlot",
    "GroupedLinearWeightGenerator",
    "LinearWeightGenerator",
    "MLPWeightGenerator",
    "NNXDynamicEmbedding",
    "NNXEmbeddingModule",
    "NNXGroupedLinearWeightGenerator",
    "NNXHyperNetwork",
    "NNXLinearWeightGenerator",
    "NNXMLPWeightGenerator",
    "NNXStaticEmbedding",
    "NNXWeightGenerator",
    "StaticEmbedding",
    "TargetHyperNetworkError",
    "flatten_params",
    "unflatten_params",
]
