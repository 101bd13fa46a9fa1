"""fedlora_jax: federated LoRA fine-tuning of transformers under differential privacy, in JAX/Flax NNX."""

__version__ = "0.1.0"
