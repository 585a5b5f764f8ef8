# make demo      - fresh .venv, tiny random models, out/demo.mp4 through the same code the nodes use
# make test      - fresh .venv, the whole test suite (host tests run when COMFYUI_PATH is set)
# make venv      - .venv with torch 2.13.0 and this pack installed editable with its [train,dev] extras
# make pictures  - the README's pictures (docs/pictures/) and template thumbnails from the browser host tests
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench venv pictures clean

venv: $(STAMP)

# The pack itself is installed editable (package magicmirror_video = this folder) with its extras.
# pip shows what it downloads and installs (torch alone is ~200 MB for the CPU, several GB with CUDA).
$(STAMP): pyproject.toml requirements.txt requirements-train.txt requirements-dev.txt constraints.txt
	@echo "== [1/4] creating $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)
	@echo "== [2/4] upgrading pip"
	$(PY) -m pip install --upgrade pip
	@echo "== [3/4] installing torch 2.13.0 (the largest download; a few minutes)"
	$(PY) -m pip install torch==2.13.0
	@echo "== [4/4] installing this pack editable with [train,dev]: diffusers, transformers, insightface, pytest ..."
	$(PY) -m pip install -c constraints.txt -e ".[train,dev]"
	touch $(STAMP)
	@echo "== $(VENV) ready: make test, make demo"

demo: $(STAMP)
	$(PY) scripts/demo.py --out out/demo.mp4

test: $(STAMP)
	$(PY) -m pytest tests

bench: $(STAMP)
	$(PY) bench/sampler.py

# Screenshots of every shipped workflow in ComfyUI's frontend, the DualReal blend plot and the identity curve
# (docs/pictures/), and the templates dialog's thumbnails (workflows/<name>.jpg).
pictures: $(STAMP)
	@test -n "$(COMFYUI_PATH)" || { echo "make pictures needs COMFYUI_PATH=/path/to/ComfyUI (and COMFYUI_PYTHON): see README, Host tests"; exit 2; }
	MMV_PICTURES=docs/pictures MMV_THUMBNAILS=workflows $(PY) -m pytest tests/test_host_frontend.py

clean:
	rm -rf $(VENV) out .tiny_models
