"""The training engine: ``train(cfg)`` builds everything from a config, resumes, loops and tears down."""

from __future__ import annotations

import collections
import contextlib
import inspect
import os
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import checkpoint as ckpt
from . import distributed as du
from .config import TrainConfig, save_yaml
from .data import (CityscapesDataset, TrainSampler, check_shared_memory, make_loader, sample_bytes, shutdown,
                   worker_death)
from .errors import DataError, UserError, first_line, one_line
from .evaluation import EvaluationStopped, Predictor, evaluate, make_pictures, val_loader
from .labels import IGNORE_INDEX
from .logger import RunLogger, resolve_wandb_mode
from .ema import EMA
from .losses import LOSSES, aux_ce_sum
from .models import model_from_config
from .models.common import set_drop_path
from .models.weights import check_weights, load_encoder_weights, read_weight_file, resolve_weights
from .optim import build_optimizer, lr_factor
from .precision import amp_dtype, autocast
from .resume import check_resume, load_optimizer
from .runlock import own_directory
from .signals import DATA_ERROR, StopFlag, name
from .syncbn import convert_sync_batchnorm
from .transforms import TrainTransform, to_input, to_target
from .watchdog import Watchdog


#: What to do after each kind of failure that stops the ranks together (the end of their one line).
FIX_FILE = "fix or remove that file (with its image or label)"
FREE_SPACE = "free space or fix permissions there"
FEWER_WORKERS = "lower --workers or --batch-size, or give the job more memory,"


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; the run stops before writing a checkpoint."""

    collective = True


#: A new run's starting weights besides the seeded initialisation: ("model", state) from --init-from, or
#: ("encoder", state) from --encoder-weights.
Start = tuple[str, dict[str, torch.Tensor]]


def initial_weights(cfg: TrainConfig, ctx: du.DistContext) -> Start | None:
    """The weights a new run starts from, read and checked on every rank before anything is written (a bad
    file is one line); the local rank 0 of each node fetches an ImageNet file first. None when the run
    directory has a checkpoint to resume, or nothing is asked for."""
    resuming = du.broadcast_object(ckpt.has_checkpoint(cfg.out_dir) if ctx.is_main else None)  # rank 0 decides
    if resuming or not (cfg.init_from or (cfg.encoder and cfg.encoder_weights != "none")):
        return None
    group = ctx.control_group
    if cfg.init_from:
        return "model", du.agree(lambda: _init_weights(cfg), group)
    fetched = du.agree(lambda: resolve_weights(cfg.encoder, cfg.encoder_weights) if ctx.local_rank == 0 else None,
                       group)  # one download per node, the node's other ranks waiting in the agreement
    path = du.agree(lambda: fetched or resolve_weights(cfg.encoder, cfg.encoder_weights), group)
    return "encoder", du.agree(lambda: load_encoder_weights(path, cfg.encoder), group)


def _init_weights(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """--init-from's model weights, checked against the model's keys and shapes (the auxiliary head may differ)."""
    state = read_weight_file(Path(cfg.init_from))
    with torch.device("meta"):  # the keys and shapes the model has, without building its weights
        expected = model_from_config(cfg.to_dict(), aux=cfg.aux_weight > 0).state_dict()
    check_weights(state, expected, Path(cfg.init_from), f"--model {cfg.model}",
                  optional=lambda k: k.startswith("aux_head."))
    return state


def check_model_fits(cfg: TrainConfig, device: torch.device) -> None:
    """Refuse, before anything is allocated, a model whose fp32 weights, gradients and two optimizer moments alone
    exceed the device's memory (a typo in ``--width`` or ``--decoder-channels``)."""
    with torch.device("meta"):
        count = sum(p.numel() for p in model_from_config(cfg.to_dict(), aux=cfg.aux_weight > 0).parameters())
    need = 16 * count
    if device.type == "cuda":
        have, where = torch.cuda.get_device_properties(device).total_memory, f"{device}'s memory"
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"
    if need > have:
        name = "width" if cfg.model == "unet" else "decoder_channels"
        raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: --model {cfg.model} would have "
                        f"{count / 1e9:.1f} billion parameters, {need / 2**30:,.0f} GiB for its weights, gradients and "
                        f"optimizer state in fp32 alone, more than the {have / 2**30:,.0f} GiB of {where}; use "
                        f"smaller widths.", collective=True)


