"""Workload W2 of scripts/bench_vs_torch.py: a Llama-architecture decoder fine-tuned on GSM8K.

Both sides train the same randomly initialised decoder: HF ``LlamaForCausalLM(LlamaConfig(...))``
built under a fixed torch seed and saved with ``save_pretrained`` (safetensors), which fedlora_jax
loads with ``model.pretrained=<dir>`` and the PyTorch peer with ``from_pretrained``. The lm_head is
untied (as in Llama 2 and TinyLlama) on both sides. Models (``--w2-model``):

  small             4 layers, hidden 512, 8 heads, 2 key/value heads (GQA), intermediate 1376, vocab
                    30522 (the offline MiniLM WordPiece tokenizer's), about 27M parameters (15.6M of them
                    the lm_head)
  tinyllama         TinyLlama-1.1B's config: hidden 2048, 22 layers, 32 heads, 4 key/value heads,
                    intermediate 5632, vocab 32000, rope_theta 10000, max positions 2048, RMSNorm eps 1e-5
  tinyllama_smoke   TinyLlama's vocab and head ratio at a toy width (CPU smoke test of the 1B path)

Token rows: GSM8K train tokenised by fedlora_jax's gsm8k source with the MiniLM tokenizer
("Question: ...\\nAnswer:" + " " + answer + [SEP], max length 256, loss on the answer tokens only),
for every model. With TinyLlama's vocabulary of 32000 the ids simply stay below 30522: the rows keep
GSM8K's real length distribution (mean about 160 of 256 tokens; 7% of the rows truncated at 256),
which is what the length settings measure, and no 32000-token tokenizer is needed on the GPU image.

The PyTorch peer reads fedlora_jax's own tokenised rows and client partition (``build_data`` of the
same config): ``input_ids``, ``attention_mask``, and labels = input_ids where ``loss_mask`` is 1, else
-100 (prompt and padding). Its loss is fedlora_jax's: per example the mean cross-entropy of its scored
targets (output t - 1 on token t), then the mean over the batch's examples. (HF's built-in loss
averages over all scored tokens of the batch instead, which weights long answers more.)
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, TaskType, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from bench_round import compile_engine_round
from fedlora_jax.config import load_config
from fedlora_jax.data.packing import pack
from fedlora_jax.params import leaf_names
from fedlora_jax.run.build import build_data

MAX_LENGTH, BATCH_SIZE, RANK, ALPHA, LEARNING_RATE = 256, 8, 8, 16, 1e-4
QUICK_BATCH_SIZE = 4  # --quick: 2 clients x 1 step x 4 rows
TARGETS = ("q_proj", "v_proj")
SEED = 0

_COMMON = dict(max_position_embeddings=2048, rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False,
               attention_bias=False, mlp_bias=False)
PRESETS = {
    "small": dict(vocab_size=30522, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-6, **_COMMON),
    "tinyllama": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, rms_norm_eps=1e-5, **_COMMON),
    "tinyllama_smoke": dict(vocab_size=32000, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                            num_attention_heads=8, num_key_value_heads=1, rms_norm_eps=1e-5, **_COMMON),
}


# ---------------------------------------------------------------------------------------------
# the shared random checkpoint


def ensure_checkpoint(preset: str, directory: str | None, dtype: str, device: torch.device) -> str:
    """A directory holding HF LlamaForCausalLM weights of ``preset`` drawn under torch seed 0, saved in
    ``dtype`` (safetensors); built once and reused while its marker file matches."""
    directory = Path(directory or f"/tmp/fedlora_w2_{preset}_{dtype}")
    marker = directory / "fedlora_w2.json"
    wanted = {"preset": PRESETS[preset], "dtype": dtype, "seed": SEED}
    if marker.is_file() and json.loads(marker.read_text()) == wanted and any(directory.glob("*.safetensors")):
        return str(directory)
    t0 = time.perf_counter()
    torch.manual_seed(SEED)
    with torch.device(device):  # a 1.1B model is drawn on the GPU in a second, on a CPU in minutes
        model = LlamaForCausalLM(LlamaConfig(**PRESETS[preset]))
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    if not any(directory.glob("*.safetensors")):
        raise RuntimeError(f"save_pretrained wrote no safetensors to {directory}")
    marker.write_text(json.dumps(wanted))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"w2: random {preset} checkpoint ({dtype}) written to {directory} in {time.perf_counter() - t0:.1f} s",
          flush=True)
    return str(directory)


# ---------------------------------------------------------------------------------------------
# fedlora_jax


def engine_config(checkpoint: str, tokenizer: str, gsm8k_dir: str, clients: int, local_steps: int,
                  batch_size: int) -> dict:
    """The fedlora_jax config of W2 (the length setting, dtype, remat and chunking come as overrides)."""
    gsm8k = Path(gsm8k_dir)
    return {
        "name": "bench_w2", "seed": SEED,
        "model": {"arch": "llama", "pretrained": checkpoint},
        "lora": {"rank": RANK, "alpha": ALPHA, "targets": list(TARGETS)},
        "data": {"source": "gsm8k", "load": {"files": {"train": str(gsm8k / "train.jsonl"),
                                                        "test": str(gsm8k / "test.jsonl")}},
                 "tokenizer": tokenizer, "eos_token": "[SEP]", "train_split": "train", "test_split": "test",
                 "max_test_examples": 8, "max_length": MAX_LENGTH, "num_clients": clients,
                 "partition": {"scheme": "iid"}, "local_test_fraction": 0.0},
        "federation": {"rounds": 1, "clients_per_round": clients, "local_steps": local_steps,
                       "batch_size": batch_size, "method": "fedit"},
        "optim": {"name": "adamw", "learning_rate": LEARNING_RATE, "weight_decay": 0.0, "schedule": "constant"},
    }


def engine_overrides(lengths: str, dtype: str, remat: str | None, chunk: str) -> list[str]:
    out = [f"model.dtype={dtype}", f"data.packing={'null' if lengths.startswith('padded') else 'auto'}",
           f"federation.clients_per_chunk={chunk}"]
    return out + ([f"model.remat={remat}"] if remat else [])


def memory_analysis(compiled) -> dict | None:
    """XLA's own memory figures of a compiled round (bytes), or None where the backend gives none."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 (not every backend implements it)
        return None
    if stats is None:
        return None
    names = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
             "generated_code_size_in_bytes")
    found = {n: int(getattr(stats, n)) for n in names if hasattr(stats, n)}
    found["total_bytes"] = (found.get("argument_size_in_bytes", 0) + found.get("output_size_in_bytes", 0)
                            - found.get("alias_size_in_bytes", 0) + found.get("temp_size_in_bytes", 0))
    return found


