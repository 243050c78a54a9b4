"""Settings of the test session, inherited by the processes it launches."""
import os
import sys
from pathlib import Path

# torch.compile's C++ backend checks, once a process, that its vector ISA works by compiling and
# loading a test program in a subprocess (about a second). The suite starts about a hundred ranks
# that compile the fused loss's kernel, two cores at a time, where that check took a quarter of
# tests/test_train_step.py's time; with this set, inductor takes the ISA that /proc/cpuinfo lists.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "1")

# The venv's tools first on PATH for every launched process. DeepSpeed builds its CPU all-reduce
# op (deepspeed_shm_comm) with whichever `ninja` PATH finds, and two ninja versions (the venv's
# pip one, the system's) hash the same compile command differently: each process that found the
# other one rebuilt the op, about 30 s of both cores, several times a suite. MPICH's hydra proxy
# (mpirun) also needs the venv's bin on PATH.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
