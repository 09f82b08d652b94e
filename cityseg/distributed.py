"""Distributed setup in one place: a small context from torchrun's variables, with a one-process fallback."""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from .errors import UserError


class DeviceError(UserError):
    """The device asked for is not there."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the world size and the device it computes on."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    #: A gloo group for small host-side control messages (stop flags), kept off the GPU stream.
    control_group: Any = None

    @property
    def is_main(self) -> bool:
        """True on the one process that logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group with more than one member is up."""
        return self.world_size > 1


def resolve_device(kind: str, local_rank: int) -> torch.device:
    """``auto`` picks CUDA when available; each process takes the GPU of its local rank."""
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("--device: got 'cuda' but no CUDA GPU is visible here; use --device cpu (or auto).",
                              collective=True)
        if local_rank >= torch.cuda.device_count():
            raise DeviceError(f"--nproc_per_node: local rank {local_rank} has no GPU ({torch.cuda.device_count()} "
                              f"visible); start at most one process per GPU.")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _launch_env() -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun/submitit variables, else from an srun step whose
    script exported MASTER_ADDR and MASTER_PORT (slurm/train.sbatch), else a single process."""
    env = os.environ
    if "RANK" not in env and "SLURM_STEP_NUM_TASKS" in env and "MASTER_ADDR" in env and "MASTER_PORT" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_LOCALID"]), int(env["SLURM_STEP_NUM_TASKS"])
    return int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")), int(env.get("WORLD_SIZE", "1"))


#: How long a collective may wait for a peer before it raises (a peer that died or hangs).
TIMEOUT = datetime.timedelta(minutes=30)


def new_gloo_group() -> Any:
    """A gloo group of all ranks (collective: every rank calls it), for host-side traffic kept apart from the
    default group's."""
    return dist.new_group(backend="gloo", timeout=TIMEOUT)


def init(device: str = "auto") -> DistContext:
    """Join the process group described by torchrun/SLURM-style env variables, or run alone."""
    rank, local_rank, world = _launch_env()
    dev = resolve_device(device, local_rank)
    control = None
    if world > 1:
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            kwargs: dict[str, Any] = {"device_id": dev} if dev.type == "cuda" else {}
            if "TORCHELASTIC_RESTART_COUNT" in os.environ:
                kwargs["store"] = _elastic_store(rank, world, TIMEOUT)
            dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=TIMEOUT, **kwargs)
        control = new_gloo_group()
    return DistContext(rank=rank, local_rank=local_rank, world_size=world, device=dev, control_group=control)


def _elastic_store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store:
    """torchrun's store, with keys scoped to this restart attempt.

    Under ``--max-restarts`` the agent keeps one store across attempts; without a per-attempt prefix the
    restarted workers can read the gloo addresses of the workers they replace and fail to connect.
    """
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_hosts, timeout=timeout,
                          multi_tenant=not agent_hosts)
    return dist.PrefixStore(f"cityseg/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


def teardown() -> None:
    """Destroy the process group if one is up (safe to call on every exit path)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[DistContext]:
    """``with session() as ctx:`` initialises the group and always tears it down."""
    try:
        yield init(device)
    finally:
        teardown()


def is_enabled() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """The number of processes in the group (1 when running alone)."""
    return dist.get_world_size() if is_enabled() else 1


def barrier() -> None:
    """Wait for every rank; a no-op when running alone."""
    if is_enabled():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place and return it; a no-op when running alone."""
    if is_enabled():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_tensor(t: torch.Tensor) -> torch.Tensor:
    """Stack ``t`` from every rank along a new first dimension (``t[None]`` when running alone)."""
    if not is_enabled():
        return t[None]
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return torch.stack(out)


def all_gather_object(obj: object, group: Any = None) -> list[object]:
    """Every rank's ``obj``, in rank order (``[obj]`` when running alone)."""
    if not is_enabled():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable object from ``src`` to every rank."""
    if not is_enabled():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