def jax_round(config: dict, overrides: list[str]):
    """(zero-argument function running one compiled round to completion, compile seconds, experiment,
    XLA memory analysis)."""
    built = compile_engine_round(config, overrides)
    return built.run_once, built.compile_s, built.exp, memory_analysis(built.compiled)


def jax_peak_bytes() -> int | None:
    """The JAX allocator's peak bytes in use on the first device since the process started."""
    stats = jax.local_devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


# ---------------------------------------------------------------------------------------------
# PyTorch: HF transformers + PEFT


@dataclasses.dataclass
class DecoderRows:
    """fedlora_jax's tokenised GSM8K train rows on the peer's device: ids, mask and labels [N, 256]
    (labels -100 off the answer), real lengths [N], and each client's row indices."""

    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    lengths: np.ndarray
    clients: list[np.ndarray]

    @classmethod
    def from_config(cls, config: dict, device: torch.device) -> "DecoderRows":
        data = build_data(load_config(config))  # the engine's own rows and partition (same config, same seed)
        train = data.train
        ids = torch.from_numpy(train["input_ids"].astype(np.int64))
        labels = torch.where(torch.from_numpy(train["loss_mask"]) > 0, ids, torch.full_like(ids, -100))
        starts = np.concatenate([[0], np.cumsum(data.num_train)[:-1]])
        clients = [np.arange(s, s + n) for s, n in zip(starts, data.num_train)]
        mask = torch.from_numpy(train["attention_mask"].astype(np.int64))
        return cls(ids.to(device), mask.to(device), labels.to(device), train["attention_mask"].sum(axis=1), clients)

    def batch(self, rows: np.ndarray, dynamic: bool) -> dict:
        """A training batch: padded to 256, or (``dynamic``) to its longest row."""
        width = int(self.lengths[rows].max()) if dynamic else self.ids.shape[1]
        index = torch.from_numpy(rows).to(self.ids.device)
        return {"input_ids": self.ids[index, :width], "attention_mask": self.mask[index, :width],
                "labels": self.labels[index, :width]}


