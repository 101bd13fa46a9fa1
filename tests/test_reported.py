"""Every reported number against an independent computation (issue 12).

Small runs go through the real loop (:func:`fedlora_jax.run.run`, writing a run directory);
a spy around the compiled round keeps each round's input state, output state and RoundOutput.
What the run reports (metrics.jsonl, divergence.jsonl) is then recomputed here in numpy,
without the engine's scoring, aggregation or byte-accounting helpers:

* global/local loss and accuracy from logits of an unpacked forward pass on padded rows (only
  the real rows scored), each cohort client with its own trained parameters on its local test
  subset; ``local_global_gap``;
* each module's divergence as a dense float64 ||B_hat A_hat - M||_F / ||M||_F;
* bytes up/down of every method from the shapes, by hand;
* causal LM: loss and token accuracy on exactly the answer tokens (the model's output at
  position t - 1 scored on token t for every t with ``loss_mask[t] = 1``).
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any, NamedTuple

import jax
import numpy as np
import pytest
from flax import nnx

from fedlora_jax.engine import Federation
from fedlora_jax.run import Experiment, build_experiment, run
from fedlora_jax.config import load_config
from fedlora_jax.data.base import federate
from tiny import TINY, tiny_config

ROUNDS = 2
F32 = 4  # bytes per float32 value
RTOL = 1e-5  # float32 quantities


@pytest.fixture(scope="module", autouse=True)
def quick_compiles():
    """Compile time dominates these tiny runs; XLA's optimisation passes do not change what is
    checked (every comparison is against numpy, with float32 tolerances)."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


# ---------------------------------------------------------------------------------------- runs


class RoundRecord(NamedTuple):
    """Host copies of one round: the state it started from, the state it produced, its output."""

    params_before: Any
    frozen_before: Any
    params_after: Any
    frozen_after: Any
    divergence: np.ndarray  # [num_modules]
    cohort: np.ndarray  # [K]
    taking_part: np.ndarray  # [K] bool
    client_params: Any  # leaves [K, ...]


class Recorded(NamedTuple):
    exp: Experiment
    metrics: list[dict]  # metrics.jsonl
    divergence: list[dict]  # divergence.jsonl
    rounds: list[RoundRecord]


class _SpyRound:
    """Stands in for ``Federation.compile_round()``'s jitted round: ``lower(...).compile()`` gives
    the real compiled round, wrapped to record every call."""

    def __init__(self, jitted, log: list):
        self.jitted, self.log = jitted, log

    def lower(self, state, shards):
        lowered, log = self.jitted.lower(state, shards), self.log

        class Lowered:
            @staticmethod
            def compile():
                compiled = lowered.compile()

                def call(state, shards):
                    before = jax.device_get((state.params, state.frozen))  # before the buffers are donated
                    new_state, out = compiled(state, shards)
                    after = jax.device_get((new_state.params, new_state.frozen))
                    cohort = np.asarray(out.cohort)
                    taking_part = np.asarray(getattr(out, "cohort_mask", np.ones(len(cohort), bool)))
                    log.append(RoundRecord(*before, *after, np.asarray(out.divergence), cohort, taking_part,
                                           jax.device_get(out.client_params)))
                    return new_state, out

                return call

        return Lowered()


class _NoEvaluation:
    """Replaces the run's ``Evaluation`` in runs checked only for divergence and bytes (saves
    compiling the evaluators)."""

    def __init__(self, exp):
        pass

    def metrics(self, *args):
        return {}


def run_recorded(config, out_dir, data=None, evaluate=True) -> Recorded:
    exp = build_experiment(config, data)
    log: list[RoundRecord] = []
    compile_round = Federation.compile_round
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Federation, "compile_round",
                      lambda self, **options: _SpyRound(compile_round(self, **options), log))
        if not evaluate:
            patch.setattr(Experiment, "evaluation", lambda exp: _NoEvaluation(exp))
        run(config, out_dir=out_dir, progress=False, experiment=exp)
    read = lambda name: [json.loads(line) for line in (out_dir / name).read_text().splitlines()]
    recorded = Recorded(exp, read("metrics.jsonl"), read("divergence.jsonl"), log)
    assert len(recorded.metrics) == len(recorded.divergence) == len(log) == ROUNDS
    assert all(rnd.taking_part.all() for rnd in log)  # fixed cohorts: every slot holds a client that trained
    return recorded


