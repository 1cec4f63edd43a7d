# make test / make bench on a fresh machine with nothing but Python 3: both create .venv and install.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Without a GPU, take the CPU build of torch (a plain `pip install torch` pulls a multi-GB CUDA build).
# On these machines pip finds torch==2.13.0+cpu on local disk; elsewhere, for example:
#   make test CPU_TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
CPU_TORCH ?= torch==2.13.0

.PHONY: install test bench example clean

$(VENV)/.installed: setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: torch comes from the default index (a CUDA build)"; \
	else \
		echo "no GPU: installing the CPU build of torch ($(CPU_TORCH))"; \
		$(BIN)/python -m pip install --quiet $(CPU_TORCH); \
	fi
	$(BIN)/python -m pip install --quiet -e ".[test,bench,hf]"
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python -m benchmarks

example: install
	$(BIN)/python examples/distill_tiny.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