def example_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """fedlora_jax's causal-LM loss: per example the mean cross-entropy of the output at t - 1 on each
    scored token t (label != -100), then the mean over examples (an example with none counts 0)."""
    # as HF's ForCausalLMLoss lays it out: labels shifted left and padded with -100, logits flattened
    # (no strided copy of the [b, L, V] logits)
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:]
    batch, length, vocab = logits.shape
    token_loss = F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1), ignore_index=-100,
                                 reduction="none").view(batch, length)
    scored = (targets != -100).float()
    return ((token_loss * scored).sum(1) / scored.sum(1).clamp(min=1.0)).mean()


def peft_leaf_name(name: str) -> str | None:
    """PEFT's parameter name -> fedlora_jax's trainable leaf name (None if not a LoRA factor)."""
    for peft_suffix, suffix in ((".lora_A.default.weight", ".lora_a"), (".lora_B.default.weight", ".lora_b")):
        if name.endswith(peft_suffix):
            return name.removeprefix("base_model.model.")[: -len(peft_suffix)] + suffix
    return None


class TorchDecoderFederation:
    """A plain sequential federated LoRA loop: one HF LlamaForCausalLM + PEFT model reused by every client.

    With ``dtype="bfloat16"`` the base is stored in bfloat16 and runs under ``torch.autocast(bfloat16)``,
    the LoRA factors and AdamW stay float32: fedlora_jax's
    ``model.dtype=bfloat16``. No gradient checkpointing (one client's 8 rows at a time fit easily).
    """

    def __init__(self, checkpoint: str, local_steps: int, batch_size: int, device: torch.device,
                 dtype: str = "float32", seed: int = SEED):
        torch.manual_seed(seed)
        self.device = device
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
        model = LlamaForCausalLM.from_pretrained(checkpoint)
        model = model.to(torch.bfloat16 if dtype == "bfloat16" else torch.float32)
        model.config.use_cache = False
        model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=RANK, lora_alpha=ALPHA,
                                                 target_modules=list(TARGETS), lora_dropout=0.0))
        self.model = model.to(device).train()
        self.named = {peft_leaf_name(n): p for n, p in self.model.named_parameters() if p.requires_grad}
        if None in self.named:
            raise RuntimeError("the PEFT model trains parameters other than LoRA factors")
        for p in self.named.values():  # float32 whatever the PEFT version's default
            p.data = p.data.float()
        self.params = list(self.named.values())
        self.global_state = [p.detach().clone() for p in self.params]
        self.local_steps, self.batch_size = local_steps, batch_size
        self.rng = np.random.default_rng(seed)

    def load_state(self, named_arrays: dict) -> None:
        """Sets the global LoRA state (and the live parameters) from fedlora_jax leaves by name."""
        with torch.no_grad():
            for name, p in self.named.items():
                p.copy_(torch.from_numpy(np.asarray(named_arrays[name], np.float32)))
        self.global_state = [p.detach().clone() for p in self.params]

    def loss(self, batch: dict) -> torch.Tensor:
        with self.autocast:
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return example_mean_loss(logits, batch["labels"])

    def optimizer(self) -> torch.optim.Optimizer:
        """A fresh AdamW (fedlora_jax starts every client's optimiser state afresh each round)."""
        return torch.optim.AdamW(self.params, lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def round(self, data: DecoderRows, dynamic: bool) -> None:
        """One FedIT round over every client: local AdamW steps from the global state, then the weighted mean."""
        trained, weights = [], []
        for rows in data.clients:
            with torch.no_grad():
                for p, g in zip(self.params, self.global_state):
                    p.copy_(g)
            optimizer = self.optimizer()
            picked = self.rng.permutation(rows)[:self.local_steps * self.batch_size]
            for batch_rows in np.split(picked, self.local_steps):
                self.loss(data.batch(batch_rows, dynamic)).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            trained.append([p.detach().clone() for p in self.params])
            weights.append(len(rows))
        w = torch.tensor(weights, dtype=torch.float32, device=self.device) / sum(weights)
        self.global_state = [torch.einsum("k,k...->...", w, torch.stack(leaf)) for leaf in zip(*trained)]
        if self.device.type == "cuda":
            torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# parity: the same state, the same batch, both sides

TOLERANCE = {"float32": {"loss": 1e-4, "grad": 1e-3}, "bfloat16": {"loss": 2e-2, "grad": 1e-1}}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def parity_check(exp, torch_fed: TorchDecoderFederation, data: DecoderRows, batch_size: int, dtype: str) -> dict:
    """One local step on the same batch (client 0's first ``batch_size`` rows, padded to 256) from the
    same LoRA state on both sides: fedlora_jax's initial A and a random non-zero B (so the adapters take
    part), copied into the PEFT model by name. Compares the step's loss and gradient (relative L2 over
    every LoRA leaf), the loss after one AdamW step on the same batch, and fedlora_jax's loss on the
    batch packed into one stream (what ``data.packing=auto`` computes) with its padded loss.
    Tolerances (relative): float32 loss 1e-4, gradient 1e-3; bfloat16 loss 2e-2, gradient 1e-1."""
    trainer = exp.federation.trainer
    names = leaf_names(exp.params)
    rng = np.random.default_rng(1)
    leaves = [jnp.asarray(rng.normal(0.0, 0.02, x.shape), x.dtype) if n.endswith(".lora_b") else x
              for n, x in zip(names, jax.tree.leaves(exp.params))]
    params = jax.tree.unflatten(jax.tree.structure(exp.params), leaves)
    torch_fed.load_state({n: np.asarray(x, np.float32) for n, x in zip(names, leaves)})

    rows = data.clients[0][:batch_size]
    first = int(rows[0])
    jax_batch = {k: jnp.asarray(v[first:first + batch_size]) for k, v in exp.data.train.items()}
    mask = jnp.ones((batch_size,), jnp.float32)
    value_and_grad = jax.jit(jax.value_and_grad(trainer.loss))
    jax_loss, jax_grads = value_and_grad(params, exp.frozen, jax_batch, mask)
    direction, _ = trainer.optimizer.update(jax_grads, trainer.optimizer.init(params), params)
    stepped = jax.tree.map(lambda p, d: p - (trainer.schedule(0) * d).astype(p.dtype), params, direction)
    jax_loss_after, _ = value_and_grad(stepped, exp.frozen, jax_batch, mask)  # no second compile
    tokens = int(16 * -(-int(jnp.sum(jax_batch["attention_mask"])) // 16))
    packed, fits = jax.jit(pack, static_argnums=2)(jax_batch, mask, tokens)
    jax_packed_loss = jax.jit(trainer.loss)(params, exp.frozen, packed, mask)

    batch = data.batch(rows, dynamic=False)
    optimizer = torch_fed.optimizer()
    loss = torch_fed.loss(batch)
    loss.backward()
    torch_grads = {n: p.grad.detach().float().cpu().numpy() for n, p in torch_fed.named.items()}
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        torch_loss_after = float(torch_fed.loss(batch))
    torch_fed.load_state({n: np.asarray(x, np.float32) for n, x in zip(names, jax.tree.leaves(exp.params))})

    jax_flat = np.concatenate([np.asarray(g, np.float32).ravel() for g in jax.tree.leaves(jax_grads)])
    torch_flat = np.concatenate([torch_grads[n].ravel() for n in names])
    tol = TOLERANCE[dtype]
    result = {
        "rows": [int(r) for r in rows], "real_tokens": int(jnp.sum(jax_batch["attention_mask"])),
        "scored_tokens": int(jnp.sum(jax_batch["loss_mask"])),
        "jax_loss": float(jax_loss), "torch_loss": loss.item(),
        "loss_rel_diff": abs(float(jax_loss) - loss.item()) / abs(loss.item()),
        "grad_rel_l2_diff": _rel(jax_flat, torch_flat), "grad_norm_jax": float(np.linalg.norm(jax_flat)),
        "jax_loss_after_step": float(jax_loss_after), "torch_loss_after_step": torch_loss_after,
        "loss_after_step_rel_diff": abs(float(jax_loss_after) - torch_loss_after) / abs(torch_loss_after),
        "jax_packed_loss": float(jax_packed_loss), "packed_fits": bool(fits),
        "packed_vs_padded_rel_diff": abs(float(jax_packed_loss) - float(jax_loss)) / abs(float(jax_loss)),
        "tolerance": tol,
    }
    result["ok"] = bool(result["loss_rel_diff"] <= tol["loss"] and result["grad_rel_l2_diff"] <= tol["grad"]
                        and result["loss_after_step_rel_diff"] <= tol["loss"]
                        and result["packed_vs_padded_rel_diff"] <= tol["loss"] and fits)
    return result


# ---------------------------------------------------------------------------------------------
# work per round: real tokens and model FLOPs


def matmul_params(preset: dict) -> int:
    """N: parameters of the base's matmuls (q, k, v, o, gate, up, down in every layer, and the lm_head;
    the embedding lookup is no matmul)."""
    hidden, inner, layers = preset["hidden_size"], preset["intermediate_size"], preset["num_hidden_layers"]
    head_dim = hidden // preset["num_attention_heads"]
    q, kv = preset["num_attention_heads"] * head_dim, preset["num_key_value_heads"] * head_dim
    per_layer = hidden * q + 2 * hidden * kv + q * hidden + 3 * hidden * inner
    return layers * per_layer + hidden * preset["vocab_size"]


def work_per_round(preset: dict, lengths: np.ndarray, rows_per_round: int) -> dict:
    """Useful work of a round, counted on the real tokens of ``rows_per_round`` rows drawn from rows of
    real ``lengths`` (expected values: the mean length and mean squared length of the train rows).

    Model FLOPs, frozen base with LoRA (the MFU numerator; padding, packing slack and remat
    recomputation are not counted, so every column of a setting is credited the same work):
      forward 2 N per token + backward 2 N per token (gradients of the activations only: no weight
      gradients for the frozen base) = 4 N T per row of T real tokens, N = :func:`matmul_params`;
      attention: forward 4 L T^2 hidden (Q K^T and P V, the full T x T square) and backward 8 L T^2
      hidden, = 12 L T^2 hidden per row;
      the LoRA factors (r = 8 on q/v: under 0.1% of the total) are left out.
    """
    n = matmul_params(preset)
    mean_t, mean_t2 = float(np.mean(lengths)), float(np.mean(np.square(lengths.astype(np.float64))))
    layers, hidden = preset["num_hidden_layers"], preset["hidden_size"]
    flops = rows_per_round * (4.0 * n * mean_t + 12.0 * layers * hidden * mean_t2)
    return {"real_tokens": rows_per_round * mean_t, "model_flops": flops, "matmul_params": n,
            "mean_real_length": mean_t}