# name -> (method, overrides). All BERT runs: hidden 32, 1 layer, LoRA rank 4 on query and value,
# 6 clients, cohort 5, 2 rounds.
RUNS = {
    # metrics on packed evaluation batches (the default), local test subsets of at most 3 rows;
    # clients trained one chunk at a time (no shared packed training streams: a much shorter compile)
    "fedit": ("fedit", {"data.packing": "auto", "federation.clients_per_chunk": 1, "eval.local": True,
                        "eval.local_max_examples": 3}),
    # metrics on padded evaluation batches; FedSA clients are scored with their own B
    "fedsa": ("fedsa", {"eval.local": True, "eval.local_max_examples": 3, "eval.batch_size": 24}),
    "ffa": ("ffa", {}),
    "fra": ("fra", {}),
    "flora_na": ("flora_na", {}),
    "fedex": ("fedex", {}),
    # metrics: a larger step so the base update matters well above float32 rounding
    "flora": ("flora", {"eval.local": True, "eval.local_max_examples": 3, "optim.learning_rate": 0.1}),
    "rolora": ("rolora", {}),
    # round 0 is the last FRA round (A still travels), round 1 the first FFA round
    "fra_then_ffa": ("fra_then_ffa", {"federation.method_options.switch_round": 1}),
    "fedit_record_dp": ("fedit", {"privacy.record_level": True, "privacy.noise_multiplier": 1.0}),
    "fedit_user_dp": ("fedit", {"privacy.user_level": True, "privacy.user_noise_multiplier": 0.5,
                                "privacy.user_clip_norm": 0.05}),
}


EVALUATED = ("fedit", "fedsa", "flora")  # the runs whose metrics are checked


