"""A one-node SLURM on this machine for tests (DESIGN.md section 5): Debian's slurmctld / slurmd,
auth/none, the controller and the node daemon on loopback ports, state, spool, logs and pid files
in a temporary folder; both daemons run in the foreground as children of the test, so they are
stopped by their PIDs whatever happens."""
import os
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from tests.dist_utils import free_port

NODE = "localhost"

CONF = """\
ClusterName=mot-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmUser=root
SlurmdUser=root
MpiDefault=none
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
SchedulerType=sched/builtin
KillWait=30
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def installed() -> bool:
    return all(shutil.which(x) for x in ("slurmctld", "slurmd", "sbatch", "scontrol"))


@contextmanager
def cluster(folder: Path):
    """Yields the environment for SLURM's client commands (SLURM_CONF set)."""
    folder = Path(folder)
    for sub in ("state", "spool"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    # CPUs: what the machine has (nproc would honour OMP_NUM_THREADS; a node of 1 CPU leaves a
    # 2-task job pending for ever).
    cpus = subprocess.run(["getconf", "_NPROCESSORS_ONLN"], capture_output=True, text=True, check=True).stdout.strip()
    conf = folder / "slurm.conf"
    conf.write_text(CONF.format(node=NODE, dir=folder, cpus=cpus, ctld_port=free_port(), slurmd_port=free_port()))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = []
    try:
        daemons.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(conf)], env=env,
                                        stdout=subprocess.DEVNULL, stderr=open(folder / "slurmctld.err", "w")))
        daemons.append(subprocess.Popen(["slurmd", "-D", "-N", NODE, "-f", str(conf)], env=env,
                                        stdout=subprocess.DEVNULL, stderr=open(folder / "slurmd.err", "w")))
        deadline = time.time() + 60
        while True:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=env, capture_output=True, text=True).stdout
            if out.strip() in ("idle", "mix", "alloc"):
                break
            if time.time() > deadline or any(d.poll() is not None for d in daemons):
                raise RuntimeError(f"the test cluster did not come up (node state {out.strip()!r}):\n"
                                   + log_tail(folder))
            time.sleep(0.2)
        yield env
    finally:
        for d in reversed(daemons):
            d.terminate()
        for d in reversed(daemons):
            try:
                d.wait(timeout=20)
            except subprocess.TimeoutExpired:
                d.kill()
                d.wait()


def log_tail(folder: Path, n=3000) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-n:]}" for p in sorted(Path(folder).glob("slurm*.log")) +
                     sorted(Path(folder).glob("*.err")) if p.is_file())
