# make demo  - fresh .venv, tiny random models, out/demo.mp4 through the same code the nodes use
# make test  - fresh .venv, the whole test suite (host tests run when COMFYUI_PATH is set)
# make venv  - .venv with torch 2.13.0 and this pack installed editable with its [train,dev] extras
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench venv clean

venv: $(STAMP)

# The pack itself is installed editable (package magicmirror_video = this folder) with its extras.
$(STAMP): pyproject.toml requirements.txt requirements-train.txt requirements-dev.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[train,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py --out out/demo.mp4

test: $(STAMP)
	$(PY) -m pytest tests

bench: $(STAMP)
	$(PY) bench/sampler.py

clean:
	rm -rf $(VENV) out .tiny_models
