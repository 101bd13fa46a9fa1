"""The ``federation`` section of the run configuration: rounds, cohorts, local training, the
method, the server optimiser, upload compression, drop-outs and stragglers (see :mod:`.schema`)."""

from pydantic import model_validator

from fedlora_jax.config.types import (
    ClientsPerRound,
    Count,
    CountOrAuto,
    Decay,
    OptionalCount,
    Positive,
    Section,
    _rule_broken,
    bounded,
    one_of,
)


def _reject_other_choices_options(section: Section, key: str, choice: str, owners: dict[str, tuple[str, ...]]):
    """Raises the one-line rule error when an option that belongs to other choices than ``choice``
    (``owners``: option -> the choices it applies to) is away from its default in section
    ``federation.<key>``."""
    changed = [k for k, own in owners.items()
               if choice not in own and getattr(section, k) != type(section).model_fields[k].default]
    if changed:
        raise _rule_broken(f"config key 'federation.{key}.{changed[0]}' applies to "
                           f"{' and '.join(owners[changed[0]])} only, not to {choice}")


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
        adaptive = ("adam", "yogi")
        _reject_other_choices_options(self, "server_optimizer", self.name, {
            "momentum": ("sgd",), "b1": adaptive, "b2": adaptive, "eps": adaptive})
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
        _reject_other_choices_options(self, "compression", self.kind, {
            "bits": ("quantize",), "block": ("quantize",), "fraction": ("topk", "randk")})
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