def bert_config(name):
    method, overrides = RUNS[name]
    base = {"federation.rounds": ROUNDS, "federation.local_steps": 1, "federation.method": method,
            "data.packing": "null", "eval.local": False}
    return tiny_config(**{**base, **overrides})


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """name -> Recorded, each run once per module (on first use)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = run_recorded(bert_config(name), tmp_path_factory.mktemp(name), evaluate=name in EVALUATED)
        return cache[name]

    return get


# ------------------------------------------------------------------------------ numpy helpers


def flat(tree) -> dict[str, np.ndarray]:
    """Leaves of a params/frozen state by dotted path ('bert.layers.0.attention.query.lora_a')."""
    return {".".join(str(p) for p in path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(tree)}


def client(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


PAD_ROWS = 64  # every forward pass here runs on this many rows: one compile per model


@functools.lru_cache(maxsize=None)
def _plain_forward(graphdef):
    return jax.jit(lambda params, frozen, ids, mask: nnx.merge(graphdef, params, frozen)(ids, mask))


def logits_of(exp, params, frozen, rows: dict) -> np.ndarray:
    """The model's logits on padded rows (one plain forward pass, no packing), as float64.

    The rows are topped up to PAD_ROWS with rows of token 0 whose logits are dropped (rows do not
    interact), so a single compiled forward pass serves every call.
    """
    assert "token_type_ids" not in rows  # the synthetic and causal-LM data have none
    n = len(rows["input_ids"])
    assert n <= PAD_ROWS
    top_up = lambda x, fill: np.concatenate([x, np.full((PAD_ROWS - n,) + x.shape[1:], fill, x.dtype)])
    out = _plain_forward(exp.graphdef)(params, frozen, top_up(rows["input_ids"], 0), top_up(rows["attention_mask"], 1))
    return np.asarray(out, np.float64)[:n]


def log_softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def classification_scores(logits, labels):
    """Per-row cross-entropy and correctness; also the smallest top-1 margin (argmax robustness)."""
    ce = -np.take_along_axis(log_softmax(logits), labels[:, None], axis=-1)[:, 0]
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return ce, logits.argmax(-1) == labels, float((top2[:, 1] - top2[:, 0]).min(initial=np.inf))


def local_rows(data, limit, seed):
    """Row indices of each client's local test subset: all rows, or ``limit`` of them drawn
    without replacement by ``np.random.default_rng(seed)``, client after client, kept in order
    (the subset the engine documents in ``fedlora_jax.eval.evaluation.local_subsets``)."""
    rng = np.random.default_rng(seed)
    out = []
    for n in np.asarray(data.num_local_test):
        n = int(n)
        keep = n if limit is None else min(n, limit)
        out.append(np.sort(rng.choice(n, size=keep, replace=False)) if n else np.zeros(0, np.int64))
    return out


def rows_of(arrays, u, index, counts):
    """Rows ``index`` of client u in arrays stored client after client with ``counts`` [U]."""
    start = int(np.sum(np.asarray(counts)[:u]))
    return {k: v[start + np.asarray(index, np.int64)] for k, v in arrays.items()}


def assert_close(reported, expected, rtol=RTOL, atol=0.0, what=""):
    np.testing.assert_allclose(reported, expected, rtol=rtol, atol=atol, err_msg=what)


# ------------------------------------------------------------------- 1. accuracy and loss


@pytest.mark.parametrize("name", [
    "fedit",
    "fedsa",
    "flora",  # the base moves in the round: clients are scored on the base they trained on
])
def test_global_and_local_metrics_match_numpy(recorded, name):
    rec = recorded(name)
    exp, cfg = rec.exp, rec.exp.config
    data = exp.data
    subsets = local_rows(data, cfg.eval.local_max_examples, cfg.seed)
    for r, (rnd, reported) in enumerate(zip(rec.rounds, rec.metrics)):
        # global: the aggregated model on every global test row
        ce, correct, margin = classification_scores(
            logits_of(exp, rnd.params_after, rnd.frozen_after, data.global_test), data.global_test["labels"])
        assert margin > 1e-4, "a near-tie would make argmax depend on rounding"
        global_accuracy = correct.mean()
        assert_close(reported["global_loss"], ce.mean(), what=f"round {r + 1} global_loss")
        assert_close(reported["global_accuracy"], global_accuracy, what=f"round {r + 1} global_accuracy")
        # local: each cohort client with its own trained params (on the base it trained on), its
        # own local test subset; pooled over the cohort's rows (= the example-weighted client mean)
        losses, hits = [], []
        for i, u in enumerate(rnd.cohort):
            rows = rows_of(data.local_test, u, subsets[u], data.num_local_test)
            if not len(subsets[u]):
                continue
            ce, correct, margin = classification_scores(
                logits_of(exp, client(rnd.client_params, i), rnd.frozen_before, rows), rows["labels"])
            assert margin > 1e-4
            losses.append(ce)
            hits.append(correct)
        losses, hits = np.concatenate(losses), np.concatenate(hits)
        assert len(losses) < len(rnd.cohort) * cfg.eval.local_max_examples  # some clients' subsets are padded
        assert_close(reported["local_loss"], losses.mean(), what=f"round {r + 1} local_loss")
        assert_close(reported["local_accuracy"], hits.mean(), what=f"round {r + 1} local_accuracy")
        assert_close(reported["local_global_gap"], hits.mean() - global_accuracy, atol=1e-7)


# -------------------------------------------------------------------------------- 2. divergence


def dense_divergence(b, a, w, b_hat, a_hat):
    """||B_hat A_hat - M||_F / ||M||_F in float64, M = sum_k w_k B_k A_k (dense d_out x d_in)."""
    b, a, w = np.asarray(b, np.float64), np.asarray(a, np.float64), np.asarray(w, np.float64)
    ideal = np.einsum("k,kor,kri->oi", w, b, a)
    return np.linalg.norm(np.asarray(b_hat, np.float64) @ np.asarray(a_hat, np.float64) - ideal) / np.linalg.norm(ideal)


def test_the_runs_cover_every_method():
    from fedlora_jax.methods import method_names

    assert {method for method, _ in RUNS.values()} == set(method_names())


@pytest.mark.parametrize("name", list(RUNS))
def test_every_method_runs_from_a_config_and_logs_every_round(recorded, name):
    rec = recorded(name)
    assert [m["round"] for m in rec.metrics] == [d["round"] for d in rec.divergence] == list(range(1, ROUNDS + 1))
    assert all(np.isfinite(m["train_loss"]) and m["train_loss"] > 0 for m in rec.metrics)
    assert len(rec.rounds) == ROUNDS


@pytest.mark.parametrize("name", list(RUNS))
def test_divergence_matches_dense_numpy(recorded, name):
    rec = recorded(name)
    exp = rec.exp
    scaling = exp.config.lora.alpha / exp.config.lora.rank
    for r, (rnd, per_module, reported) in enumerate(zip(rec.rounds, rec.divergence, rec.metrics)):
        assert per_module["round"] == r + 1
        names = [k for k in per_module if k != "round"]
        assert len(names) == exp.config.model.config["num_hidden_layers"] * 2  # query and value
        counts = np.asarray(exp.data.num_train, np.float64)[rnd.cohort]
        # user-level DP-FedAvg averages uniformly; otherwise clients weigh by their example counts
        w = np.full(len(counts), 1 / len(counts)) if exp.config.privacy.user_level else counts / counts.sum()
        clients, after, before = flat(rnd.client_params), flat(rnd.params_after), flat(rnd.frozen_before)
        frozen_after = flat(rnd.frozen_after)
        values = []
        for module in names:
            b, a = clients[module + ".lora_b"], clients[module + ".lora_a"]
            b_hat, a_hat = after[module + ".lora_b"], after[module + ".lora_a"]
            what = f"round {r + 1} {module}"
            if exp.federation.method.modifies_base:
                # FedEx / FLoRA report 0: the base update makes the aggregate exact. Check that
                # (W_new - W_old)^T / scaling + B_hat A_hat is M up to float32 rounding (~1e-7 here;
                # without the base update FedEx would read like FedIT and FLoRA 1.0).
                assert per_module[module] == 0.0, what
                moved = (frozen_after[module + ".kernel"].astype(np.float64) - before[module + ".kernel"]).T / scaling
                ideal = np.einsum("k,kor,kri->oi", w, b.astype(np.float64), a)
                effective = moved + b_hat.astype(np.float64) @ a_hat
                assert np.linalg.norm(effective - ideal) / np.linalg.norm(ideal) < 1e-5, what
            else:
                expected = dense_divergence(b, a, w, b_hat, a_hat)
                assert_close(per_module[module], expected, atol=2e-6, what=what)
            values.append(per_module[module])
        np.testing.assert_allclose(np.asarray(rnd.divergence), values, rtol=0, atol=0)  # the file holds the output
        assert_close(reported["divergence"], np.mean(values), atol=1e-7, what=f"round {r + 1} mean divergence")


def test_divergence_is_informative(recorded):
    """The inexact averages really diverge and the exact ones do not, so the checks above can tell."""
    values = lambda name, r: [v for k, v in recorded(name).divergence[r].items() if k != "round"]
    # round 2: clients start from B != 0, so their A moves apart (in round 1, B = 0 leaves A's
    # gradient zero on the first step and every aggregate is exact)
    assert min(values("fedit", 1)) > 1e-3
    assert min(values("fra", 1)) > 1e-4  # rank-4 truncation of a rank-20 product
    for name in ("ffa", "rolora", "fra_then_ffa"):
        assert max(values(name, 1)) < 1e-5, name


# ------------------------------------------------------------------------------------ 3. bytes


def expected_bytes(name, round_index, cfg) -> tuple[int, int]:
    """(bytes_up, bytes_down) over the cohort, by hand from the model's shapes."""
    hidden, rank = cfg.model.config["hidden_size"], cfg.lora.rank
    modules = cfg.model.config["num_hidden_layers"] * 2  # LoRA on query and value, each hidden x hidden
    k = int(cfg.federation.clients_per_round)
    a = modules * rank * hidden * F32  # A [r, d_in] of every module
    b = modules * hidden * rank * F32  # B [d_out, r]
    head = (hidden * 2 + 2) * F32  # classifier kernel [hidden, 2] + bias [2]; always trained and sent
    base = modules * hidden * hidden * F32  # frozen kernels [d_in, d_out] of the adapted layers
    both = a + b + head
    method = RUNS[name][0]
    if method in ("fedit", "fra", "flora_na"):  # DP of either kind sends the same tensors
        return k * both, k * both
    if method == "ffa":
        return k * (b + head), k * (b + head)
    if method == "fedsa":  # B stays on the client
        return k * (a + head), k * (a + head)
    if method == "rolora":  # even rounds train and send B, odd rounds A
        sent = b if round_index % 2 == 0 else a
        return k * (sent + head), k * (sent + head)
    if method == "fra_then_ffa":  # switch_round 1: round 0 is FRA (its A goes down to be frozen), then FFA
        return (k * both, k * both) if round_index == 0 else (k * (b + head), k * (b + head))
    if method == "fedex":  # the updated base kernels go down too
        return k * both, k * (both + base)
    if method == "flora":  # every client downloads the stacked factors [d_out, K r] and [K r, d_in]
        return k * both, k * (k * (a + b) + head)
    raise AssertionError(name)


