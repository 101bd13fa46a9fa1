"""A tiny synthetic experiment shared by the engine tests (1-layer BERT, hidden 32)."""

from fedlora_jax.config import load_config
from fedlora_jax.run import build_experiment

TINY = {
    "seed": 3,
    "model": {"arch": "bert", "config": {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
                                          "num_attention_heads": 2, "intermediate_size": 64,
                                          "max_position_embeddings": 32}},
    "lora": {"rank": 4},
    # padded rows: half the compile time of packed streams (tests of packing set data.packing=auto)
    "data": {"num_clients": 6, "vocab_size": 64, "seq_len": 12, "examples_per_client": [5, 40], "test_examples": 64,
             "packing": None},
    "federation": {"rounds": 3, "clients_per_round": 5, "local_steps": 3, "batch_size": 8},
    "optim": {"name": "adamw", "learning_rate": 1e-2, "weight_decay": 0.01},
    "eval": {"every": 1, "batch_size": 32},
}


def tiny_config(**overrides):
    """TINY with dotted-key overrides, e.g. tiny_config(**{"federation.method": "ffa"})."""
    return load_config(TINY, [f"{k}={v}" for k, v in overrides.items()])


def tiny_experiment(**overrides):
    return build_experiment(tiny_config(**overrides))
