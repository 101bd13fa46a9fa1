"""Hugging Face PEFT adapters in and out: write a trainable state as a LoRA adapter (and its base
as a transformers checkpoint), read an adapter back into a trainable state. Names come from the
model registry, as for loading; this package knows no run directory and no config."""

from fedlora_jax.hf.export import save_adapter, save_base
from fedlora_jax.hf.load import load_adapter
from fedlora_jax.hf.naming import AdapterError, Naming, peft_task_type

__all__ = ["AdapterError", "Naming", "load_adapter", "peft_task_type", "save_adapter", "save_base"]
