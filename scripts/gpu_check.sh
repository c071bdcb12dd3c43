#!/usr/bin/env bash
# The prepared GPU run (one short script): paging figures host-to-device beside a pinned copy of the same
# bytes, and single-GPU training speed beside the same run on the CPU.
#   OUT=outputs/gpu bash scripts/gpu_check.sh
# Needs torch with CUDA, lightning, transformers, safetensors, einops, hydra-core; CLINC150 under
# $MOE_DATA_DIR. Training uses the tiny trunk widened to MiniLM's 384 features, so that the experts and gate
# are the size they are on MiniLM (the trunk's own encoding is not part of train_s).
set -uo pipefail
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MOE_CACHE_DIR=${MOE_CACHE_DIR:-/tmp/moe-cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
python scripts/bench_paging.py --device cuda --no-stream --repeats 30 --out "$OUT/paging_cuda.json" 2>&1 \
  | grep -v 'it/s' | tee "$OUT/paging_cuda.log"
for accel in gpu cpu; do
  python scripts/train.py experiment=clinc150 trunk=tiny trunk.dim=384 trainer=$accel logger=csv callbacks=none \
    paths.output_dir="$OUT/train_$accel" 2>&1 | tail -3
done
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = {a: json.load(open(f"{out}/train_{a}/metrics.json")) for a in ("gpu", "cpu")}
summary = {a: {k: m[k] for k in ("time/train_s", "time/encode_s", "test/acc_tenant_given")} for a, m in rows.items()}
summary["cpu_over_gpu_train_s"] = rows["cpu"]["time/train_s"] / rows["gpu"]["time/train_s"]
json.dump(summary, open(f"{out}/train_speed.json", "w"), indent=2)
print(json.dumps(summary, indent=2))
PY
