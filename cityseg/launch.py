"""SLURM (and local) jobs through submitit: one task per GPU, requeued on timeout or preemption.

Each task sets up torch.distributed from SLURM's variables with submitit's ``TorchDistributedEnvironment``
(no torchrun inside), then calls the same entry points as train.py and evaluate.py. Requeueing is trivial
because training always resumes from its ``--out-dir``: on USR2 (timeout or preemption) the training loop
stops all ranks at one step and saves; then rank 0 lets submitit call :meth:`Job.checkpoint`, which
resubmits the very same arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

import submitit

from .config import EvalConfig, OneLineParser, parse_config
from .errors import UserError, one_line
from .eval_job import run_evaluation
from .pending import refuse_if_stuck

SCRIPTS = ("train", "evaluate")


class Job(submitit.helpers.Checkpointable):
    """The job submitit runs on every task: train.py or evaluate.py with the given arguments."""

    def __init__(self, script: str, argv: Sequence[str], workdir: str):
        self.script, self.argv, self.workdir = script, list(argv), workdir

    def __call__(self) -> Any:
        os.chdir(self.workdir)  # relative paths mean what they meant where the job was submitted
        # GPUs are chosen by LOCAL_RANK (cityseg.distributed), so every task keeps seeing all of its node's.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        try:
            if self.script == "evaluate":
                return run_evaluation(parse_config(self.argv, EvalConfig))
            from .engine import train  # imported here so evaluation jobs do not pay for it

            result = train(parse_config(self.argv))
        except UserError as e:  # the line train.py prints, in the task's log; submitit records the failure
            # Raised even when train.py would leave with os._exit (e.hard_exit): submitit writes this task's
            # result file only on the way out, and `submit.py --wait` waits for every task's.
            if not e.collective or os.environ.get("RANK", "0") == "0":
                print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
            raise
        if result["stopped_by"]:
            self._hand_back(result["stopped_by"])
        return result

    def _hand_back(self, signum: int) -> None:
        """Training stopped on a signal and saved: give the signal to submitit's own handler, which (on rank
        0) calls :meth:`checkpoint` and requeues the job. On a plain SIGTERM (preemption) SLURM requeues a
        requeueable job by itself."""
        handler = signal.getsignal(signum)
        if callable(handler):
            handler(signum, None)
        sys.exit(128 + signum)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Resubmit the same arguments: the new job resumes from the out dir's last checkpoint."""
        return submitit.helpers.DelayedSubmission(Job(self.script, self.argv, self.workdir))


