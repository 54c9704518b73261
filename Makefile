# kmoe: two commands on a fresh machine.
#   make demo   create .venv, install pinned deps, run every pipeline stage on real data on CPU
#   make test   same install, then lint (make check) and the test suite
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# pip warns about index folders that this machine's pip config names but lacks; drop that noise only.
QUIET := 2>&1 | { grep -v "is ignored" || true; }
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
KMOE := $(VENV)/bin/kmoe
DEMO := .cache/demo
export OMP_NUM_THREADS ?= 2
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install check test test-full demo clean demo-model demo-data demo-tokenizer demo-train demo-audit

$(VENV)/.installed: pyproject.toml requirements.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip $(QUIET)
	$(PY) -m pip install -q torch==2.13.0 -c constraints.txt $(QUIET)
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt $(QUIET)
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation deepspeed==0.19.8 -c constraints.txt $(QUIET)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . $(QUIET)
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
demo: install demo-model demo-tokenizer demo-train demo-audit
	@echo "demo finished: outputs under $(DEMO)/"

demo-model: install
	@mkdir -p $(DEMO)
	for c in configs/model/*.yaml; do $(KMOE) model info --config $$c || exit 1; done
	$(KMOE) model smoke --config configs/model/tiny.yaml --out $(DEMO)/tiny-init
	$(KMOE) export hf $(DEMO)/tiny-init $(DEMO)/tiny-init-hf --dtype float32 --verify

# Audit (issue 6) of the demo training run, as an outside auditor would: ledger chain, signatures and checkpoint
# files; the initial weights rebuilt from the recorded seed; the last checkpoint interval re-executed from the
# shards bit for bit (--from-step -2: the second-to-last checkpoint on disk, up to the next); the HTML report; the
# final weights against an independently seeded model (independent) and against the run's step 100 (derived).
AUDIT_RUN := $(DEMO)/runs/tiny
demo-audit: install
	@test -f $(AUDIT_RUN)/ledger.jsonl || { echo "demo-audit: $(AUDIT_RUN)/ledger.jsonl missing (make demo-train)"; exit 1; }
	$(KMOE) audit verify $(AUDIT_RUN)
	$(KMOE) audit init-check $(AUDIT_RUN)
	$(KMOE) audit replay $(AUDIT_RUN) --from-step -2
	$(KMOE) audit report $(AUDIT_RUN) --out $(DEMO)/audit-report.html
	$(KMOE) model smoke --config configs/model/tiny.yaml --seed 4321 --out $(DEMO)/tiny-seed4321
	$(KMOE) audit compare $(AUDIT_RUN)/checkpoints/step-00000200 $(DEMO)/tiny-seed4321
	$(KMOE) audit compare $(AUDIT_RUN)/checkpoints/step-00000200 $(AUDIT_RUN)/checkpoints/step-00000100

# Until `kmoe data build` feeds it, the tokenizer trains on a small real dev corpus fetched into .cache/tok-dev
# (DDTP ko/ja/en + Python stdlib); the report measures held-out text of each language against two baselines.
demo-tokenizer: install
	@mkdir -p $(DEMO)
	$(KMOE) tokenizer train --config configs/tokenizer/demo.yaml --out $(DEMO)/tokenizer
	$(KMOE) tokenizer report $(DEMO)/tokenizer --text .cache/tok-dev/heldout/{ko,ko-gnome,en,ja,code}.txt

# Training (issue 5): the tiny MoE on the demo shards (rerun resumes), then HF export checked in transformers.
TRAIN_DEMO := --config configs/train/tiny.yaml --set data.shards=$(DEMO)/data --run-dir $(DEMO)/runs/tiny
demo-train: install
	@test -f $(DEMO)/data/manifest.json || { echo "demo-train: $(DEMO)/data/manifest.json missing (make demo-data)"; exit 1; }
	$(KMOE) train $(TRAIN_DEMO) --dry-run | tail -n 12
	$(KMOE) train $(TRAIN_DEMO) --resume auto
	$(KMOE) export hf $(DEMO)/runs/tiny/checkpoints/step-00000200 $(DEMO)/hf-tiny --dtype float32 \
		--tokenizer $(DEMO)/data/tokenizer --verify

clean:
	rm -rf $(VENV) .cache runs
