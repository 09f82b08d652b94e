"""Distributed setup in one place: a small context from torchrun's variables, with a one-process fallback."""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from .errors import UserError, first_line


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
    #: Where the ranks met (``MASTER_ADDR:MASTER_PORT``), for the log; empty when running alone.
    rendezvous: str = ""

    @property
    def is_main(self) -> bool:
        """True on the one process that logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group with more than one member is up."""
        return self.world_size > 1


def gpu_index(local_rank: int, visible: int) -> int:
    """The GPU a process takes among the ``visible`` ones: the only one when the task sees one (SLURM's
    ``--gpus-per-task=1`` or ``--gpu-bind`` give each task its own), else its local rank's."""
    return 0 if visible == 1 else local_rank % visible


def resolve_device(kind: str, local_rank: int) -> torch.device:
    """``auto`` picks CUDA when available; each process takes one GPU (:func:`gpu_index`)."""
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("--device: got 'cuda' but no CUDA GPU is visible here; use --device cpu (or auto).",
                              collective=True)
        visible, local = torch.cuda.device_count(), local_world_size()
        if 1 < visible < local:
            raise DeviceError(f"--nproc_per_node (or tasks per node): {local} processes on this node but {visible} "
                              f"GPUs visible; start at most one process per GPU.", collective=True)
        index = gpu_index(local_rank, visible)
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def placement(ctx: "DistContext") -> list[str]:
    """Where every rank runs, in rank order: ``rank 0 on node1 (cuda:0 NVIDIA H200, pid 123)`` (collective)."""
    where = ctx.device.type if ctx.device.type == "cpu" else \
        f"{ctx.device} {torch.cuda.get_device_name(ctx.device)}"
    mine = f"rank {ctx.rank} on {socket.gethostname()} ({where}, pid {os.getpid()})"
    return [str(p) for p in all_gather_object(mine, ctx.control_group)]


class LaunchError(UserError):
    """The processes of a job cannot form their group (addresses, ports, task counts); the message says what
    to set."""


#: Network variables that choose the interface gloo (the control group, CPU runs) and NCCL use between nodes.
IFNAME_HINT = ("set GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME on GPUs) to the network interface that connects "
               "the nodes, e.g. GLOO_SOCKET_IFNAME=eth0")


def _launch_env() -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun/submitit variables, else from an srun step whose
    script exported MASTER_ADDR and MASTER_PORT (slurm/train.sbatch), else a single process. Values that are not
    integers, or that do not fit together (a leftover ``RANK=1`` in a shell), are one line on every process."""
    env = os.environ
    if "RANK" not in env and "SLURM_STEP_NUM_TASKS" in env and "MASTER_ADDR" in env and "MASTER_PORT" in env:
        _check_slurm_tasks(env)
        names = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NUM_TASKS")
    else:
        names = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    rank, local, world = (_env_int(n, d) for n, d in zip(names, (0, 0, 1)))
    r, lr, w = names
    fix = ("unset them (a leftover of another job?) to run one process, or launch with torchrun, srun or "
           "slurm/submit.py, which set them all")
    if world < 1:
        raise LaunchError(f"{w}={world}: must be at least 1 (the number of processes); {fix}.")
    if not 0 <= rank < world:
        told = f"{w}={world}" if w in env else f"{w} is not set (so 1 process)"
        raise LaunchError(f"{r}={rank} but {told}: a rank must be from 0 to {world - 1}; {fix}.")
    if local < 0 or local > rank:
        raise LaunchError(f"{lr}={local} does not fit {r}={rank}: a local rank is from 0 to the rank; {fix}.")
    local_world = _env_int("LOCAL_WORLD_SIZE", 0)
    if "LOCAL_WORLD_SIZE" in env and not (0 <= local < local_world <= world):
        raise LaunchError(f"LOCAL_WORLD_SIZE={local_world} does not fit {lr}={local} and {w}={world}: it counts "
                          f"the processes of this node; {fix}.")
    return rank, local, world


def _env_int(name: str, default: int) -> int:
    """An integer environment variable (``default`` when unset); anything else is one line naming it."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text.strip())
    except ValueError:
        raise LaunchError(f"{name}={text!r}: must be an integer; unset it, or launch with torchrun, srun or "
                          f"slurm/submit.py, which set it.") from None


