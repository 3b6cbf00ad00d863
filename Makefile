# Two commands do all the setup: `make demo` and `make test`. Both go through `make setup`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-distill demo-calculator test test-faults test-slow test-zoo test-sharded test-gpu bench bench-gpu clean

setup: $(STAMP)

# Torch first, pinned: the CPU build of 2.13.0 here. A range admitting a newer torch
# would pull gigabytes of CUDA wheels. GPU users: see README "Installing on a GPU machine".
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/rlhf demo --output-dir runs/demo

demo-distill: setup
	$(BIN)/rlhf demo-distill --output-dir runs/distill-demo

demo-calculator: setup
	$(BIN)/rlhf demo-calculator --output-dir runs/calculator-demo

test: setup
	$(BIN)/python -m pytest -q

test-faults: setup
	$(BIN)/python -m pytest -q tests/test_faults.py tests/test_trl_compat.py

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# The whole model zoo: every architecture under every attention kernel that runs on CPU.
test-zoo: setup
	$(BIN)/python -m pytest -q -m zoo tests/test_zoo.py

# Every recipe sharded, FSDP2 and DeepSpeed ZeRO-3 on two CPU processes over gloo (docs/scaling.md).
test-sharded: setup
	DS_BUILD_OPS=0 $(BIN)/pip install -q -c constraints.txt -e '.[deepspeed]'
	$(BIN)/python -m pytest -q -m sharded tests/test_sharded.py

# On a CUDA machine (README "On a GPU"): every recipe in bf16 on a Qwen2.5-0.5B-shaped model.
test-gpu: setup
	$(BIN)/python -m pytest -q -rs -m gpu

bench: setup
	$(BIN)/pip install -q -c constraints.txt -e '.[bench]'
	$(BIN)/python benchmarks/compare.py

# One run, one card: rollout engines, update MFU, GRPO/DPO against TRL, PPO step bound, peak memory.
bench-gpu: setup
	$(BIN)/pip install -q -c constraints.txt -e '.[bench]'
	$(BIN)/python benchmarks/gpu.py

clean:
	rm -rf $(VENV) runs build src/*.egg-info
