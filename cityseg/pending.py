"""A SLURM job that can never start says so: its pending reason, and what in the request exceeds the partition.

SLURM accepts some requests that no node of the partition can ever satisfy and leaves them pending forever
with a reason such as ``PartitionConfig`` (more CPUs per node than the nodes have) or ``PartitionNodeLimit``
(more nodes than the partition has). ``slurm/submit.py`` looks at a job shortly after submitting it and turns
such a state into one line, cancelling the job.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from typing import Any

from .errors import UserError

#: Pending reasons that no amount of waiting clears: the request exceeds what the partition, QOS or
#: association allows, or names something that does not exist.
NEVER = {
    "PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints", "InvalidAccount",
    "InvalidQOS", "QOSMaxCpuPerJobLimit", "QOSMaxNodePerJobLimit", "QOSMaxWallDurationPerJobLimit",
    "QOSMaxGRESPerJob", "AssocMaxCpuPerJobLimit", "AssocMaxNodePerJobLimit", "AssocMaxWallDurationPerJobLimit",
}
#: Reasons that can clear by themselves but often do not (nodes down, drained or reserved): reported, kept.
MAYBE = {"ReqNodeNotAvail", "NodeDown", "PartitionDown", "PartitionInactive"}


def _run(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def job_state(job_id: str) -> tuple[str, str]:
    """(state, reason) of a job from squeue, ("", "") once it has left the queue."""
    out = _run("squeue", "-h", "-j", job_id, "-o", "%T|%r")
    state, _, reason = out.partition("|")
    return state, reason.split(",")[0].strip()


def wait_for_verdict(job_id: str, seconds: float = 15.0) -> tuple[str, str]:
    """Poll a new job until it runs, leaves the queue or pends for a reason; return (state, reason)."""
    deadline = time.monotonic() + seconds
    state, reason = job_state(job_id)
    while time.monotonic() < deadline:
        if state != "PENDING" or reason in NEVER | MAYBE:
            break
        time.sleep(1.0)
        state, reason = job_state(job_id)
    return state, reason


@dataclass
class Partition:
    """What a partition offers, as far as a job's shape is concerned."""

    name: str
    nodes: int
    max_nodes: int | None  # None = unlimited
    cpus_per_node: int  # the most any of its nodes has
    gpus_per_node: int
    max_time_min: int | None  # None = unlimited


def partition(name: str | None) -> Partition | None:
    """The partition ``name`` (the default one when None), from scontrol and sinfo."""
    for line in _run("scontrol", "show", "partition", "-o").splitlines():
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if (name and fields.get("PartitionName") == name) or (not name and fields.get("Default") == "YES"):
            part = fields["PartitionName"]
            nodes = _run("sinfo", "-h", "-N", "-p", part, "-o", "%c %G").splitlines()
            cpus = max((int(n.split()[0]) for n in nodes if n.split()[0].isdigit()), default=0)
            gpus = max((_gpus(n.split()[1]) for n in nodes if len(n.split()) > 1), default=0)
            return Partition(part, int(fields.get("TotalNodes", 0)), _limit(fields.get("MaxNodes")), cpus, gpus,
                             _minutes(fields.get("MaxTime")))
    return None


def _limit(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


def _gpus(gres: str) -> int:
    """GPUs per node in an sinfo GRES column such as ``gpu:a100:8(S:0-1)``."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def _minutes(text: str | None) -> int | None:
    """A SLURM time limit (``days-hours[:minutes[:seconds]]``, ``hours:minutes:seconds``, ``minutes[:seconds]``)
    in minutes; None for UNLIMITED."""
    if not text or text in ("UNLIMITED", "INFINITE", "NONE"):
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days or len(parts) == 3:
        hours, minutes = parts[0], (parts[1] if len(parts) > 1 else 0)
    else:
        hours, minutes = 0, parts[0]
    return int(days or 0) * 1440 + hours * 60 + minutes


def what_exceeds(params: dict[str, Any], part: Partition) -> str:
    """The part of a submitit parameter set that partition ``part`` cannot give, in words."""
    nodes, tasks, cpus = params["nodes"], params["tasks_per_node"], params["cpus_per_task"]
    if nodes > part.nodes or (part.max_nodes is not None and nodes > part.max_nodes):
        limit = part.nodes if part.max_nodes is None else min(part.nodes, part.max_nodes)
        return f"it asks for {nodes} nodes but partition {part.name} gives at most {limit}; lower --nodes"
    if tasks * cpus > part.cpus_per_node:
        return (f"it asks for {tasks} tasks x {cpus} CPUs = {tasks * cpus} CPUs on each node but the nodes of "
                f"partition {part.name} have {part.cpus_per_node}; lower --tasks-per-node or --cpus-per-task")
    if params.get("gpus_per_node", 0) > part.gpus_per_node:
        return (f"it asks for {params['gpus_per_node']} GPUs per node but the nodes of partition {part.name} "
                f"have {part.gpus_per_node}; lower --gpus-per-node")
    if part.max_time_min is not None and params["timeout_min"] > part.max_time_min:
        return (f"it asks for {params['timeout_min']} minutes but partition {part.name} allows "
                f"{part.max_time_min}; lower --timeout-min")
    return f"the request does not fit partition {part.name}; compare it with `scontrol show partition {part.name}`"


def refuse_if_stuck(job_id: str, params: dict[str, Any], partition_name: str | None) -> str:
    """Raise :class:`StuckJobError` (after cancelling the job) if it pends for a reason that never clears;
    return a warning line for a reason that may not clear, else ""."""
    state, reason = wait_for_verdict(job_id)
    if reason in NEVER:
        part = partition(partition_name)
        why = what_exceeds(params, part) if part else "the request exceeds what the partition allows"
        _run("scancel", job_id)
        raise StuckJobError(f"job {job_id} can never start (pending, reason {reason}): {why}. It was cancelled.")
    if reason in MAYBE:
        return (f"warning: job {job_id} is pending ({reason}): the nodes it needs are down, drained or reserved; "
                f"it starts only when they return (scancel {job_id} to give up)")
    return ""


class StuckJobError(UserError):
    """A submitted job can never start; it was cancelled."""