def build_model_for(cfg: TrainConfig, ctx: du.DistContext, start: Start | None = None) -> tuple[nn.Module, nn.Module]:
    """The model of ``--model`` on the device, channels_last, started from ``start`` if given, and its DDP
    wrapper; synchronised BatchNorm when distributed, and our CPU BatchNorm on every CPU run."""
    torch.manual_seed(cfg.seed)  # same initial weights on every rank and in every run
    model = model_from_config(cfg.to_dict(), aux=cfg.aux_weight > 0)
    if start is not None:
        kind, state = start
        (model.encoder if kind == "encoder" else model).load_state_dict(state, strict=kind == "encoder")
    set_drop_path(model, cfg.drop_path, ctx.rank, ctx.world_size)
    if ctx.device.type == "cpu":
        # Our own BatchNorm on CPU, also alone: PyTorch's channels_last CPU kernel takes its statistics with
        # errors tens of times those of its NCHW one (tests/test_syncbn.py measures both), ours stays at NCHW's.
        # Between processes its small sums go through a gloo group of their own: on the default group they
        # would queue behind DDP's gradient buckets.
        group = du.new_gloo_group() if ctx.distributed else None
        model = convert_sync_batchnorm(model, ctx.device, group)
    elif ctx.distributed:
        model = convert_sync_batchnorm(model, ctx.device)
    # channels_last on every device: cuDNN's and oneDNN's convolutions both prefer it (on CPU, one thread,
    # width 16 at 256x512, bench/run.py's one-process step fell from 1.00-1.04 s to 0.87-0.89 s).
    model = model.to(ctx.device, memory_format=torch.channels_last)
    if not ctx.distributed:
        return model, model
    # Synchronised BatchNorm keeps the running statistics equal on every rank, so DDP need not broadcast them
    # before each forward (a collective per step). torch 2.13 renamed the switch and deprecated the old name.
    # DDP does broadcast rank 0's weights at construction: every rank starts identical.
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
                      else {"broadcast_buffers": False})
    ddp = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
              gradient_as_bucket_view=True, **no_buffer_sync)
    return model, ddp


def build_ema(cfg: TrainConfig, model: nn.Module, device: torch.device) -> EMA | None:
    """The moving average of ``--ema-decay`` (None when 0), on a plain copy of the model (no process group)."""
    if not cfg.ema_decay:
        return None
    plain = model_from_config(cfg.to_dict(), aux=cfg.aux_weight > 0)
    plain.load_state_dict(ckpt.model_state(model))
    return EMA(plain.to(device, memory_format=torch.channels_last).eval(), cfg.ema_decay)


