"""A CPU job whose ranks share a host leaves nothing in /dev/shm: DeepSpeed's shared-memory
all-reduce gives each rank a 67 MB workspace there and never removes it (every test launch used to
leave its ranks' workspaces in RAM). init_distributed removes the names once all ranks have mapped
them, and DeepSpeed's shared-memory all-reduce still works through the mappings afterwards."""
import os
import subprocess
import sys

from tests.dist_utils import free_port
from tests.train_utils import ROOT

CHILD = """
import torch, deepspeed.comm as ds
from megatron_onpolicy.parallel import state
state.init_distributed()
assert ds.comm.cdb.shm_comm_op is not None, "DeepSpeed's shm all-reduce is not in use"
t = torch.full((1000,), float(ds.get_rank() + 1))
ds.inference_all_reduce(t)  # through the shared workspaces, whose names are gone
assert torch.equal(t, torch.full((1000,), 3.0)), t[:4]
print("ok")
"""


def test_no_workspace_left_in_dev_shm():
    port = str(free_port())
    env = {**os.environ, "WORLD_SIZE": "2", "LOCAL_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and out.strip().endswith("ok"), out[-2000:] + err[-3000:]
    left = [n for n in os.listdir("/dev/shm") if n.startswith("deepspeed_allreduce_buffer") and f"_{port}_" in n]
    assert left == []
