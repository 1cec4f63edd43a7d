# make test / make bench on a fresh machine with nothing but Python 3: both create .venv and install.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Without a GPU, take the CPU build of torch (a plain `pip install torch` pulls a multi-GB CUDA build).
# On these machines pip finds torch==2.13.0+cpu on local disk; elsewhere, for example:
#   make test CPU_TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
CPU_TORCH ?= torch==2.13.0

.PHONY: install test test-gpu test-gpu-quick bench example clean

$(VENV)/.installed: setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: torch comes from the default index (a CUDA build)"; \
	else \
		echo "no GPU: installing the CPU build of torch ($(CPU_TORCH))"; \
		$(BIN)/python -m pip install --quiet $(CPU_TORCH); \
	fi
	$(BIN)/python -m pip install --quiet -e ".[test,bench,hf,trl,deepspeed]"
	touch $@

install: $(VENV)/.installed

# The suite in parallel (pytest-xdist, one worker per core: about 2x on 2 cores); TEST_WORKERS=0 runs it
# in one process.
TEST_WORKERS ?= auto
test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

# On a machine with CUDA: the whole suite with the compiled Triton kernels, `gpu`-marked tests included.
# It fails (rather than skipping) where no GPU is visible.
test-gpu: install
	$(BIN)/python tests/gpu_info.py
	CSD_REQUIRE_GPU=1 $(BIN)/python -m pytest

# The pull-request subset: parity of every loss, the input classes, compile and the GPU-only tests (minutes).
GPU_QUICK_TESTS = tests/test_csd_loss.py tests/test_kl_loss.py tests/test_fused_ce.py tests/test_input_classes.py \
	tests/test_fused_linear.py tests/test_compile.py tests/test_tolerances.py
test-gpu-quick: install
	$(BIN)/python tests/gpu_info.py
	CSD_REQUIRE_GPU=1 $(BIN)/python -m pytest -m "gpu or not slow" $(GPU_QUICK_TESTS)

bench: install
	$(BIN)/python -m benchmarks

# The tuned, multi-seed comparison of the losses (under 5 minutes on 2 CPU cores; README "Which loss?").
example: install
	$(BIN)/python examples/compare_losses.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