class Trainer:
    """Owns the state of one run; ``fit()`` trains from wherever the state stands to ``max_iters``."""

    def __init__(self, cfg: TrainConfig, ctx: du.DistContext, stop: StopFlag, start: Start | None = None,
                 watchdog: Watchdog | None = None):
        self.cfg, self.ctx, self.stop = cfg, ctx, stop
        self.watchdog = watchdog or Watchdog(0, cfg.out_dir)  # a timeout of 0 never starts watching
        self.out = Path(cfg.out_dir)
        self.channels_last = True  # inputs in the model's memory format
        self.dtype = amp_dtype(cfg.amp, ctx.device)
        train_set = CityscapesDataset(cfg.data_root, cfg.train_split,
                                      TrainTransform(cfg.crop_hw, (cfg.scale_min, cfg.scale_max), cfg.seed,
                                                     cfg.cat_max_ratio, cfg.photometric),
                                      cache_dir=cfg.cache_dir or None)
        self.sampler = TrainSampler(len(train_set), cfg.batch_size, ctx.world_size, ctx.rank, cfg.seed)
        pin = ctx.device.type == "cuda"
        self.loader = make_loader(train_set, self.sampler, cfg.batch_size, cfg.workers, pin, drop_last=True)
        self.val, self.val_set = val_loader(cfg.data_root, cfg.val_split, ctx, min(cfg.workers, 2),
                                            cfg.max_val_images)
        du.agree(lambda: check_shared_memory([(cfg.workers, cfg.batch_size * cfg.crop_hw[0] * cfg.crop_hw[1] * 4),
                                              (min(cfg.workers, 2), sample_bytes(self.val_set))],
                                             du.local_world_size()), ctx.control_group)
        self.model, self.ddp = build_model_for(cfg, ctx, start)
        self.forward = torch.compile(self.ddp) if cfg.compile else self.ddp
        self.ema = build_ema(cfg, self.model, ctx.device)
        evaluated = self.ema.module if self.ema is not None else self.model  # the weights evaluation uses
        self.predictor = Predictor(evaluated, ctx.device, self.dtype, self.channels_last)
        self.optimizer = build_optimizer(cfg, self.model, ctx.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda it: lr_factor(it, cfg))
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=self.dtype == torch.float16)
        self.iteration, self.epoch, self.step_in_epoch = 0, 0, 0
        self.best_miou, self.wandb_id, self.stopped_by = -1.0, None, 0
        self._saved_at = -1  # the iteration of the last periodic checkpoint this run wrote
        self.eval_pending = False  # an evaluation of this iteration began and has not completed
        self._failure: tuple[str, str] | tuple[()] = ()  # (what failed, what to do) on this rank
        self.window = _Window(ctx.device)
        self.log = RunLogger(self.out, ctx.is_main)

    # -- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly (collective: every rank must call it)."""
        return {
            "model": ckpt.model_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_batch": self.sampler.global_batch,
            "world_size": self.ctx.world_size,
            "log_window": du.all_gather_tensor(self.window.sums).cpu(),
            "best_miou": self.best_miou,
            "eval_pending": self.eval_pending,
            "config": self.cfg.to_dict(),
            "ema": self.ema.state() if self.ema is not None else None,
            "rng": ckpt.rng_state(),
            "wandb_id": self.wandb_id,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint written by :meth:`state_dict`, on any number of processes."""
        self.model.load_state_dict(state["model"])
        load_optimizer(self.optimizer, self.scheduler, state, self.cfg, self.model)  # today's hyper-parameters
        if self.scaler.is_enabled() and not state["scaler"]:
            self.log.info(f"the checkpoint was trained with --amp {state['config'].get('amp')}, without a "
                          f"GradScaler; fp16 training continues with a fresh one (scale {self.scaler.get_scale():g})")
        else:
            self.scaler.load_state_dict(state["scaler"])
        self.iteration, self.epoch = int(state["iteration"]), int(state["epoch"])
        self.best_miou, self.wandb_id = float(state["best_miou"]), state.get("wandb_id")
        self.eval_pending = bool(state.get("eval_pending", False))
        if self.ema is not None:
            if state.get("ema"):
                self.ema.load(state["ema"])
            else:  # --ema-decay turned on now: the average starts from the resumed weights
                self.log.info("the checkpoint has no moving average of the weights; it starts from these")
        ckpt.set_rng_state(state["rng"])
        window = state["log_window"].to(self.ctx.device)
        if state["global_batch"] == self.sampler.global_batch and len(window) == self.ctx.world_size:
            self.step_in_epoch = int(state["step_in_epoch"])
            self.window.sums.copy_(window[self.ctx.rank])
        else:  # another process count: the loss sums of the window go to rank 0
            self.window.sums.copy_(window.sum(0) if self.ctx.is_main else torch.zeros_like(window[0]))
            before = f"{state['world_size']} process{'es' if state['world_size'] != 1 else ''}"
            now = f"{self.ctx.world_size} process{'es' if self.ctx.world_size != 1 else ''}"
            if state["global_batch"] == self.sampler.global_batch:
                self.step_in_epoch = int(state["step_in_epoch"])
                self.log.info(f"{before} before, {now} now, global batch {self.sampler.global_batch} as before; "
                              f"epoch {self.epoch} continues at step {self.step_in_epoch} of its order")
            else:  # continue the epoch at the first global batch not yet fully seen
                seen = int(state["step_in_epoch"]) * int(state["global_batch"])
                self.step_in_epoch = seen // self.sampler.global_batch
                self.log.info(f"global batch changed from {state['global_batch']} ({before}) to "
                              f"{self.sampler.global_batch} ({now}); continuing epoch {self.epoch} at sample "
                              f"{self.step_in_epoch * self.sampler.global_batch} of its order")
        if self.step_in_epoch >= self.sampler.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.window.step.fill_(self.iteration)

    def resume(self) -> None:
        """Continue from the newest readable checkpoint in the out dir (``last.pt`` first), if any."""
        found: Any = None
        if self.ctx.is_main:
            ckpt.remove_stale_temps(self.out)
            try:
                hit = ckpt.find_resumable(self.out, self.log.info)
                found = str(hit[0]) if hit else None
            except ckpt.CheckpointError as e:
                found = e
        found = du.broadcast_object(found)
        if isinstance(found, ckpt.CheckpointError):
            raise found
        if found is None:
            return
        state = ckpt.load(found)
        ckpt.check_resumable(state, Path(found))
        try:
            changed = check_resume(state["config"], self.cfg, Path(found), has_ema=bool(state.get("ema")))
            self.load_state_dict(state)
        except (KeyError, TypeError, AttributeError, ValueError, IndexError, RuntimeError) as e:
            raise ckpt.CheckpointError(
                f"{found}: cannot be resumed from ({type(e).__name__}: {first_line(e)}); it was edited or written by "
                f"another version: restore the file, or pass a new --out-dir to start a fresh run.",
                collective=True) from None
        if changed:  # each takes effect from here (cityseg.resume refuses those that cannot)
            current = self.cfg.to_dict()
            self.log.info("config changed since the checkpoint: " + ", ".join(f"{k}={current[k]!r}" for k in changed))
        self.log.rewind(self.iteration)
        self.log.info(f"Resumed from {found} at iteration {self.iteration}")

    def save_periodic(self) -> None:
        """Rank 0 writes ``ckpt_<it>.pt`` and points ``last.pt`` at it; every rank waits for it."""
        if self._saved_at == self.iteration:  # written already (before this iteration's evaluation)
            return
        self._save(lambda state: ckpt.save_periodic(state, self.out, self.cfg.keep_ckpts))
        self._saved_at = self.iteration

    def save_best(self) -> None:
        """Rank 0 writes ``best.pt``; every rank waits for it."""
        self._save(lambda state: ckpt.save(state, self.out / ckpt.BEST))

    def _save(self, write: Any) -> None:
        """Rank 0 writes the state; a failure (a full disk) stops every rank with rank 0's one line."""
        self.watchdog.set_phase("checkpoint")
        self._check_finite(weights=True)
        state = self.state_dict()
        error = ""
        if self.ctx.is_main:
            try:
                with self.watchdog.pause():  # a slow file system is not a stall; the other ranks wait for it
                    write(state)
            except ckpt.CheckpointError as e:
                error = str(e)
            except OSError as e:  # rotating or linking the files after a complete write
                error = f"{self.out}: the checkpoint was written but the files around it could not be updated " \
                        f"({e.strerror or e}); fix permissions or free space there, then run the same command."
        failed = [m for m in du.all_gather_object(error, self.ctx.control_group) if m]  # also the barrier
        if failed:
            raise ckpt.CheckpointError(str(failed[0]), collective=True)

    # -- loop ------------------------------------------------------------------------------------------
    def train_step(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One optimizer step over ``accum_steps`` micro-batches; no host sync (the loss stays on the device)."""
        dev = self.ctx.device
        targets = [to_target(labels, dev) for _, labels in micro]
        # Normalise by the valid pixels of the *global* batch (all ranks, all micro-batches); DDP averages
        # gradients over ranks, hence the world-size factor. N processes x batch B then train the same
        # weights as 1 process x batch N*B.
        valid = [(y != IGNORE_INDEX).sum() for y in targets]
        total = du.all_reduce_sum(torch.stack(valid).sum().to(torch.float32))
        scale = self.ctx.world_size / total.clamp_min(1.0)
        self.optimizer.zero_grad(set_to_none=True)
        for k, ((images, _), y) in enumerate(zip(micro, targets)):
            last = k == len(micro) - 1
            sync = contextlib.nullcontext() if last or self.ddp is self.model else self.ddp.no_sync()
            with sync:  # inner micro-steps skip DDP's gradient all-reduce
                loss_sum = self.loss_sum(to_input(images, dev, self.channels_last), y)
                self.scaler.scale(loss_sum * scale).backward()
            self.window.add(loss_sum.detach(), valid[k], images.shape[0])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.window.end_step()

    def loss_sum(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss of one micro-batch, summed over its pixels: the main head's (cross-entropy, or OHEM over
        the global batch), plus ``aux_weight`` times the auxiliary head's cross-entropy."""
        cfg = self.cfg
        with autocast(self.ctx.device, self.dtype):
            out = self.forward(x, aux=True) if cfg.aux_weight > 0 else self.forward(x)
        logits, aux = out if cfg.aux_weight > 0 else (out, None)
        total = LOSSES[cfg.loss](logits, y, cfg)
        return total if aux is None else total + cfg.aux_weight * aux_ce_sum(aux, y, self.model.aux_stride)

    def steps(self) -> Iterator[tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[int, int]]]:
        """This rank's batches across epochs from the saved position on, ``accum_steps`` micro-batches per
        optimizer step, each step with the position (epoch, step in epoch) reached after it."""
        epoch, step, micro = self.epoch, self.step_in_epoch, []
        while True:
            self.sampler.set_epoch(epoch, step)
            for images, labels, _ in self.loader:
                step += 1
                if step == self.sampler.steps_per_epoch:
                    epoch, step = epoch + 1, 0
                micro.append((images, labels))
                if len(micro) == self.cfg.accum_steps:
                    yield micro, (epoch, step)
                    micro = []

    def _fetch(self) -> None:
        """Load the batches of one more step ahead (the loop keeps two), unless that is past ``max_iters``.

        A sample that cannot be loaded (a corrupt file), or a DataLoader worker that died (the OOM killer),
        fails this rank's stop flag instead of raising: the ranks agree on it at the end of the next step,
        which every rank has the batches for, and stop there together, with a checkpoint."""
        if self._failure or self.iteration + len(self._ahead) >= self.cfg.max_iters:
            return
        try:
            self._ahead.append(next(self._stream))
        except UserError as e:
            self._fail(one_line(e), FIX_FILE)
        except RuntimeError as e:
            death = worker_death(e, self.loader)
            if not death:
                raise
            self._fail(death, FEWER_WORKERS)

    def _fail(self, message: str, advice: str) -> None:
        """This rank cannot go on: remember why (and what to do), and tell the other ranks through the stop
        flag."""
        if not self._failure:
            self._failure = (message, advice)
            self.stop.fail()

    def fit(self) -> dict[str, Any]:
        """Train to ``max_iters`` (or until a stop signal), evaluating and checkpointing on the way."""
        self._start_logging()
        self._stream, self._ahead, self._failure = self.steps(), collections.deque(), ()
        self._fetch()
        self._fetch()
        if self.stop.agree_now() == DATA_ERROR:  # before the first step: nothing new to save
            raise self._stop_error(saved=False)
        if self.eval_pending and self._evaluation_missing():
            self._evaluate()  # the checkpoint was written before an evaluation that a stop cut short
        warm_graphs = None
        while self.iteration < self.cfg.max_iters and not self.stopped_by:
            micro, (self.epoch, self.step_in_epoch) = self._ahead.popleft()
            self.watchdog.set_phase("step")
            self.train_step(micro)
            if self.cfg.compile and warm_graphs is None:  # what the first step compiled
                warm_graphs = compiled_graphs()
            self.iteration += 1
            self.watchdog.progress(self.iteration)
            self.log.advance()
            self.watchdog.set_phase("data")
            self._fetch()
            self._after_step()
        self.watchdog.close()  # what follows (the W&B upload, teardown) is not a step
        self._stream.close()
        self.stop.drain()
        if self.stopped_by == DATA_ERROR:
            raise self._stop_error(saved=True)
        if warm_graphs is not None:
            graphs = compiled_graphs()
            self.log.info(f"torch.compile: {graphs} graphs compiled, {graphs - warm_graphs} of them after the "
                          f"first step (recompilations)")
        return self._finish()

    def _stop_error(self, saved: bool) -> DataError:
        """The failure of the first rank that had one, for every rank to raise together."""
        message, advice = next(f for f in du.all_gather_object(self._failure, self.ctx.control_group) if f)
        return DataError(self._resume_note(message, advice, saved), collective=True)

    def _resume_note(self, message: str, advice: str, saved: bool) -> str:
        where = (f"saved {self.out / ckpt.LAST} at iteration {self.iteration}" if saved
                 else f"no step was trained since iteration {self.iteration}")
        return f"{message.rstrip('.')}. Training stopped and {where}; {advice} and run the same command to resume."

    def _eval_due(self, it: int) -> bool:
        return bool(self.cfg.eval_every and it % self.cfg.eval_every == 0) or it >= self.cfg.max_iters

    def _ckpt_due(self, it: int) -> bool:
        return bool(self.cfg.ckpt_every and it % self.cfg.ckpt_every == 0) or it >= self.cfg.max_iters

    def _evaluation_missing(self) -> bool:
        """True when the log holds no evaluation of the current iteration (decided by rank 0)."""
        return bool(du.broadcast_object(not self.log.has_record(self.iteration, "val/miou")
                                        if self.ctx.is_main else None))

    def _after_step(self) -> None:
        cfg, it = self.cfg, self.iteration
        if it % cfg.log_every == 0 or it >= cfg.max_iters:
            self.watchdog.set_phase("log")
            self._log_train()
        if self._eval_due(it):
            self.eval_pending = True  # in every checkpoint until the evaluation completes
            if self._ckpt_due(it):  # saved first: a stop signal during a long evaluation loses no step
                self.save_periodic()
            self._evaluate()
        if self.log.write_error:  # rank 0's log or pictures could not be written (a full disk)
            self._fail(self.log.write_error, FREE_SPACE)
        polled = self.stop.poll()
        self.stopped_by = self.stopped_by or polled
        if self._ckpt_due(it) or self.stopped_by:
            self.save_periodic()

    def _check_finite(self, weights: bool = False) -> None:
        """Stop (all ranks together) if a loss since the last check, or with ``weights`` a parameter or
        buffer, is NaN/inf. With fp16 the GradScaler skips such steps instead."""
        if self.dtype == torch.float16:
            return
        first = self.window.first_bad.clone()
        first = torch.where(first < 0, torch.full_like(first, float("inf")), first)
        if du.is_enabled():
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        what = f"the training loss became non-finite at iteration {int(first)}" if torch.isfinite(first) else ""
        if not what and weights:
            tensors = [t for t in self.model.state_dict().values() if t.is_floating_point()]
            if not torch.stack([torch.isfinite(t).all() for t in tensors]).all():  # same on every rank
                what = f"the weights became non-finite by iteration {self.iteration}"
        if what:
            last = ckpt.periodic(self.out)
            kept = f"{self.out / ckpt.LAST} ({last[0].name})" if last else "none (no checkpoint was written yet)"
            raise NonFiniteLossError(f"{what}; stopped without writing a checkpoint, the last one is {kept}. "
                                     f"Lower --lr, check the data, or train with --amp fp16.")

    def _log_train(self) -> None:
        self._check_finite()
        loss, imgs_per_s, step_time = self.window.flush(self.ctx.world_size)  # the only host sync of the loop
        lr = self.optimizer.param_groups[0]["lr"]
        self.log.log(self.iteration, {"train/loss": loss, "train/lr": lr, "train/images_per_s": imgs_per_s,
                                      "train/epoch": self.epoch + self.step_in_epoch / self.sampler.steps_per_epoch})
        eta = (self.cfg.max_iters - self.iteration) * step_time
        self.log.report(f"it {self.iteration}/{self.cfg.max_iters} loss {loss:.4f} lr {lr:.3e} "
                        f"{imgs_per_s:.1f} img/s eta {_hms(eta)}",
                        loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{imgs_per_s:.1f}")

    def _evaluate(self) -> None:
        t0 = time.perf_counter()
        self.watchdog.set_phase("eval")
        try:
            cm = evaluate(self.predictor, self.val, should_stop=lambda: self.stop.signum != 0,
                          progress=self.watchdog.progress)
        except EvaluationStopped:  # raised on every rank together; the next run evaluates this iteration again
            self.stopped_by = self.stop.agree_now()
            self.log.info(f"it {self.iteration}: evaluation stopped by {name(self.stopped_by)} after "
                          f"{time.perf_counter() - t0:.1f}s; the same command evaluates it again when it resumes")
            return
        except DataError as e:  # raised on every rank together: a val file failed to load, or a worker died
            self.save_periodic()
            advice = FEWER_WORKERS if "DataLoader worker" in str(e) else FIX_FILE
            raise DataError(self._resume_note(one_line(e), advice, saved=True), collective=True) from None
        self.eval_pending = False
        result = cm.compute()
        miou = result["miou"] if result["miou"] is not None else 0.0
        is_best = miou > self.best_miou
        if is_best:
            self.best_miou = miou
        self.log.log(self.iteration, {"val/miou": miou, "val/pixel_acc": result["pixel_acc"],
                                      "val/mean_acc": result["mean_acc"],
                                      **{f"val/iou/{k}": v for k, v in result["iou"].items() if v is not None}})
        self.log.info(f"it {self.iteration}: val mIoU {100 * miou:.2f}% (best {100 * self.best_miou:.2f}%, "
                      f"{time.perf_counter() - t0:.1f}s)")
        if self.ctx.is_main and self.cfg.num_pictures:
            count = min(self.cfg.num_pictures, self.cfg.max_val_images or self.cfg.num_pictures)
            pictures = make_pictures(self.predictor, self.val_set, result, cm.mat.cpu().numpy(), count)
            self.watchdog.progress()
            try:
                pictures.save(self.out / "pictures" / f"iter_{self.iteration:08d}")
            except OSError as e:
                self.log.failed(str(e))
            self.log.log_pictures(self.iteration, "val", pictures)
        if is_best:
            self.save_best()

    def _start_logging(self) -> None:
        cfg = self.cfg
        error = ""
        if self.ctx.is_main:
            try:
                save_yaml(cfg, self.out / "config.yaml")
            except OSError as e:
                error = f"{self.out / 'config.yaml'}: could not write ({e.strerror or e}); {FREE_SPACE}."
        mode = resolve_wandb_mode(cfg.wandb)
        if not error:
            self.wandb_id = self.log.start_wandb(mode, cfg.to_dict(), self.wandb_id, cfg.wandb_project,
                                                 cfg.wandb_entity, cfg.run_name or self.out.name)
        self.wandb_id, error = du.broadcast_object((self.wandb_id, error))
        if error:
            raise UserError(error, collective=True)
        placement = du.placement(self.ctx)
        meeting = f" (rendezvous {self.ctx.rendezvous})" if self.ctx.rendezvous else ""
        self.log.info(f"placement{meeting}: " + "; ".join(placement))
        self.log.info("training data: " + self.loader.dataset.describe())
        self.log.open_bar(cfg.max_iters, self.iteration)
        self.log.info(f"training {cfg.max_iters} iterations on {self.ctx.world_size} x {self.ctx.device.type} "
                      f"(global batch {self.sampler.global_batch * cfg.accum_steps}, "
                      f"{self.sampler.steps_per_epoch} batches per epoch) -> {self.out}")

    def _finish(self) -> dict[str, Any]:
        result = {"iteration": self.iteration, "best_miou": self.best_miou, "stopped_by": self.stopped_by}
        if self.stopped_by:
            self.log.info(f"Stopped by {name(self.stopped_by)} at iteration {self.iteration}; saved "
                          f"{self.out / ckpt.LAST}. Run the same command to resume.")
        else:
            self.log.info(f"done: {self.iteration} iterations, best val mIoU {100 * max(self.best_miou, 0):.2f}%")
        self.log.close()
        return result


class _Window:
    """Loss and pixel sums kept on the device between log intervals, so steps never wait for the host."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, valid pixels
        self.first_bad = torch.full((), -1.0, dtype=torch.float64, device=device)  # first non-finite step
        self.step = torch.zeros((), dtype=torch.float64, device=device)  # device-side step counter
        self.images, self.steps, self.t0 = 0, 0, time.perf_counter()

    def add(self, loss_sum: torch.Tensor, valid: torch.Tensor, images: int) -> None:
        """Accumulate one micro-batch (device ops only)."""
        self.sums[0] += loss_sum
        self.sums[1] += valid
        bad = ~torch.isfinite(loss_sum) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, self.step + 1, self.first_bad)
        self.images += images

    def end_step(self) -> None:
        """Close one optimizer step."""
        self.step += 1
        self.steps += 1

    def flush(self, world_size: int) -> tuple[float, float, float]:
        """Global loss per valid pixel, images/s and seconds per step since the last flush; resets."""
        loss, pixels = du.all_reduce_sum(self.sums.clone()).tolist()
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        rate, step_time = self.images * world_size / elapsed, elapsed / max(self.steps, 1)
        self.sums.zero_()
        self.images, self.steps, self.t0 = 0, 0, time.perf_counter()
        return loss / max(pixels, 1.0), rate, step_time


def compiled_graphs() -> int:
    """How many graphs torch.compile has compiled in this process so far (dynamo's own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def set_determinism(deterministic: bool) -> None:
    """cuDNN autotuning for speed, or deterministic kernels so that runs repeat bit for bit on GPUs.

    Deterministic mode is strict: an op without a deterministic CUDA kernel raises (see
    :class:`NondeterministicOpError`) rather than quietly breaking the promise. Every op of cityseg's recipes
    has one: the padding, the auxiliary loss and the cross-entropy are written for it."""
    torch.backends.cudnn.benchmark = not deterministic  # crops have one size: the tuned choice is reused
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    if torch.are_deterministic_algorithms_enabled() != deterministic:  # the call imports torch's compiler, ~1 s
        torch.use_deterministic_algorithms(deterministic)


class NondeterministicOpError(UserError):
    """--deterministic met an op that has no deterministic CUDA kernel."""

    collective = True


@contextlib.contextmanager
def _explain_nondeterminism() -> Iterator[None]:
    """Turn PyTorch's refusal of a nondeterministic op under ``--deterministic`` into one line."""
    try:
        yield
    except RuntimeError as e:
        if "does not have a deterministic implementation" not in str(e):
            raise
        op = str(e).split(" does not have")[0].strip().split()[-1]
        raise NondeterministicOpError(f"--deterministic: {op} has no deterministic CUDA kernel, so this run "
                                      f"could not repeat bit for bit; drop --deterministic, or the option that "
                                      f"uses it.") from None


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the training a config describes: set up distributed, own the run directory, resume, loop, tear
    down."""
    set_determinism(cfg.deterministic)
    with du.session(cfg.device) as ctx:
        du.agree(lambda: check_model_fits(cfg, ctx.device), ctx.control_group)
        start = initial_weights(cfg, ctx)  # a bad weight file stops here, before anything is written
        with own_directory(cfg.out_dir, ctx):
            return _train(cfg, ctx, start)


def _train(cfg: TrainConfig, ctx: du.DistContext, start: Start | None) -> dict[str, Any]:
    """Resume, loop and tear down, in a run directory this run owns."""
    stop = StopFlag(ctx.control_group).install()
    watchdog = Watchdog(cfg.stall_timeout, cfg.out_dir, ctx.rank, ctx.world_size)
    trainer = Trainer(cfg, ctx, stop, start, watchdog)
    if cfg.stall_timeout:
        watchdog.start()
    try:
        trainer.resume()
        with _explain_nondeterminism():
            return trainer.fit()
    finally:
        watchdog.close()
        shutdown(trainer.loader)
        shutdown(trainer.val)
        trainer.log.close()
        stop.restore()
