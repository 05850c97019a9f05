# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch/torchvision are pinned to the releases this project is developed and tested with.
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install clean bench browser

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/deepmetric demo --out runs/demo --overwrite

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# The serve browser test drives Debian's chromium through playwright (never a downloaded browser).
browser:
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core; \
	  else \
	    echo "chromium is missing: the browser test skips (fails under CI); install: sudo apt-get install chromium fonts-dejavu-core"; \
	  fi; }

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_losses.py
	$(BIN)/python benchmarks/bench_evaluation.py

clean:
	rm -rf $(VENV) runs build src/*.egg-info .pytest_cache
