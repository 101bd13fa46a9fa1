"""Run configuration: typed dataclass sections, YAML loading, ``--set key=value`` overrides.

Every key is declared below with its type; an unknown key or a value of the wrong type is a
:class:`ConfigError` naming the key. ``load_config`` returns a validated :class:`Config`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem, reported as one line naming the key."""


@dataclasses.dataclass
class ModelConfig:
    """The transformer. Either ``pretrained`` (a local directory or hub id) or a random init of
    ``arch`` with ``config`` (Hugging Face config.json keys). ``pooling`` (sequence
    classification): ``cls`` (HF's head on the first token) or ``mean`` (masked mean of the last
    hidden states, for checkpoints trained for mean pooling such as sentence-transformers).
    ``adapter``: a PEFT LoRA adapter directory (e.g. one ``fedlora-jax export`` wrote) whose
    factors, and head when it saved one, the run starts from instead of a fresh LoRA init; its
    rank, alpha, rsLoRA and adapted modules must match the ``lora`` section."""

    arch: str = "bert"
    pretrained: str | None = None
    config: dict = dataclasses.field(default_factory=dict)
    dtype: str = "float32"
    pooling: str = "cls"
    adapter: str | None = None


@dataclasses.dataclass
class LoraSection:
    rank: int = 8
    alpha: float = 16.0
    targets: list | None = None
    rslora: bool = False


@dataclasses.dataclass
class DataConfig:
    """Where examples come from and how they are split into clients.

    ``source: synthetic`` needs no files: token sequences whose label is set by planted
    class-specific tokens, with per-client label skew Dirichlet(``label_skew_alpha``).
    ``source: glue | files | gsm8k`` reads real data with the loader options in ``load``
    (e.g. ``{task: sst2, dir: ../shared/data/glue/SST-2}``), tokenises with ``tokenizer``
    (default: the model's directory) and partitions with ``partition``
    (``{scheme: iid | dirichlet | label_proportions | imbalanced | quantity, ...options}``).

    ``packing: auto`` lays each local step's real tokens end to end in a few static stream
    lengths chosen from the data (see fedlora_jax/data/packing.py), so padding is not computed;
    ``null`` pads every row to ``max_length``. Results are the same either way.
    """

    source: str = "synthetic"
    num_clients: int = 10
    local_test_fraction: float = 0.2
    # real data
    load: dict = dataclasses.field(default_factory=dict)
    tokenizer: str | None = None
    max_length: int = 128
    test_max_length: int | None = None
    train_split: str = "train"
    test_split: str = "validation"
    max_train_examples: int | None = None
    max_test_examples: int | None = None
    partition: dict = dataclasses.field(default_factory=lambda: {"scheme": "iid"})
    cache_dir: str | None = None
    eos_token: str | None = None
    packing: str | None = "auto"
    # synthetic task
    vocab_size: int = 128
    seq_len: int = 16
    num_labels: int = 2
    examples_per_client: list = dataclasses.field(default_factory=lambda: [64, 128])
    label_skew_alpha: float = 0.5
    signal_tokens: int = 3
    test_examples: int = 512


