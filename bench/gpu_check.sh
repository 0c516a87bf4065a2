#!/usr/bin/env bash
# The GPU check (make gpu-check; on the device machine: bash bench/gpu_check.sh, after bench/gpu_prepare.sh here).
# Within 10 minutes it writes one JSON of figures, $OUT/gpu_check.json (bench/results/gpu_check.json without $OUT):
#  - the photo quick suite (ERM + DFR + SCORE auto, seed 0) at 224 px with bf16-mixed, on CUDA;
#  - DFR with devices=2 (DDP) against one device, when two GPUs exist;
#  - the speed ratios on CUDA (bench/speed.py: ERM overhead, DFR, SCORE, PruSC, LRP on resnet18 and efficientnet_lite0).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PHOTOS=${PHOTOS:-data/photos_gpu}
[ -f "$PHOTOS/metadata.csv" ] || PHOTOS=data/photos
LOG="$OUT/gpu_check.log"
$PY -c "import torch; print('torch', torch.__version__, 'GPUs', torch.cuda.device_count(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')" | tee "$LOG"
start=$(date +%s)
timeout 330 $PY bench/photos.py --quick --image-size 224 --precision bf16-mixed --root "$PHOTOS" \
  --runs /tmp/gpu_runs --no-docs 2>&1 | grep --line-buffered -E '^\[photos\]|Error|error' | tee -a "$LOG"
photos_s=$(( $(date +%s) - start ))
timeout 200 $PY bench/speed.py --repeats 1 --only erm,dfr,score,prusc,lrp,lrp_efficientnet --n 2560 --image-size 32 2>&1 | tail -30 | tee -a "$LOG"
ddp="{}"
if [ "$($PY -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  ckpt=$(ls /tmp/gpu_runs/*/efficientnet_lite0_ERM/*/seed0/checkpoints/epoch*.ckpt 2>/dev/null | head -1)
  for d in 1 2; do
    timeout 120 $PY -m shortcut_lightning test --config configs/photos_dfr.yaml --ckpt_path "$ckpt" --data.root "$PHOTOS" \
      --data.image_size 224 --trainer.devices $d --trainer.logger.init_args.save_dir /tmp/gpu_ddp$d \
      --trainer.enable_progress_bar false 2>&1 | tail -3 | tee -a "$LOG"
  done
  ddp=$($PY -c "import json,glob; f=lambda d: json.load(open(glob.glob(f'/tmp/gpu_ddp{d}/*/version_*/metrics.json')[0])); print(json.dumps({'one': f(1)['wga'], 'two': f(2)['wga']}))")
fi
$PY - "$OUT" "$photos_s" "$ddp" <<'PYEOF'
import json, sys, torch
from pathlib import Path
out, photos_s, ddp = Path(sys.argv[1]), float(sys.argv[2]), json.loads(sys.argv[3])
results = Path("bench/results")
read = lambda p: json.loads(p.read_text()) if p.is_file() else None
figures = {
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    "gpus": torch.cuda.device_count(), "torch": torch.__version__,
    "photos_quick_224px_bf16": read(results / "photos_quick.json"), "photos_wall_s": photos_s,
    "speed": {p.stem: read(p) for p in sorted(results.glob("speed_*_cuda.json"))},
    "ddp_dfr_wga": ddp or "one GPU: not run",
}
(out / "gpu_check.json").write_text(json.dumps(figures, indent=2))
print("wrote", out / "gpu_check.json")
PYEOF
