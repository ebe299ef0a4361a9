# Both targets build their own virtual environment on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/demo
PYTEST_ARGS ?=

.PHONY: demo test test-slow docs bench device-check ablations clean

# The C source too: pip builds the partial JPEG decoder from it.
$(VENV)/.installed: pyproject.toml jaxdml/data/_jpeg_region.c
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m jaxdml.main --config=configs/sketchy_rtl.py:demo --workdir=$(WORKDIR)

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --durations=15 $(PYTEST_ARGS) tests

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS) tests

# The API reference, from the docstrings (pdoc): docs/api/index.html.
docs: $(VENV)/.installed
	$(PY) -m pdoc -o docs/api --docformat google jaxdml '!jaxdml.tools.torch_reference' \
	  '!jaxdml.tools.torch_step'

# Every paper's claim on the embedded data, 3 seeds each (about 2 hours on
# 2 CPU cores); resumable, tables printed at the end (docs/ablations.md).
ablations: $(VENV)/.installed
	$(PY) -m jaxdml.tools.ablate --study=all --seeds=3 --workdir=workdirs/ablations

bench: $(VENV)/.installed
	$(PY) -m jaxdml.bench --config=configs/sketchy_rtl.py:demo

# On a GPU or TPU box: bench, torch side by side, search, SBIR demo in one
# report (device_check/device_check.md), within about 8 minutes.
device-check: $(VENV)/.installed
	$(PY) -m jaxdml.device_check --out=device_check

clean:
	rm -rf $(VENV) workdirs