@pytest.mark.parametrize("name", list(RUNS))
def test_bytes_match_hand_count(recorded, name):
    rec = recorded(name)
    for r, reported in enumerate(rec.metrics):
        assert (reported["bytes_up"], reported["bytes_down"]) == expected_bytes(name, r, rec.exp.config), (
            f"round {r + 1}")


def test_hand_count_matches_the_tree(recorded):
    """The shapes the hand count assumes are the trainable tree's."""
    rec = recorded("fedit")
    exp, params = rec.exp, rec.rounds[0].params_before
    hidden, rank = 32, exp.config.lora.rank
    shapes = {k: v.shape for k, v in flat(params).items()}
    assert shapes == {"bert.layers.0.attention.query.lora_a": (rank, hidden),
                      "bert.layers.0.attention.query.lora_b": (hidden, rank),
                      "bert.layers.0.attention.value.lora_a": (rank, hidden),
                      "bert.layers.0.attention.value.lora_b": (hidden, rank),
                      "head.kernel": (hidden, 2), "head.bias": (2,)}
    assert all(v.dtype == np.float32 for v in flat(params).values())
    assert exp.config.model.config["hidden_size"] == hidden


# ------------------------------------------------------------------------- 4. causal-LM masks

VOCAB, LENGTH = 64, 12


