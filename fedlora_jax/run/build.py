"""Building a run from its config: data, model (LoRA injected, split), plan, local trainer,
federation and evaluator. Everything that can fail on bad input fails here, before the run
directory is written."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedlora_jax import models
from fedlora_jax.aggregation.compression import Compression
from fedlora_jax.config import Config, ConfigError, ModelConfig, cohort_size
from fedlora_jax.data.base import FederatedData
from fedlora_jax.data.sources import SOURCES, load_federated
from fedlora_jax.data.synthetic import make_synthetic
from fedlora_jax.engine import BaseFolding, ClientSteps, Cohort, Federation, LocalTrainer, RecordDP, UserDP
from fedlora_jax.eval.evaluate import Evaluator
from fedlora_jax.eval.evaluation import Evaluation
from fedlora_jax.hf import load_adapter
from fedlora_jax.methods import make_method
from fedlora_jax.methods.server_optimizers import make_server_optimizer
from fedlora_jax.models import model_config_from_pretrained
from fedlora_jax.models.lora import LoRAConfig, float32_trainable, inject_lora, split_model
from fedlora_jax.models.quantize import quantize_base
from fedlora_jax.models.remat import set_remat
from fedlora_jax.params import leaf_names, trainable_layout
from fedlora_jax.privacy.bookkeeping import unsupported_leaves
from fedlora_jax.privacy.ledger import PrivacyLedger
from fedlora_jax.tasks import task_kind
from fedlora_jax.run.memory import planned_chunk
from fedlora_jax.run.plan import Plan, check_cohort_fits, make_plan, memory_available, split_cpu_cores


@dataclasses.dataclass
class Experiment:
    """Everything a run needs, built and validated from a config."""

    config: Config
    data: FederatedData
    graphdef: Any
    params: Any
    frozen: Any
    federation: Federation
    evaluator: Evaluator
    lora_modules: list[str]
    ledger: PrivacyLedger
    plan: Plan

    def evaluation(self) -> Evaluation:
        """The run's evaluation, its test batches prepared (on the federation's mesh)."""
        mesh = self.federation.mesh if self.federation.devices > 1 else None
        return Evaluation(self.evaluator, self.data, self.config.eval, self.config.seed, mesh)


def build_data(config: Config) -> FederatedData:
    d = config.data
    if d.source == "synthetic":
        if d.partition != {"scheme": "iid"}:
            raise ConfigError(
                "config key 'data.partition' does not apply to data.source=synthetic, which draws its "
                "own split (data.examples_per_client, data.label_skew_alpha); remove it or use a real source"
            )
        return make_synthetic(
            num_clients=d.num_clients, examples_per_client=tuple(d.examples_per_client), vocab_size=d.vocab_size,
            seq_len=d.seq_len, num_labels=d.num_labels, label_skew_alpha=d.label_skew_alpha,
            signal_tokens=d.signal_tokens, test_examples=d.test_examples,
            local_test_fraction=d.local_test_fraction, seed=config.seed)
    if d.source not in SOURCES:
        raise ConfigError(f"config key 'data.source': unknown source {d.source!r} (known: {', '.join(SOURCES)})")
    tokenizer = d.tokenizer or config.model.pretrained
    if not tokenizer:
        raise ConfigError("config key 'data.tokenizer' is needed when model.pretrained is not set")
    return load_federated(d, tokenizer, config.seed)


def model_type_of(model: ModelConfig) -> str:
    """The transformers model_type of a config's model: its checkpoint's, else ``model.arch``."""
    return model_config_from_pretrained(model.pretrained)["model_type"] if model.pretrained else model.arch


def lora_config(config: Config) -> LoRAConfig:
    c = config.lora
    return LoRAConfig(rank=c.rank, alpha=c.alpha, targets=tuple(c.targets) if c.targets else None, rslora=c.rslora)


def build_model(config: Config, data: FederatedData, quantize: bool = True):
    """The model with LoRA injected (the base in ``model.dtype``, the trainable state in float32,
    layers rematerialised as ``model.remat`` says), its frozen base quantized as ``model.quantize``
    says (unless ``quantize`` is False: the float base it would quantize); returns (model, adapted
    module paths)."""
    m = config.model
    dtype = jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32
    num_labels = task_kind(data.task).outputs(data.num_labels)
    kwargs = {"pooling": m.pooling} if data.task != "causal_lm" else {}
    if m.pretrained:
        model = models.load_pretrained(m.pretrained, task=data.task, num_labels=num_labels, dtype=dtype,
                                       seed=config.seed, **kwargs)
    else:
        model = models.create_model(m.arch, dict(m.config), task=data.task, num_labels=num_labels,
                                    seed=config.seed, dtype=dtype, **kwargs)
    adapted = inject_lora(model, lora_config(config), jax.random.key(config.seed + 1))
    float32_trainable(model)
    set_remat(model, m.remat)
    if quantize and m.quantize:
        quantize_base(model, m.quantize)
    return model, adapted


def make_optimizer(cfg) -> optax.GradientTransformation:
    """The optimiser's update direction, without the learning rate (applied per step by
    :func:`local_update` from the schedule), so p <- p - lr(t) * direction."""
    parts = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm else []
    if cfg.name == "sgd":
        parts.append(optax.trace(decay=cfg.momentum) if cfg.momentum else optax.identity())
    else:
        parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
    if cfg.weight_decay and cfg.name in ("adamw", "sgd"):
        parts.append(optax.add_decayed_weights(cfg.weight_decay))
    return optax.chain(*parts)


def make_schedule(cfg, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the global step round * local_steps + step."""
    peak, warmup = cfg.learning_rate, cfg.warmup_steps
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "constant":
        main = optax.constant_schedule(peak)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(peak, decay_steps)
    else:
        main = optax.linear_schedule(peak, 0.0, decay_steps)
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def build_experiment(config: Config, data: FederatedData | None = None) -> Experiment:
    """Builds data, model, plan, local trainer and federation; raises on bad input, writes nothing."""
    data = data if data is not None else build_data(config)
    if config.eval.generate_examples and data.generation is None:
        raise ConfigError("config key 'eval.generate_examples' needs a data source with prompts (gsm8k)")
    if data.num_clients != config.data.num_clients:
        raise ConfigError(f"data has {data.num_clients} clients but data.num_clients is {config.data.num_clients}")
    split_cpu_cores(config, data)  # before the model starts JAX
    model, adapted = build_model(config, data)
    graphdef, params, frozen = split_model(model)
    if config.model.adapter:
        params = load_adapter(config.model.adapter, params, model_type_of(config.model), data.task, lora_config(config),
                              config.model.pooling)
    f, p = config.federation, config.privacy
    stragglers = client_steps(config)
    steps = (None if stragglers is None else
             np.where(np.asarray(stragglers.stragglers(data.num_clients)), stragglers.steps, f.local_steps))
    ledger = PrivacyLedger.create(p, data.num_train, f.batch_size, f.local_steps, f.rounds, cohort_size(config), steps)
    record_dp = None
    if p.record_level:
        record_dp = RecordDP(p.clip_norm, ledger.noise_multiplier, p.per_layer_clipping, p.sampling == "poisson",
                             ledger.record_buffer)
    routable = not unsupported_leaves(graphdef, params, frozen)  # every trainable leaf in a LoRA layer or linear head
    scores_from_hidden = getattr(model, "output_weight", lambda: None)() is not None
    plan = make_plan(config, data, record_dp, routable, getattr(model, "aligned_packing", False), scores_from_hidden)
    trainer = LocalTrainer(
        graphdef,
        data.task,
        make_optimizer(config.optim),
        make_schedule(config.optim, f.rounds * f.local_steps),
        f.local_steps,
        f.batch_size,
        dp=record_dp,
        streams=plan.streams,
        bookkeeping=plan.bookkeeping,
        max_examples=int(data.num_train.max()),
    )
    federation = build_federation(config, data, trainer, params, frozen, ledger, plan)
    if f.clients_per_chunk == "auto" and jax.default_backend() != "cpu":  # planned from the compiled round
        chunk = planned_chunk(federation, params, frozen, data, plan.share,
                              int(f.memory_fraction * memory_available()), config.model.remat)
        federation = dataclasses.replace(federation, clients_per_chunk=chunk)
        plan = dataclasses.replace(plan, clients_per_chunk=chunk)
    check_cohort_fits(federation, params)
    evaluator = Evaluator(graphdef, data.task, config.eval.batch_size, plan.eval_tokens, plan.local_eval_tokens)
    return Experiment(config, data, graphdef, params, frozen, federation, evaluator, adapted, ledger, plan)


