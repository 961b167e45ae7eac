"""Hypernetworks built at run time from a live target module.

Import the backend you use: :mod:`hypernn_gen.runtime.torch` or :mod:`hypernn_gen.runtime.flax`.
Neither is imported here, so a PyTorch user needs no JAX and the other way round.
"""
