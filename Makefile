# Two commands for a newcomer: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned so pip takes the CPU wheel on disk instead of fetching a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
# Fashion-MNIST as gzipped IDX files, from Debian's dataset-fashion-mnist package.
FASHION_DIR := /usr/share/datasets/fashion-mnist

.PHONY: venv demo test test-fast bench clean fashion-data

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[test,parity]"
	# Reference Inception for the FID parity test; --no-deps because it would pull torchvision.
	$(PY) -m pip install -q --no-deps torch-fidelity==0.4.0
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) run_train.py --config=configs/digits.py --workdir=demo/workdir
	$(PY) run_sample.py --workdir=demo/workdir --sampler=ddim --steps=100 --num_samples=64 --out=demo
	@echo "Samples written to demo/samples.png"

# Installs Fashion-MNIST with apt when missing (needs root); otherwise says how.
fashion-data: $(FASHION_DIR)/train-images-idx3-ubyte.gz

$(FASHION_DIR)/train-images-idx3-ubyte.gz:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST is missing from $(FASHION_DIR): run 'sudo apt-get install" \
			"dataset-fashion-mnist', or put its *-idx?-ubyte.gz files in a folder and pass" \
			"--config.data.folder=FOLDER." >&2; \
		exit 1; \
	fi

test: venv
	$(PY) -m pytest -n 2 -q --durations=15

test-fast: venv
	$(PY) -m pytest -n 2 -q -m "not slow"

bench: venv
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) demo .pytest_cache
