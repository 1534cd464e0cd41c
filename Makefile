# Two commands for a newcomer: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned so pip takes the CPU wheel on disk instead of fetching a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
# Fashion-MNIST as gzipped IDX files, from Debian's dataset-fashion-mnist package.
FASHION_DIR := /usr/share/datasets/fashion-mnist
# Headless browser of the web-app tests (Debian's chromium, driven by Playwright).
CHROMIUM := /usr/bin/chromium

.PHONY: venv demo demo-t2i app test test-fast bench clean fashion-data chromium

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[test,parity,app]"
	# Reference Inception for the FID parity test; --no-deps because it would pull torchvision.
	$(PY) -m pip install -q --no-deps torch-fidelity==0.4.0
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) run_train.py --config=configs/digits.py --workdir=demo/workdir
	$(PY) run_sample.py --workdir=demo/workdir --sampler=ddim --steps=100 --num_samples=64 --out=demo
	@echo "Samples written to demo/samples.png"

# Text-to-image trained here on Fashion-MNIST: autoencoder, CLIP, latent diffusion UNet (CPU),
# then a prompt grid (rows: a prompt per class + held-out templates; columns: seeds).
T2I := demo_t2i
demo-t2i: venv fashion-data
	$(PY) run_train.py --config=configs/fashion_autoencoder.py --workdir=$(T2I)/ae
	$(PY) run_train.py --config=configs/fashion_clip.py --workdir=$(T2I)/clip
	$(PY) run_train.py --config=configs/fashion_t2i.py --workdir=$(T2I)/t2i \
		--config.latent.autoencoder_workdir=$(T2I)/ae --config.latent.clip_workdir=$(T2I)/clip
	$(PY) scripts/t2i_grid.py --workdir=$(T2I)/t2i --out=$(T2I) --guidance_scale=3
	@echo "Reconstruction PSNR: $(T2I)/ae/eval.json; zero-shot / recall@1: $(T2I)/clip/eval.json"
	@echo "Prompt grid: $(T2I)/t2i_grid.png (prompts in $(T2I)/t2i_prompts.txt)"

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

# The web app on http://127.0.0.1:7860: the demo-t2i model if built, else the digits demo.
# Other models: make app APP_ARGS="--checkpoint=SD_DIR" (or --workdir=DIR, --port=N).
app: venv
	$(PY) -m diffusion_jax.app $(APP_ARGS)

# Installs Debian's chromium with apt when missing (needs root); otherwise the browser tests
# of the web app are skipped.
chromium: $(CHROMIUM)

$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq chromium; \
	else \
		echo "chromium is missing from $(CHROMIUM): the web-app browser tests will be" \
			"skipped; 'sudo apt-get install chromium' runs them." >&2; \
	fi

test: venv chromium
	$(PY) -m pytest -n 2 -q --durations=30

test-fast: venv
	$(PY) -m pytest -n 2 -q -m "not slow"

bench: venv
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) demo $(T2I) .pytest_cache