@dataclasses.dataclass
class FederationConfig:
    """Rounds, cohorts and local training.

    ``clients_per_round`` is a count (whole number >= 1), a fraction of ``data.num_clients``
    (0 < f < 1), or null for every client.
    ``clients_per_chunk`` bounds memory: the cohort is mapped in chunks of that many vmapped
    clients (null = all at once); with a streaming method and ``eval.local: false`` each chunk's
    uploads are reduced as it finishes, so the round's memory follows the chunk, not the cohort
    (docs/scale.md). ``auto`` (the default): all at once on accelerators; on a CPU, chunks of
    about 2,048 tokens per local step (:func:`fedlora_jax.run.plan.clients_per_chunk`).
    ``devices``: devices the cohort's client axis is sharded over (null = all of them, of every process);
    a cohort that does not divide by it is padded with empty slots.
    ``cpu_devices``: on a CPU, how many devices JAX splits the host's cores into, so that the mesh
    trains shares of the cohort side by side (null: JAX's own count, one device unless set
    elsewhere). ``auto`` (the default): one per
    core, or fewer when that gives the same share per device, within a quarter of host memory for
    their copies of the base and the rows (:func:`fedlora_jax.run.plan.cpu_device_count`). JAX fixes
    its device count when it starts, so this applies when building the experiment is the first
    thing in the process to use JAX (``fedlora-jax run``, ``resume``, ``compare``, the benchmarks);
    afterwards ``auto`` keeps the devices there are and a number must equal them.
    ``client_weights``: each client's weight w_u in the aggregate and in the ideal update
    M = sum_u w_u B_u A_u that divergence and the exact methods refer to. ``examples``: w_u = n_u / sum_v n_v
    (FedAvg's data-size weights); ``uniform``: w_u = 1 / K, the unweighted sum_u B_u A_u of FLoRA-NA
    (Nguyen et al., 2025), divided by K so that it stays a mean.
    """

    rounds: int = 20
    clients_per_round: float | None = None
    local_steps: int = 5
    batch_size: int = 16
    clients_per_chunk: int | str | None = "auto"
    devices: int | None = None
    cpu_devices: int | str | None = "auto"
    client_weights: str = "examples"
    method: str = "fedit"
    method_options: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class OptimConfig:
    """Local optimiser (fresh state each round). ``schedule`` runs over the global step
    round * local_steps + step."""

    name: str = "adamw"
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    schedule: str = "constant"
    warmup_steps: int = 0
    grad_clip_norm: float | None = None


@dataclasses.dataclass
class PrivacyConfig:
    """Differential privacy (see docs/privacy.md for the threat models).

    Record-level (``record_level: true``): DP-SGD on every client: per-example clipping to
    ``clip_norm``, Gaussian noise ``noise_multiplier`` (or calibrated before round 1 from
    ``target_epsilon`` for the worst-case client), Poisson sampling with expected batch
    ``federation.batch_size`` (``sampling: shuffle`` uses fixed-size batches, an approximation
    for accounting). ``epsilon`` (max over clients) is logged every round; with a
    ``target_epsilon`` the run stops before a round that would exceed it.

    User-level (``user_level: true``): DP-FedAvg: each client's upload is clipped to
    ``user_clip_norm`` and Gaussian noise ``user_noise_multiplier`` (or calibrated from
    ``user_target_epsilon``) is added once at the server; logged as ``user_epsilon``. Cohorts are
    ``client_sampling: fixed`` (exactly ``federation.clients_per_round`` clients, accounted under
    replace-one neighbours, RDP only) or ``poisson`` (each client with probability K / U in a
    static buffer of slots, add-or-remove-one neighbours).

    ``overflow_probability`` sizes every Poisson buffer (DP-SGD batches, Poisson cohorts): the
    chance that one draw holds more than its slots. Overflows are counted and their probability
    is added to the logged ``delta`` / ``user_delta``.
    """

    record_level: bool = False
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    clip_norm: float = 1.0
    per_layer_clipping: bool = False
    sampling: str = "poisson"
    user_level: bool = False
    user_clip_norm: float = 1.0
    user_noise_multiplier: float | None = None
    user_target_epsilon: float | None = None
    client_sampling: str = "fixed"
    overflow_probability: float = 1e-12
    delta: float = 1e-5
    accountant: str = "rdp"


@dataclasses.dataclass
class EvalConfig:
    """Evaluation every ``every`` rounds (and after the last): the global model on the global test
    set, and (``local``) each cohort client's trained model on at most ``local_max_examples``
    rows of its local test split (a fixed random subset; null for all). Causal LM with prompts
    (GSM8K): ``generate_examples`` > 0 also scores greedy generations (KV cache, jitted) of that
    many global-test prompts by exact match of the final number, logged as
    ``global_exact_match``."""

    every: int = 5
    batch_size: int = 64
    local: bool = True
    local_max_examples: int | None = 256
    generate_examples: int = 0
    max_new_tokens: int = 256
    max_prompt_length: int = 256


@dataclasses.dataclass
class CheckpointConfig:
    """Checkpoints in ``RUN_DIR/checkpoints/`` every ``every`` rounds (null: only at the end) and
    at the end of a run; the newest ``keep`` are kept. ``fedlora-jax resume RUN_DIR`` continues
    from the newest one."""

    every: int | None = 10
    keep: int = 2


