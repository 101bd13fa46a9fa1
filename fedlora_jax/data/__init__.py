"""Data: containers, the synthetic task, loaders, tokenisation and client partitioners."""

from fedlora_jax.data.base import FederatedData, federate
from fedlora_jax.data.partition import (
    SCHEMES,
    dirichlet,
    iid,
    imbalanced,
    label_histogram,
    label_proportions,
    partition,
    quantity,
    split_local_test,
)
from fedlora_jax.data.synthetic import make_synthetic
from fedlora_jax.data.gsm8k import GSM8KSplit, extract_gsm8k_answer, load_gsm8k
from fedlora_jax.data.sources import load_federated, load_text_dataset
from fedlora_jax.data.text import GLUE_TASKS, GlueTask, TextSplit, load_files, load_glue_hub, load_glue_local
from fedlora_jax.data.tokenise import load_tokenizer, tokenize_prompt_answer, tokenize_texts

__all__ = [
    "FederatedData", "federate", "make_synthetic", "load_federated",
    "SCHEMES", "partition", "iid", "dirichlet", "label_proportions", "imbalanced", "quantity",
    "split_local_test", "label_histogram",
    "GLUE_TASKS", "GlueTask", "GSM8KSplit", "TextSplit", "extract_gsm8k_answer", "load_files",
    "load_glue_hub", "load_glue_local", "load_gsm8k", "load_text_dataset",
    "load_tokenizer", "tokenize_prompt_answer", "tokenize_texts",
]
