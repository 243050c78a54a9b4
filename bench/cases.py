"""Shared by the benches: one case measured in a fresh process, so each peak RSS starts clean, the
peak memory of what runs after a mark (CPU: peak RSS; GPU: the caching allocator's peak), and the
aten ops a piece of code dispatches."""
import collections
import json
import subprocess
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def case_in_subprocess(script: str, label: str, args: list):
    """Run `python script *args` (the script's internal --case mode); -> the JSON of its last
    stdout line, or None after printing why it failed."""
    out = subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True)
    if out.returncode:
        print(f"{label}: failed ({out.stderr.strip().splitlines()[-1:]})")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def status_kb(field: str) -> int:
    """A field of /proc/self/status (VmRSS, VmHWM), in kB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_mark() -> int:
    """Reset the peak to what is held now, and return that (bytes)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:  # resets the peak RSS (VmHWM) to the current RSS
        f.write("5")
    return status_kb("VmRSS") * 1024


def peak_since(mark: int) -> int:
    """Peak memory above `mark` since memory_mark() returned it (bytes)."""
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else status_kb("VmHWM") * 1024
    return peak - mark


class OpCount(TorchDispatchMode):
    """Counts the aten ops dispatched inside it, by name: where the host bounds a GPU's step, each
    is about one kernel launch."""

    def __init__(self):
        super().__init__()
        self.n = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n[str(func)] += 1
        return func(*args, **(kwargs or {}))
