"""Run configuration: typed pydantic sections (:mod:`.schema`), YAML loading and ``--set key=value``
overrides (:mod:`.load`).

Every key is declared in :mod:`.schema` with its type and rules; an unknown key or a bad value is
a :class:`ConfigError` of one line naming the key. ``load_config`` returns a validated
:class:`Config`.
"""

from fedlora_jax.config.federation import ClientStepsConfig, CompressionConfig, ServerOptimizerConfig
from fedlora_jax.config.load import ConfigError, load_config, parse_overrides
from fedlora_jax.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    FederationConfig,
    LogConfig,
    LoraSection,
    MlflowConfig,
    ModelConfig,
    OptimConfig,
    PrivacyConfig,
    cohort_size,
)

__all__ = [
    "CheckpointConfig",
    "ClientStepsConfig",
    "CompressionConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "FederationConfig",
    "LogConfig",
    "LoraSection",
    "MlflowConfig",
    "ModelConfig",
    "OptimConfig",
    "PrivacyConfig",
    "ServerOptimizerConfig",
    "cohort_size",
    "load_config",
    "parse_overrides",
]
