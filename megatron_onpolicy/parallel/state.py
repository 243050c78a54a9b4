"""Process groups for tensor (TP), data (DP) and pipeline (PP) parallelism.

Rank layout is DeepSpeed's `PipeModelDataParallelTopology`: TP fastest, then DP, then PP, so
that a DeepSpeed `PipelineModule` built on the same topology agrees with our groups. The module
itself is the `mpu` that `deepspeed.initialize(mpu=...)` accepts (as in GPT-NeoX).
"""
import datetime
import os
import re

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

_TOPOLOGY = None
_GROUPS = {}
_NODE_RANK = None  # the launcher's LOCAL_RANK, before init_distributed makes it a GPU ordinal


class ParallelLayoutError(ValueError):
    every_rank = True  # from the flags and the world size alone (see cli.run)


def init_distributed(timeout_minutes: float = 10) -> None:
    """Join the job started by the deepspeed launcher, torchrun, srun or mpirun. timeout_minutes:
    how long a collective may wait (Megatron's --distributed-timeout-minutes).

    deepspeed.comm reads the launcher's environment (deepspeed, torchrun); under an MPI launcher
    (mpirun, mpiexec) DeepSpeed's MPI discovery writes that environment first. An srun step's tasks
    (with or without srun's PMI plugin) are placed by SLURM's variables, translated here."""
    if dist.is_initialized():
        return
    import deepspeed
    from deepspeed.comm import comm as ds_comm

    env = os.environ
    if "RANK" not in env and _mpi_launched(env):
        # Here, not inside init_distributed: LOCAL_RANK must be a GPU ordinal before NCCL binds.
        # The port as the deepspeed launcher (--launcher mpich/impi) or the user exported it: the
        # discovery would otherwise write its default, 29500, whatever the job was given.
        ds_comm.mpi_discovery(distributed_port=int(env.get("MASTER_PORT", 29500)), verbose=False)
    elif "RANK" not in env and srun_task(env):
        for key, value in slurm_env(env).items():
            env.setdefault(key, value)
    elif "RANK" not in env:  # plain `python tool.py`, also inside a batch script
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    elif "LOCAL_RANK" not in env:  # a script that exported RANK itself (RANK=$SLURM_PROCID, say)
        env["LOCAL_RANK"] = local_rank_of(env)

    _share_cpu_cores()
    cuda = torch.cuda.is_available()
    if cuda and "LOCAL_RANK" in env:
        # Before the process group: DeepSpeed binds NCCL to cuda:LOCAL_RANK, out of range on a
        # task that sees one GPU (srun --gpus-per-task=1) unless LOCAL_RANK is its ordinal.
        torch.cuda.set_device(_local_rank_as_gpu_ordinal(torch.cuda.device_count()))
    timeout = datetime.timedelta(minutes=timeout_minutes)
    # Every later group too, DeepSpeed's pipeline groups included, which it makes without a
    # timeout: torch's default for those is 10 minutes (NCCL), whatever the flag says.
    distributed_c10d.default_pg_timeout = distributed_c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False, verbose=False,
                               timeout=timeout)
    _unlink_shm_workspace()


LOCAL_RANK_VARS = ("SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")  # srun, Open MPI, MPICH


def local_rank_of(env) -> str:
    """A rank's index on its node where RANK is set and LOCAL_RANK is not: from its launcher's
    variables, or 0 in a world of one. Without it every rank of a node would take GPU 0 (NCCL:
    "Duplicate GPU detected"), and DeepSpeed's engine stops for want of LOCAL_RANK."""
    for key in LOCAL_RANK_VARS:
        if key in env:
            return env[key]
    if env.get("WORLD_SIZE", "1") == "1":
        return "0"
    raise ParallelLayoutError("RANK is set but LOCAL_RANK is not, and no launcher variable gives it "
                              f"({', '.join(LOCAL_RANK_VARS)}): export LOCAL_RANK, the rank's index on its node")


def srun_task(env) -> bool:
    """A task of an srun step. The batch script has SLURM_PROCID too (0), but no step variables:
    a plain `python tool.py` there is a job of one process, not rank 0 of SLURM_NTASKS."""
    return "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env


def _mpi_launched(env) -> bool:
    """Started by an MPI launcher. srun's own PMI plugin (--mpi=pmi2) sets PMI_RANK as well, equal
    to the task's SLURM_PROCID; an MPI launcher inside an allocation starts its ranks from srun
    steps of its own (one task a node), whose SLURM_PROCID is not the rank."""
    if "OMPI_COMM_WORLD_RANK" in env:
        return True
    if "PMI_RANK" not in env:
        return False
    return not (srun_task(env) and env["PMI_RANK"] == env["SLURM_PROCID"]
                and env.get("PMI_SIZE", env["SLURM_STEP_NUM_TASKS"]) == env["SLURM_STEP_NUM_TASKS"])


def _local_rank_as_gpu_ordinal(visible: int) -> int:
    """DeepSpeed's engine and PipelineModule take LOCAL_RANK as the device ordinal: make it one,
    and keep the launcher's value for node_local_rank()."""
    global _NODE_RANK
    _NODE_RANK = int(os.environ.get("LOCAL_RANK", "0"))
    ordinal = local_device(_NODE_RANK, visible)
    os.environ["LOCAL_RANK"] = str(ordinal)
    return ordinal