@dataclasses.dataclass
class Config:
    seed: int = 0
    name: str = "run"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    federation: FederationConfig = dataclasses.field(default_factory=FederationConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    privacy: PrivacyConfig = dataclasses.field(default_factory=PrivacyConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp, key: str) -> Any:
    """Checks ``value`` against the annotation ``tp``; ints widen to floats, numeric strings
    ('1e-3', which YAML reads as a string) parse as floats."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp in (list, dict):
        if isinstance(value, tp):
            return value
    else:
        return value
    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")


def _build(cls, raw: dict, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or 'root'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"unknown config key '{prefix}{key}'")
    kwargs = {}
    for name in fields:
        if name not in raw:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, raw[name] or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(raw[name], tp, prefix + name)
    return cls(**kwargs)


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = raw
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{dotted}': '{k}' is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """Parses ``key=value`` strings; values are read as YAML (numbers, lists, null...)."""
    out = []
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        out.append((key.strip(), value))
    return out


def load_config(source: str | Path | dict | None = None, overrides: list[str] | None = None) -> Config:
    """Reads a YAML file (or a dict), applies overrides, type-checks and validates."""
    if source is None:
        raw: dict = {}
    elif isinstance(source, dict):
        raw = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy
    for key, value in parse_overrides(overrides or []):
        _set_dotted(raw, key, value)
    config = _build(Config, raw, "")
    validate(config)
    return config


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(c: Config) -> None:
    """Value checks that types alone do not catch."""
    _require(c.lora.rank > 0, f"config key 'lora.rank' must be > 0, got {c.lora.rank}")
    _require(c.lora.alpha > 0, f"config key 'lora.alpha' must be > 0, got {c.lora.alpha}")
    _require(c.data.num_clients >= 1, f"config key 'data.num_clients' must be >= 1, got {c.data.num_clients}")
    _require(c.checkpoint.every is None or c.checkpoint.every >= 1,
             f"config key 'checkpoint.every' must be >= 1 or null, got {c.checkpoint.every}")
    _require(c.checkpoint.keep >= 1, f"config key 'checkpoint.keep' must be >= 1, got {c.checkpoint.keep}")
    _require(c.data.max_length >= 1, f"config key 'data.max_length' must be >= 1, got {c.data.max_length}")
    _require(c.data.test_max_length is None or c.data.test_max_length >= 1,
             f"config key 'data.test_max_length' must be >= 1 or null, got {c.data.test_max_length}")
    _require(c.data.packing in ("auto", None), f"config key 'data.packing' must be auto or null, got {c.data.packing!r}")
    _require(0 <= c.data.local_test_fraction < 1,
             f"config key 'data.local_test_fraction' must be in [0, 1), got {c.data.local_test_fraction}")
    f = c.federation
    _require(f.rounds >= 1, f"config key 'federation.rounds' must be >= 1, got {f.rounds}")
    _require(f.local_steps >= 1, f"config key 'federation.local_steps' must be >= 1, got {f.local_steps}")
    _require(f.batch_size >= 1, f"config key 'federation.batch_size' must be >= 1, got {f.batch_size}")
    k = f.clients_per_round
    if k is not None:
        _require(k > 0 and (k < 1 or float(k).is_integer()),
                 f"config key 'federation.clients_per_round' must be a whole count >= 1 or a fraction in (0, 1), got {k}")
        _require(cohort_size(c) <= c.data.num_clients,
                 f"config key 'federation.clients_per_round' ({k:g}) exceeds data.num_clients ({c.data.num_clients})")
    _require(f.devices is None or (isinstance(f.devices, int) and f.devices >= 1),
             f"config key 'federation.devices' must be an int >= 1 or null, got {f.devices!r}")
    _require(f.client_weights in ("examples", "uniform"),
             f"config key 'federation.client_weights' must be examples or uniform, got {f.client_weights!r}")
    _require(f.clients_per_chunk is None or f.clients_per_chunk == "auto"
             or (isinstance(f.clients_per_chunk, int) and f.clients_per_chunk >= 1),
             f"config key 'federation.clients_per_chunk' must be an int >= 1, auto or null, got {f.clients_per_chunk!r}")
    _require(f.cpu_devices is None or f.cpu_devices == "auto" or (isinstance(f.cpu_devices, int) and f.cpu_devices >= 1),
             f"config key 'federation.cpu_devices' must be an int >= 1, auto or null, got {f.cpu_devices!r}")
    _require(c.optim.name in ("sgd", "adam", "adamw"), f"config key 'optim.name' must be sgd, adam or adamw, got {c.optim.name!r}")
    _require(c.optim.learning_rate > 0, f"config key 'optim.learning_rate' must be > 0, got {c.optim.learning_rate}")
    _require(c.optim.schedule in ("constant", "cosine", "linear"),
             f"config key 'optim.schedule' must be constant, cosine or linear, got {c.optim.schedule!r}")
    _require(c.eval.every >= 1, f"config key 'eval.every' must be >= 1, got {c.eval.every}")
    _require(c.eval.local_max_examples is None or c.eval.local_max_examples >= 1,
             f"config key 'eval.local_max_examples' must be >= 1 or null, got {c.eval.local_max_examples}")
    _require(c.eval.generate_examples >= 0, f"config key 'eval.generate_examples' must be >= 0, got {c.eval.generate_examples}")
    _require(c.eval.max_new_tokens >= 1 and c.eval.max_prompt_length >= 1,
             "config keys 'eval.max_new_tokens' and 'eval.max_prompt_length' must be >= 1")
    _require(c.eval.batch_size >= 1, f"config key 'eval.batch_size' must be >= 1, got {c.eval.batch_size}")
    _require(c.model.pooling in ("cls", "mean"), f"config key 'model.pooling' must be cls or mean, got {c.model.pooling!r}")
    _require(c.model.dtype in ("float32", "bfloat16"), f"config key 'model.dtype' must be float32 or bfloat16, got {c.model.dtype!r}")
    p = c.privacy
    _require(p.sampling in ("poisson", "shuffle"), f"config key 'privacy.sampling' must be poisson or shuffle, got {p.sampling!r}")
    _require(p.accountant in ("rdp", "pld"), f"config key 'privacy.accountant' must be rdp or pld, got {p.accountant!r}")
    _require(0 < p.delta < 1, f"config key 'privacy.delta' must be in (0, 1), got {p.delta}")
    _require(p.client_sampling in ("fixed", "poisson"),
             f"config key 'privacy.client_sampling' must be fixed or poisson, got {p.client_sampling!r}")
    _require(p.client_sampling == "fixed" or p.user_level,
             "config key 'privacy.client_sampling=poisson' samples cohorts for user-level DP; it needs privacy.user_level=true")
    _require(not (p.user_level and p.client_sampling == "fixed" and p.accountant == "pld"),
             "privacy.accountant=pld cannot account fixed-size cohorts (user-level DP); use privacy.accountant=rdp "
             "or privacy.client_sampling=poisson")
    _require(0 < p.overflow_probability < 1,
             f"config key 'privacy.overflow_probability' must be in (0, 1), got {p.overflow_probability}")
    for level, sigma, target, clip in (("", p.noise_multiplier, p.target_epsilon, p.clip_norm),
                                       ("user_", p.user_noise_multiplier, p.user_target_epsilon, p.user_clip_norm)):
        enabled = p.user_level if level else p.record_level
        _require(clip > 0, f"config key 'privacy.{level}clip_norm' must be > 0, got {clip}")
        _require(sigma is None or sigma >= 0, f"config key 'privacy.{level}noise_multiplier' must be >= 0, got {sigma}")
        _require(target is None or target > 0, f"config key 'privacy.{level}target_epsilon' must be > 0, got {target}")
        _require(not enabled or sigma is not None or target is not None,
                 f"privacy.{level.rstrip('_') or 'record'}_level needs privacy.{level}noise_multiplier or privacy.{level}target_epsilon")
    lo_hi = c.data.examples_per_client
    _require(len(lo_hi) == 2 and all(isinstance(v, int) and v >= 1 for v in lo_hi) and lo_hi[0] <= lo_hi[1],
             f"config key 'data.examples_per_client' must be [min, max] with 1 <= min <= max, got {lo_hi}")


def cohort_size(c: Config) -> int:
    """Clients sampled per round."""
    k = c.federation.clients_per_round
    if k is None:
        return c.data.num_clients
    return max(1, round(k * c.data.num_clients)) if k < 1 else int(k)
