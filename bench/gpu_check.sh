#!/usr/bin/env bash
# The GPU check (make gpu-check; on the device machine: bash bench/gpu_check.sh, after bench/gpu_prepare.sh here).
# Within about 9 minutes (each part under its own timeout, so a slow part cannot eat the rest) it writes one JSON
# of figures, $OUT/gpu_check.json (bench/results/gpu_check.json without $OUT):
#  - the photo quick suite (ERM + DFR + SCORE auto + DFR's scikit-learn reference) at 224 px with bf16-mixed,
#    model seeds 0, 1, 2, on CUDA (SCORE's LRP runs with TF32 off: its CUDA failure of 2026-12-04);
#  - trainer.deterministic: true on CUDA: one ERM epoch and one GroupDRO epoch on the photos, each test table
#    included (GroupAccuracy's counts, GroupDRO's group sums), and whether each finished;
#  - the speed ratios on CUDA (python -m bench speed: ERM overhead and FiniteLoss's per-step check, DFR, SCORE, PruSC,
#    LRP), the PruSC step and LRP also at batch 128 at 224 px beside today's batches;
#  - DFR and predict with devices=2 (DDP) against one device, when two GPUs exist.
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
timeout 300 $PY -m bench photos --quick --seeds 0 1 2 --image-size 224 --precision bf16-mixed --root "$PHOTOS" \
  --runs /tmp/gpu_runs --no-docs 2>&1 | grep --line-buffered -E '^\[photos\]|Error|error' | tee -a "$LOG"
photos_s=$(( $(date +%s) - start ))
# deterministic algorithms on CUDA: exit status 0 means no operation without a deterministic kernel ran
det="{}"
for stage in erm groupdro; do
  config=photos_$stage
  timeout 60 $PY -m shortcut_lightning fit --config configs/photos/erm.yaml --config configs/photos/$stage.yaml --data.root "$PHOTOS" --data.image_size 224 \
    --trainer.max_epochs 1 --trainer.deterministic true --trainer.precision bf16-mixed \
    --trainer.logger.init_args.save_dir /tmp/gpu_det --trainer.enable_progress_bar false > /tmp/det_$config.log 2>&1
  status=$?
  tail -3 /tmp/det_$config.log | tee -a "$LOG"
  det=$($PY -c "import json,sys; d=json.loads(sys.argv[1]); d[sys.argv[2]]=int(sys.argv[3]); print(json.dumps(d))" "$det" $config $status)
done
timeout 170 $PY -m bench speed --repeats 1 --only erm,dfr,score,prusc,lrp,lrp_efficientnet --n 2560 --image-size 32 \
  --large-batch 128 2>&1 | tail -40 | tee -a "$LOG"
ddp="{}"
if [ "$($PY -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  ckpt=$(ls /tmp/gpu_runs/*/efficientnet_lite0_ERM/*/seed0/checkpoints/epoch*.ckpt 2>/dev/null | head -1)
  for d in 1 2; do
    timeout 120 $PY -m shortcut_lightning test --config configs/photos/erm.yaml --config configs/photos/dfr.yaml --ckpt_path "$ckpt" --data.root "$PHOTOS" \
      --data.image_size 224 --trainer.devices $d --trainer.logger.init_args.save_dir /tmp/gpu_ddp$d \
      --trainer.enable_progress_bar false 2>&1 | tail -3 | tee -a "$LOG"
    timeout 60 $PY -m shortcut_lightning predict --config configs/photos/erm.yaml --ckpt_path "$ckpt" --data.root "$PHOTOS" \
      --data.image_size 224 --trainer.devices $d --trainer.logger.init_args.save_dir /tmp/gpu_pred$d \
      --trainer.enable_progress_bar false 2>&1 | tail -1 | tee -a "$LOG"
  done
  ddp=$($PY -c "
import csv, glob, json
f = lambda d: json.load(open(glob.glob(f'/tmp/gpu_ddp{d}/*/version_*/metrics.json')[0]))
rows = lambda d: len(list(csv.reader(open(glob.glob(f'/tmp/gpu_pred{d}/*/version_*/predictions.csv')[0])))) - 1
print(json.dumps({'dfr_wga': {'one': f(1)['wga'], 'two': f(2)['wga']}, 'predict_rows': {'one': rows(1), 'two': rows(2)}}))")
fi
$PY - "$OUT" "$photos_s" "$ddp" "$det" <<'PYEOF'
import json, sys, torch
from pathlib import Path
out, photos_s, ddp, det = Path(sys.argv[1]), float(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
results = Path("bench/results")
read = lambda p: json.loads(p.read_text()) if p.is_file() else None
figures = {
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    "gpus": torch.cuda.device_count(), "torch": torch.__version__,
    "photos_quick_224px_bf16": read(results / "photos_quick.json"), "photos_wall_s": photos_s,
    "deterministic_exit_status": det,
    "speed": {p.stem: read(p) for p in sorted(results.glob("speed_*_cuda.json"))},
    "ddp": ddp or "one GPU: not run",
}
(out / "gpu_check.json").write_text(json.dumps(figures, indent=2))
print("wrote", out / "gpu_check.json")
PYEOF