def node_local_rank() -> int:
    """This process's rank among the processes of its node; 0 does the node's shared work (the
    data cache). Not LOCAL_RANK once it is a GPU ordinal: 0 on every task that sees one GPU."""
    return int(os.environ.get("LOCAL_RANK", "0")) if _NODE_RANK is None else _NODE_RANK


def _unlink_shm_workspace() -> None:
    """DeepSpeed's CPU all-reduce for ranks all on one host gives every rank a 67 MB workspace in
    /dev/shm (its shm_comm op) and never removes it, so each CPU job would leave its ranks'
    workspaces in RAM for good. Every rank maps all the others' within init_distributed; after a
    barrier each removes the name of its own, and the mappings live on until the process ends."""
    if torch.cuda.is_available():  # (the same on every rank: all or none pass the barrier)
        return
    dist.barrier()
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")  # csrc/cpu/comm/shm.cpp's naming
    if os.path.exists(name):
        os.unlink(name)


def local_device(local_rank: int, visible: int) -> int:
    """The GPU ordinal of a rank: one task per GPU of a node sees them all (ordinal = local rank);
    `srun --gpus-per-task=1` shows each task only its own (ordinal 0 for all)."""
    return local_rank % visible


def _share_cpu_cores() -> None:
    """On CPU the ranks of a node split its cores. torch's default, every core for every process,
    oversubscribes them, and gloo collectives then wait on descheduled threads (the T = 3
    quickstart on 2 cores: 18 s an iteration instead of 7). An explicit OMP_NUM_THREADS wins."""
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return
    # (srun's SLURM_STEP_TASKS_PER_NODE reads like "2(x3),1": tasks on the first nodes)
    local = next((int(re.match(r"\d+", os.environ[k]).group()) for k in (
        "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_STEP_TASKS_PER_NODE")
        if k in os.environ), 1)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local))


def slurm_env(env) -> dict:
    """torch.distributed's variables for one task of an srun step. The rendezvous is the first
    node of the step (which need not be the job's: `srun --exclude`) on a port derived from the
    job id, so jobs sharing a node do not collide."""
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "127.0.0.1")
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"), "MASTER_ADDR": first_host(nodes),
            "MASTER_PORT": str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)}


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu-a[007-009,012],gpu-b1' -> 'gpu-a007'."""
    first = re.match(r"[^,\[]*(\[[^\]]*\][^,\[]*)*", nodelist).group(0)
    return re.sub(r"\[([^\],-]*)[^\]]*\]", r"\1", first)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_layout(world_size: int, tp: int, pp: int, num_heads: int = None,
                 num_kv_heads: int = None) -> int:
    """Validate a TP x PP layout before any work starts; returns the data-parallel size."""
    if tp < 1 or pp < 1:
        raise ParallelLayoutError(f"tensor/pipeline parallel sizes must be >= 1, got TP={tp} PP={pp}")
    for name, n in (("attention heads", num_heads), ("key/value heads", num_kv_heads)):
        if n is not None and n % tp:
            raise ParallelLayoutError(
                f"tensor-model-parallel-size {tp} does not divide the model's {n} {name}")
    if world_size % (tp * pp):
        raise ParallelLayoutError(
            f"world size {world_size} is not divisible by TP x PP = {tp} x {pp}")
    return world_size // (tp * pp)


def initialize_model_parallel(tp: int = 1, pp: int = 1) -> None:
    """Create the TP / DP / PP groups (every rank must call this, in the same order)."""
    global _TOPOLOGY
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    world = dist.get_world_size()
    dp = check_layout(world, tp, pp)
    _TOPOLOGY = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    rank = dist.get_rank()
    _GROUPS.clear()
    for axis in ("model", "data"):  # DeepSpeed's PipelineModule makes the pipeline's own groups
        for ranks in _TOPOLOGY.get_axis_comm_lists(axis):
            group = dist.new_group(ranks)  # collective: all ranks create all groups
            if rank in ranks:
                _GROUPS[axis] = group


def is_initialized() -> bool:
    return _TOPOLOGY is not None


def topology():
    return _TOPOLOGY


def _coord(axis: str) -> int:
    return getattr(_TOPOLOGY.get_coord(dist.get_rank()), axis)


# Tensor parallel ("model" in DeepSpeed's vocabulary).
def get_tensor_model_parallel_group():
    return _GROUPS["model"]


def get_tensor_model_parallel_world_size() -> int:
    return _TOPOLOGY.get_dim("model")


def get_tensor_model_parallel_rank() -> int:
    return _coord("model")


def get_data_parallel_group():
    return _GROUPS["data"]


def get_data_parallel_world_size() -> int:
    return _TOPOLOGY.get_dim("data")


def get_data_parallel_rank() -> int:
    return _coord("data")


def get_pipeline_model_parallel_world_size() -> int:
    return _TOPOLOGY.get_dim("pipe")


def get_pipeline_model_parallel_rank() -> int:
    return _coord("pipe")


# The names DeepSpeed's engine calls on an mpu.
get_model_parallel_group = get_tensor_model_parallel_group
get_model_parallel_world_size = get_tensor_model_parallel_world_size
get_model_parallel_rank = get_tensor_model_parallel_rank
