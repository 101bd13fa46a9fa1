"""Data: containers, the synthetic task, loaders, tokenisation and client partitioners."""

from fedlora_jax.data.base import FederatedData, federate
from fedlora_jax.data.synthetic import make_synthetic

__all__ = ["FederatedData", "federate", "make_synthetic"]
