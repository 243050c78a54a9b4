"""Settings of the test session, inherited by the processes it launches."""
import os

# torch.compile's C++ backend checks, once a process, that its vector ISA works by compiling and
# loading a test program in a subprocess (about a second). The suite starts about a hundred ranks
# that compile the fused loss's kernel, two cores at a time, where that check took a quarter of
# tests/test_train_step.py's time; with this set, inductor takes the ISA that /proc/cpuinfo lists.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "1")