def causal_lm_data(cfg, seed=0, num_clients=4, per_client=10, test=20):
    """Prompt + answer rows as ``tokenize_prompt_answer`` lays them out: right-padded (id 0),
    ``loss_mask`` 1 on the answer tokens only; prompts of 2-6 random tokens, answers of 1-4.

    In every other row the answer is the initial model's own greedy continuation of the prompt,
    so the model gets most of those tokens right (token accuracy neither 0 nor 1) and a mask off
    by one position (dropping the first answer token, scoring the padding after the last) changes
    the token accuracy as well as the loss.
    """
    rng = np.random.default_rng(seed)

    def rows(n):
        ids = np.zeros((n, LENGTH), np.int32)
        mask, loss = np.zeros_like(ids), np.zeros_like(ids)
        for i in range(n):
            prompt, answer = rng.integers(2, 7), rng.integers(1, 5)
            ids[i, : prompt + answer] = rng.integers(1, VOCAB, prompt + answer)
            mask[i, : prompt + answer] = 1
            loss[i, prompt: prompt + answer] = 1
        return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss}

    train, global_test = rows(num_clients * per_client), rows(test)
    parts = np.arange(num_clients * per_client).reshape(num_clients, per_client)
    train_parts = [p[: per_client - 1 - u % 3] for u, p in enumerate(parts)]  # 9, 8, 7, 9 rows
    test_parts = [p[per_client - 1 - u % 3:] for u, p in enumerate(parts)]  # 1, 2, 3, 1 rows
    exp = build_experiment(cfg, federate(train, train_parts, test_parts, global_test, "causal_lm", 0))
    for arrays in (train, global_test):
        ids, loss = arrays["input_ids"], arrays["loss_mask"]
        greedy = np.arange(len(ids)) % 2 == 0
        for _ in range(LENGTH):  # causal: filling position t leaves the logits before t unchanged
            predicted = logits_of(exp, exp.params, exp.frozen, arrays).argmax(-1)
            fill = greedy[:, None] & (loss[:, 1:] == 1)
            if (ids[:, 1:][fill] == predicted[:, :-1][fill]).all():
                break
            ids[:, 1:] = np.where(fill, predicted[:, :-1], ids[:, 1:])
    return federate(train, train_parts, test_parts, global_test, "causal_lm", 0, name="lm")