def at_least(low: int) -> Any:
    """An argparse type: an integer >= ``low`` (a bad value is one line naming the flag)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"got {text!r}; must be an integer >= {low}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The cluster options of slurm/submit.py; what follows ``--`` goes to train.py or evaluate.py."""
    p = OneLineParser(
        prog="slurm/submit.py", description="Submit cityseg training or evaluation to SLURM with submitit.",
        usage="%(prog)s [cluster options] -- [train.py or evaluate.py options]",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--script", choices=SCRIPTS, default="train", help="Which entry point the job runs.")
    p.add_argument("--nodes", type=at_least(1), default=1, help="Nodes.")
    p.add_argument("--gpus-per-node", type=at_least(0), default=0, help="GPUs per node (0 for CPU jobs).")
    p.add_argument("--tasks-per-node", type=at_least(1), default=None, help="Tasks per node (default: one per GPU).")
    p.add_argument("--cpus-per-task", type=at_least(1), default=8, help="CPU cores per task (for DataLoader workers).")
    p.add_argument("--mem", default=None, help="Memory per node, e.g. 256G (SLURM --mem).")
    p.add_argument("--partition", default=None, help="SLURM partition.")
    p.add_argument("--account", default=None, help="SLURM account.")
    p.add_argument("--qos", default=None, help="SLURM quality of service.")
    p.add_argument("--constraint", default=None, help="SLURM node constraint, e.g. a100.")
    p.add_argument("--nodelist", default=None, help="Run on these nodes (SLURM --nodelist), e.g. node[3-4].")
    p.add_argument("--exclude", default=None, help="Never on these nodes (SLURM --exclude).")
    p.add_argument("--timeout-min", type=at_least(1), default=24 * 60, help="Time limit of one job in minutes; the job "
                   "gets USR2 2 minutes before, saves and requeues itself.")
    p.add_argument("--job-name", default="cityseg", help="SLURM job name.")
    p.add_argument("--folder", default="slurm_logs/%j", help="Where submitit writes logs and pickles "
                   "(%%j becomes the job id).")
    p.add_argument("--max-requeues", type=at_least(0), default=10, help="How many times a timed-out job may requeue.")
    p.add_argument("--signal-delay-s", type=at_least(0), default=120, help="Seconds before the time limit that USR2 "
                   "comes (at most half of --timeout-min).")
    p.add_argument("--local", action="store_true", help="Run through submitit's local executor (no SLURM).")
    p.add_argument("--wait", action="store_true", help="Block until the job ends and print its result.")
    p.add_argument("--dry-run", action="store_true", help="Print the sbatch script instead of submitting.")
    return p


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Cluster options before ``--``, the entry point's options after it."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def executor_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """submitit parameters for these cluster options."""
    tasks = args.tasks_per_node or max(args.gpus_per_node, 1)
    params: dict[str, Any] = dict(nodes=args.nodes, tasks_per_node=tasks, cpus_per_task=args.cpus_per_task,
                                  timeout_min=args.timeout_min, name=args.job_name)
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    slurm = {"partition": args.partition, "account": args.account, "qos": args.qos,
             "constraint": args.constraint, "mem": args.mem}
    params.update({f"slurm_{k}": v for k, v in slurm.items() if v})
    params["slurm_signal_delay_s"] = args.signal_delay_s
    params["slurm_additional_parameters"] = {"requeue": True, **{k: v for k, v in (("nodelist", args.nodelist),
                                                                                  ("exclude", args.exclude)) if v}}
    return params


def check_cluster_args(args: argparse.Namespace) -> None:
    """Options that parse but cannot work together: USR2 due before the job could train, a log folder that
    cannot be created."""
    limit_s = args.timeout_min * 60
    if args.signal_delay_s > limit_s / 2:
        raise UserError(f"--signal-delay-s {args.signal_delay_s} leaves no time to train within --timeout-min "
                        f"{args.timeout_min}: USR2 must come at most half the time limit before its end; pass "
                        f"--timeout-min {math.ceil(2 * args.signal_delay_s / 60)} or more, or --signal-delay-s "
                        f"{limit_s // 2} or less.")
    parts = Path(args.folder).parts
    fixed = Path(*parts[:next((i for i, c in enumerate(parts) if "%" in c), len(parts))]).absolute()  # before %j
    existing = next(p for p in (fixed, *fixed.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"--folder {args.folder}: {existing} is a file, not a directory, so the job's logs cannot "
                        f"go there; pass a folder under a directory (default slurm_logs/%j).")
    if not os.access(existing, os.W_OK):
        raise UserError(f"--folder {args.folder}: {existing} is not writable for you; pass a folder you can write.")


def check_entry_args(script: str, argv: Sequence[str]) -> None:
    """Parse the entry point's options now, so a typo fails here and not hours later in the queue."""
    if script == "evaluate":
        parse_config(argv, EvalConfig)
    else:
        parse_config(argv)


def sbatch_script(args: argparse.Namespace) -> str:
    """The sbatch script submitit would submit for these options (for --dry-run)."""
    from submitit.slurm import slurm

    p = executor_parameters(args)
    sbatch = dict(job_name=p["name"], nodes=p["nodes"], ntasks_per_node=p["tasks_per_node"],
                  cpus_per_task=p["cpus_per_task"], time=p["timeout_min"], gpus_per_node=p.get("gpus_per_node"),
                  signal_delay_s=p["slurm_signal_delay_s"], additional_parameters=p["slurm_additional_parameters"],
                  **{k[len("slurm_"):]: v for k, v in p.items()
                     if k.startswith("slurm_") and k not in ("slurm_signal_delay_s", "slurm_additional_parameters")})
    folder = Path(args.folder).absolute()
    return slurm._make_sbatch_string(command=f"{sys.executable} -u -m submitit.core._submit {folder}",
                                     folder=folder, **sbatch)


def submit(argv: Sequence[str] | None = None) -> int:
    """The slurm/submit.py command."""
    cluster, entry = split_argv(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(cluster)
    check_cluster_args(args)
    check_entry_args(args.script, entry)
    if args.dry_run:
        print(sbatch_script(args))
        return 0
    executor = submitit.AutoExecutor(folder=args.folder, cluster="local" if args.local else "slurm",
                                     slurm_max_num_timeout=args.max_requeues)
    executor.update_parameters(**executor_parameters(args))
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's stderr; the message has it
            job = executor.submit(Job(args.script, entry, os.getcwd()))
    except submitit.core.utils.FailedJobError as e:  # sbatch refused the request
        lines = [line for line in str(e).splitlines() if "error" in line.lower()] or [str(e).strip()]
        raise UserError("sbatch refused the job: " + "; ".join(x.split("error:")[-1].strip() for x in lines)) from None
    print(f"Submitted job {job.job_id}")
    if not args.local:
        warning = refuse_if_stuck(str(job.job_id), executor_parameters(args), args.partition)
        if warning:
            print(warning, file=sys.stderr)
    print(f"logs: {Path(str(job.paths.stdout).replace('%t', '0'))} (task 0; one file per task)")
    if not args.wait:
        return 0
    try:
        result = job.results()[0]  # one result per task; rank 0's speaks for the job
    except Exception as e:  # submitit re-raises the job's failure with its remote traceback
        said = re.findall(r"^cityseg\.[\w.]+Error: (.+)$", str(e), re.M)  # a user error's line, if that was it
        print(f"error: job {job.job_id} failed: {said[-1]}" if said else
              f"error: job {job.job_id} failed ({type(e).__name__}); see its logs in {job.paths.folder}",
              file=sys.stderr)
        return 1
    print(f"job {job.job_id} finished: {result}")
    return 0
