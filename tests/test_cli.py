"""cli.run: a user error is one line on stderr and exit status 2; printed once (by rank 0) where
every rank raises it alike, and by the rank itself where it may be that rank's alone."""
import socket
import subprocess
import sys

from tests.dist_utils import free_port
from tests.train_utils import BIN, ROOT

SCRIPT = """
import sys
import torch.distributed as dist
from megatron_onpolicy import cli
from megatron_onpolicy.data import DataError
from megatron_onpolicy.parallel import state

def main():
    state.init_distributed(1)
    if sys.argv[1] == "agreed":
        raise DataError("data.jsonl:3: field 'prompt' missing", every_rank=True)
    if dist.get_rank() == 1:
        raise FileNotFoundError("--load run: no such folder")  # e.g. a node-local folder this node lacks
    dist.barrier()  # where rank 0 waits for the others

cli.run(main, "tool")
"""


def run(tmp_path, case):
    script = tmp_path / "tool.py"
    script.write_text(SCRIPT)
    return subprocess.run([str(BIN / "torchrun"), "--nnodes=1", "--nproc_per_node=2", "--rdzv-backend=c10d",
                           f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(script), case],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_an_error_of_one_rank_is_printed_by_that_rank(tmp_path):
    """Rank 0 prints nothing (it waits in a collective until the launcher stops it): before, nor
    did the rank that had the error, so the job ended with no word of why."""
    out = run(tmp_path, "mine")
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.startswith("tool: error")]
    assert lines == [f"tool: error on rank 1 ({socket.gethostname()}): --load run: no such folder"], out.stderr[-3000:]


def test_an_error_every_rank_has_is_printed_once(tmp_path):
    out = run(tmp_path, "agreed")
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if "error" in line and "field 'prompt'" in line]
    assert lines == ["tool: error: data.jsonl:3: field 'prompt' missing"], out.stderr[-3000:]