def _check_slurm_tasks(env: "os._Environ[str] | dict[str, str]") -> None:
    """Every node of an srun step must run the same number of tasks: local ranks pick GPUs, and the global
    batch and the schedule assume it."""
    per_node = []
    for part in env.get("SLURM_STEP_TASKS_PER_NODE", "").split(","):
        count, _, repeat = part.partition("(x")
        if count.strip().isdigit():
            per_node += [int(count)] * int(repeat.rstrip(")") or 1)
    if len(set(per_node)) > 1:
        raise LaunchError(f"this srun step runs {env['SLURM_STEP_NUM_TASKS']} tasks on {len(per_node)} nodes, "
                          f"unevenly ({env['SLURM_STEP_TASKS_PER_NODE']} per node); give every node the same "
                          f"number: request --nodes N --ntasks-per-node K (not --ntasks).", collective=True)


#: How long a collective may wait for a peer before it raises (a peer that died or hangs).
TIMEOUT = datetime.timedelta(minutes=30)
#: How long a rank waits for all the others to join (CITYSEG_RDZV_TIMEOUT_S overrides it, for tests).
RDZV_TIMEOUT_S = 600.0


def _rdzv_timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("CITYSEG_RDZV_TIMEOUT_S", RDZV_TIMEOUT_S)))


def new_gloo_group() -> Any:
    """A gloo group of all ranks (collective: every rank calls it), for host-side traffic kept apart from the
    default group's."""
    try:
        return dist.new_group(backend="gloo", timeout=TIMEOUT)
    except (RuntimeError, ValueError) as e:
        raise LaunchError(f"the gloo group of the {dist.get_world_size()} ranks could not form ({first_line(e)}); "
                          f"{IFNAME_HINT}.") from None


def init(device: str = "auto") -> DistContext:
    """Join the process group described by torchrun/SLURM-style env variables, or run alone."""
    rank, local_rank, world = _launch_env()
    dev = resolve_device(device, local_rank)
    control = None
    if world > 1:
        if not dist.is_initialized():
            store = _rendezvous(rank, world)
            _check_addresses(store, rank, world)
            backend = "nccl" if dev.type == "cuda" else "gloo"
            kwargs: dict[str, Any] = {"device_id": dev} if dev.type == "cuda" else {}
            try:
                dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=TIMEOUT,
                                        **kwargs)
            except (RuntimeError, ValueError) as e:
                raise LaunchError(f"rank {rank} on {socket.gethostname()} could not join the {backend} process "
                                  f"group of {world} ranks ({first_line(e)}); {IFNAME_HINT}.") from None
        control = new_gloo_group()
    meeting = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}" if world > 1 else ""
    return DistContext(rank=rank, local_rank=local_rank, world_size=world, device=dev, control_group=control,
                       rendezvous=meeting)


