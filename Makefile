# Every target creates or reuses the virtual environment in .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint photos bench bench-quick bench-photos bench-photos-quick gpu-check

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,imagenet]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/shortcut fit --config configs/synthetic/erm.yaml --config configs/synthetic/score.yaml

# one pytest worker per core (pytest-xdist), one torch thread each (tests/conftest.py)
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto

# the real-photo benchmark (Debian photos, fetched with apt-get download into ~/.cache): data/photos, and its
# two variants: data/photos_c100 (no minority training image) and data/photos_patch (ISIC-like colour patch)
photos: $(STAMP)
	$(BIN)/shortcut-data photos --out data/photos
	$(BIN)/shortcut-data photos --variant correlation100 --out data/photos_c100
	$(BIN)/shortcut-data photos --variant patch --out data/photos_patch

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# the results suite (not part of CI; python -m bench lists its commands): the resized cache and the rank-0
# decisions at scale (their sections of docs/results.md), then the embedded suite (docs/results.md's head,
# docs/results.png) and the photo benchmark
bench: $(STAMP)
	$(BIN)/python -m bench loader
	$(BIN)/python -m bench scale
	$(BIN)/python -m bench suite
	$(BIN)/python -m bench photos

# the pretrained regime alone: ImageNet efficientnet_lite0 on the real-photo benchmark (built when missing)
bench-photos: $(STAMP)
	$(BIN)/python -m bench photos

bench-photos-quick: $(STAMP)
	$(BIN)/python -m bench photos --quick

# on a machine with a GPU: the photo quick suite at 224 px (bf16-mixed), DDP on 2 GPUs, CUDA speed ratios
gpu-check: $(STAMP)
	bash bench/gpu_check.sh

bench-quick: $(STAMP)
	$(BIN)/python -m bench suite --quick
