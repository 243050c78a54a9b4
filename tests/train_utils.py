"""Helpers for the training tests: a tiny random Llama with the real SmolLM2 tokenizer, the
entry point launched as users launch it, and its metrics."""
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers

from megatron_onpolicy.model.hub import resolve_model_path
from megatron_onpolicy.model.loader import load_tokenizer
from tests.dist_utils import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENTRY = str(ROOT / "launch" / "pretrain_idft.py")


def make_tiny_model(folder, layers=4, tied=True, seed=0, kind="llama"):
    """hidden 64, 4 heads / 2 KV heads, vocab 49152 so that the SmolLM2 tokenizer fits.
    kind "qwen3": Qwen3's per-head q / k norms, heads 16 wide."""
    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    config = (transformers.Qwen3Config(**common, head_dim=16) if kind == "qwen3"
              else transformers.LlamaConfig(**common))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # non-trivial norm weights, as in a trained model
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    model.save_pretrained(folder)
    load_tokenizer(resolve_model_path("smollm2-135m")).save_pretrained(folder)
    return folder


def launch(n, *args, runner="deepspeed", script=ENTRY, timeout=600):
    """Run a script (default: the training entry point) on n processes, as users start it:
    runner deepspeed, torchrun, mpirun (MPICH's, from the venv) or slurm (n tasks with the
    environment an srun step gives them, which is all srun does for a job on one node);
    n == 0: plain python, a job of one process."""
    script = str(ROOT / script)
    args = [str(a) for a in args]
    if runner == "slurm" and n:
        return _slurm_step(n, [sys.executable, script, *args], timeout)
    if n == 0:
        cmd = [sys.executable, script]
    elif runner == "torchrun":
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={n}", script]
    elif runner == "mpirun":  # the job's port from the environment (MPICH passes it on), as users set it
        cmd = [str(BIN / "mpirun"), "-np", str(n), sys.executable, script]
    else:
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(n), "--master_port", str(free_port()), script]
    env = {**os.environ, "MASTER_PORT": str(free_port())} if runner == "mpirun" else None
    return subprocess.run(cmd + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _slurm_step(n, cmd, timeout):
    job = str(random.randrange(1, 10**6))
    keep = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT")}
    # Outputs go to files: a task blocked on a full pipe would stall the others in a collective.
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for rank in range(n):
            env = {**keep, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NTASKS": str(n),
                   "SLURM_JOB_ID": job, "SLURM_JOB_NODELIST": "localhost", "SLURM_STEP_ID": "0",
                   "SLURM_STEP_NUM_TASKS": str(n), "SLURM_STEP_NODELIST": "localhost"}
            out, err = open(f"{tmp}/{rank}.out", "w+"), open(f"{tmp}/{rank}.err", "w+")
            procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err), out, err))
        for p, _, _ in procs:
            p.wait(timeout=timeout)
        texts = []
        for _, *files in procs:
            for f in files:
                f.seek(0)
                texts.append(f.read())
                f.close()
    return subprocess.CompletedProcess(cmd, max(p.returncode for p, _, _ in procs), "".join(texts[0::2]),
                                       "".join(texts[1::2]))


def read_metrics(folder):
    return [json.loads(line) for line in open(Path(folder) / "metrics.jsonl")]