def causal_lm_config():
    raw = copy.deepcopy(TINY)
    raw["model"] = {"arch": "llama", "config": {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
                                                "num_hidden_layers": 1, "num_attention_heads": 2,
                                                "num_key_value_heads": 1, "max_position_embeddings": 32,
                                                "initializer_range": 0.5, "tie_word_embeddings": True}}
    raw["data"] = {"num_clients": 4, "vocab_size": VOCAB, "seq_len": LENGTH}
    raw["federation"] = {"rounds": ROUNDS, "clients_per_round": 3, "local_steps": 1, "batch_size": 4}
    raw["eval"] = {"every": 1, "batch_size": 8, "local_max_examples": 2}  # 20 test rows: 4 padded slots
    raw["data"]["packing"] = None  # causal-LM evaluation scores padded rows either way
    return load_config(raw)


def answer_token_scores(logits, rows):
    """Per-example mean cross-entropy over the answer tokens and (correct, scored) token counts:
    for every t >= 1 with loss_mask[t] = 1, the output at position t - 1 scored on token t."""
    ids, loss_mask = rows["input_ids"], rows["loss_mask"]
    logp = log_softmax(logits)
    top2 = np.sort(logits, axis=-1)[..., -2:]
    losses, correct, count = [], 0, 0
    for i in range(len(ids)):
        targets = [t for t in range(1, ids.shape[1]) if loss_mask[i, t]]
        assert targets and all(rows["attention_mask"][i, t] for t in targets)
        assert min(top2[i, t - 1, 1] - top2[i, t - 1, 0] for t in targets) > 1e-4  # no argmax near-tie
        ce = [-logp[i, t - 1, ids[i, t]] for t in targets]
        losses.append(np.mean(ce))
        correct += sum(int(np.argmax(logits[i, t - 1]) == ids[i, t]) for t in targets)
        count += len(targets)
    return np.asarray(losses), correct, count


def test_causal_lm_scores_exactly_the_answer_tokens(tmp_path):
    cfg = causal_lm_config()
    data = causal_lm_data(cfg)
    rec = run_recorded(cfg, tmp_path, data)
    exp = rec.exp
    subsets = local_rows(data, cfg.eval.local_max_examples, cfg.seed)
    for r, (rnd, reported) in enumerate(zip(rec.rounds, rec.metrics)):
        losses, correct, count = answer_token_scores(
            logits_of(exp, rnd.params_after, rnd.frozen_after, data.global_test), data.global_test)
        assert_close(reported["global_loss"], losses.mean(), what=f"round {r + 1} global_loss")
        assert_close(reported["global_token_accuracy"], correct / count, what=f"round {r + 1} token accuracy")
        # local: per client, its mean answer-token loss over examples and its pooled token accuracy,
        # weighted by the client's number of test examples
        sizes, client_losses, client_accuracy = [], [], []
        for i, u in enumerate(rnd.cohort):
            if not len(subsets[u]):
                continue
            rows = rows_of(data.local_test, u, subsets[u], data.num_local_test)
            example_losses, c, n = answer_token_scores(
                logits_of(exp, client(rnd.client_params, i), rnd.frozen_before, rows), rows)
            sizes.append(len(example_losses))
            client_losses.append(example_losses.mean())
            client_accuracy.append(c / n)
        w = np.asarray(sizes) / np.sum(sizes)
        assert_close(reported["local_loss"], w @ client_losses, what=f"round {r + 1} local_loss")
        assert_close(reported["local_token_accuracy"], w @ client_accuracy, what=f"round {r + 1} local token accuracy")
        assert_close(reported["local_global_gap"], w @ client_accuracy - correct / count, atol=1e-7)
    # the model predicts some answer tokens and misses others, so a shifted mask would show
    assert 0 < reported["global_token_accuracy"] < 1