def build_federation(config: Config, data: FederatedData, trainer: LocalTrainer, params, frozen,
                     ledger: PrivacyLedger, plan: Plan) -> Federation:
    """The federation of ``config``: its method, cohort, user-level DP, server optimiser and layout."""
    f, p = config.federation, config.privacy
    method = make_method(f.method, f.method_options, lora_rank=config.lora.rank)
    if config.model.quantize and method.modifies_base:
        raise ConfigError(f"config key 'model.quantize' ({config.model.quantize}) keeps the base frozen and quantized, "
                          f"but method {method.name!r} folds its updates into the base; set model.quantize: null "
                          f"or use a method that leaves the base alone")
    if f.model_devices > 1 and jax.process_count() > 1 and method.modifies_base:
        raise ConfigError(f"config key 'federation.model_devices' is {f.model_devices}, but method {method.name!r} "
                          "rewrites the frozen base, which a multi-process run cannot checkpoint while it is split "
                          "over devices; set it to 1 or run in one process")
    layout = trainable_layout(params)
    frozen_index = {name: i for i, name in enumerate(leaf_names(frozen))}
    kernels = tuple(frozen_index[m.name + ".kernel"] for m in layout.modules) if method.modifies_base else ()
    folding = BaseFolding(kernels, lora_config(config).scaling)
    poisson_cohorts = p.user_level and p.client_sampling == "poisson"
    cohort = Cohort(ledger.cohort_slots, data.num_clients,
                    cohort_size(config) / data.num_clients if poisson_cohorts else None,
                    uniform_weights=f.client_weights == "uniform")
    user_dp = UserDP(p.user_clip_norm, ledger.user_noise_multiplier) if p.user_level else None
    server_optimizer = None
    if f.server_optimizer is not None:
        if not method.mean_based:
            raise ConfigError(f"config key 'federation.server_optimizer' needs a method whose aggregate is the mean "
                              f"of the uploads (fedit, ffa, rolora), not {method.name!r}")
        server_optimizer = make_server_optimizer(**f.server_optimizer.model_dump())
    return Federation(trainer, method, layout, cohort, plan.clients_per_chunk, user_dp, folding,
                      keep_client_params=config.eval.local, devices=plan.devices, model_devices=plan.model_devices,
                      server_optimizer=server_optimizer,
                      compression=upload_compression(config, params, data.num_clients),
                      error_feedback=f.compression is not None and f.compression.error_feedback, dropout=f.dropout,
                      client_steps=client_steps(config))


def client_steps(config: Config) -> ClientSteps | None:
    """The stragglers of ``config`` (drawn from its seed), or None."""
    c = config.federation.client_steps
    return None if c is None else ClientSteps(c.fraction, c.steps, config.seed)


def upload_compression(config: Config, params, num_clients: int) -> Compression | None:
    """The upload compression of ``config`` (None: float32 uploads). Error feedback keeps a float32
    residual of the trainable state for every client: refused when those take more than a quarter
    of the memory available."""
    c = config.federation.compression
    if c is None:
        return None
    if c.error_feedback:
        need = num_clients * 4 * sum(int(x.size) for x in jax.tree.leaves(params))
        if need > memory_available() // 4:
            raise ConfigError(f"config key 'federation.compression.error_feedback': the residuals of {num_clients} "
                              f"clients take {need / 2**30:.1f} GiB, more than a quarter of the "
                              f"{memory_available() / 2**30:.1f} GiB available; turn it off or use fewer clients")
    return Compression(c.kind, c.bits, c.block, c.fraction)