def _rendezvous(rank: int, world: int) -> dist.Store:
    """The store the ranks meet in: torchrun's (keys scoped to this restart attempt), else a TCP store served
    by rank 0 at MASTER_ADDR:MASTER_PORT (SLURM, submitit). Each failure is one line naming the address."""
    env = os.environ
    if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        raise LaunchError(f"WORLD_SIZE is {world} but MASTER_ADDR and MASTER_PORT are not set; launch with "
                          f"torchrun, srun (slurm/train.sbatch) or slurm/submit.py, which set them.")
    addr = env["MASTER_ADDR"]
    if not env["MASTER_PORT"].isdigit() or not 0 < int(env["MASTER_PORT"]) < 65536:
        raise LaunchError(f"MASTER_PORT: got {env['MASTER_PORT']!r}; must be a port number (1-65535).")
    port = int(env["MASTER_PORT"])
    if "TORCHELASTIC_RESTART_COUNT" in env:
        return _elastic_store(rank, world, _rdzv_timeout())
    timeout = _rdzv_timeout()
    try:
        if rank != 0:  # wait for rank 0's store to listen, quietly (c10d logs every failed attempt)
            _wait_listening(addr, port, timeout.total_seconds())
        # A client that reaches some other program listening on the port may wait for its handshake forever:
        # the store is built in a thread, and given up on after the timeout. c10d logs every retry to stderr;
        # the one line below says what matters.
        with _quiet_stderr():
            return _within(timeout.total_seconds() + 2, dist.TCPStore, addr, port, world, is_master=rank == 0,
                           timeout=timeout, wait_for_workers=False)
    except (RuntimeError, ValueError, OSError, TimeoutError) as e:
        if rank == 0:
            raise LaunchError(f"rank 0 on {socket.gethostname()} could not serve the rendezvous at {addr}:{port} "
                              f"({first_line(e)}); if the port is taken, set MASTER_PORT to a free one, and "
                              f"MASTER_ADDR to this node's name.") from None
        error = LaunchError(f"rank {rank} on {socket.gethostname()} could not reach the rendezvous at "
                            f"{addr}:{port} within {timeout.total_seconds():g} s ({first_line(e)}); check that "
                            f"rank 0 started, that MASTER_ADDR names its node and MASTER_PORT is free there, and "
                            f"that {addr} is reachable from this node.")
        error.hard_exit = isinstance(e, TimeoutError)  # a store thread may still wait inside c10d
        raise error from None


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send what native code writes to stderr (file descriptor 2) to nowhere, for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _wait_listening(addr: str, port: int, seconds: float) -> None:
    """Return once something accepts TCP connections at ``addr:port``; TimeoutError after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection((addr, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"nothing answered: {e.strerror or e}") from None
            time.sleep(0.2)


def _within(seconds: float, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, or TimeoutError when it has not returned within ``seconds`` (left running in a
    daemon thread, which does not keep the process alive)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller below
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError("no answer: is another program listening at that port?")
    if "error" in box:
        raise box["error"]
    return box["value"]


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


def own_address() -> tuple[str, str]:
    """This host's name and the address gloo will advertise for it (what the name resolves to), or the
    interface GLOO_SOCKET_IFNAME names."""
    host = socket.gethostname()
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return host, "interface " + os.environ["GLOO_SOCKET_IFNAME"]
    try:
        return host, socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)[0][4][0]
    except OSError:
        return host, "unresolvable"


def _check_addresses(store: dist.Store, rank: int, world: int) -> None:
    """Before gloo connects anything: every rank publishes its host and address; when the ranks span several
    hosts, a host whose own name resolves to a loopback (or no) address could never be reached by the others,
    and every rank stops with the same line instead of waiting for a connection that cannot come."""
    host, addr = own_address()
    try:  # the store's first use: some torch versions only find out here that the peer is no store
        store.set(f"cityseg/host/{rank}", f"{host} {addr}")
        if rank == 0:  # rank 0 reads every rank's entry and publishes them in one key: O(world) requests
            store.set("cityseg/hosts", "\n".join(store.get(f"cityseg/host/{r}").decode() for r in range(world)))
        peers = [line.split(" ", 1) for line in store.get("cityseg/hosts").decode().splitlines()]
    except RuntimeError as e:
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise LaunchError(f"rank {rank} on {host}: the rendezvous at {where} failed before all {world} ranks met "
                          f"({first_line(e)}); check that every rank started with the same MASTER_ADDR and "
                          f"MASTER_PORT, and that the port belongs to rank 0's job.") from None
    if len({h for h, _ in peers}) < 2:
        return
    bad = sorted({(h, a) for h, a in peers if a == "unresolvable" or a.startswith("127.") or a == "::1"})
    if bad:
        names = ", ".join(f"{h} ({a})" for h, a in bad)
        verb = "resolves its" if len(bad) == 1 else "resolve their"
        raise LaunchError(f"the ranks run on {len({h for h, _ in peers})} hosts but {names} {verb} own name to a "
                          f"loopback address, which the other hosts cannot reach; {IFNAME_HINT}, or "
                          f"map each node's name to its network address in /etc/hosts.", collective=True)


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


def agree(fn: Any, group: Any = None) -> Any:
    """``fn()`` on every rank (collective): when it raises a :class:`UserError` on any rank, every rank raises
    the first such rank's line together, instead of the others waiting in their next collective for a rank
    that has gone."""
    error, value = "", None
    try:
        value = fn()
    except UserError as e:
        error = str(e)
    failed = [m for m in all_gather_object(error, group) if m]
    if failed:
        raise UserError(str(failed[0]), collective=True)
    return value


def local_world_size() -> int:
    """How many processes of the job run on this node (torchrun and submitit export it; srun steps with
    ``--ntasks-per-node`` give it to SLURM)."""
    env = os.environ
    text = env.get("LOCAL_WORLD_SIZE") or env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0] or "1"
    return int(text) if text.strip().isdigit() and int(text) > 0 else 1


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
