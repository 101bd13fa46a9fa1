"""The engine: jitted and host-free. Server state, the cohort, local training, aggregation, the
``clients`` mesh and the round. It takes built objects (an optax transform, a method, a layout),
never the config."""

from fedlora_jax.engine.aggregate import BaseFolding, UserDP, map_modules
from fedlora_jax.engine.client import LocalStats, LocalTrainer, RecordDP, StepStreams, train_clients
from fedlora_jax.engine.cohort import ClientSteps, Cohort, normalised_weights
from fedlora_jax.engine.round import Federation, init_server_state
from fedlora_jax.engine.state import ClientShards, RoundOutput, ServerState, device_shards

__all__ = ["BaseFolding", "ClientShards", "ClientSteps", "Cohort", "Federation", "LocalStats", "LocalTrainer",
           "RecordDP", "RoundOutput", "ServerState", "StepStreams", "UserDP", "device_shards", "init_server_state",
           "map_modules", "normalised_weights", "train_clients"]
