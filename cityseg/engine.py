"""The training engine: ``train(cfg)`` builds everything from a config, resumes, loops and tears down."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from . import checkpoint as ckpt
from . import distributed as du
from .config import TrainConfig, save_yaml
from .data import CityscapesDataset, TrainSampler, make_loader
from .evaluation import amp_dtype, autocast, evaluate, val_loader
from .labels import IGNORE_INDEX
from .logger import RunLogger, resolve_wandb_mode
from .model import build_model
from .syncbn import convert_sync_batchnorm
from .transforms import TrainTransform, to_input, to_target


def lr_factor(it: int, cfg: TrainConfig) -> float:
    """Linear warmup from ``warmup_factor`` to 1, times poly decay ``(1 - it/max_iters) ** poly_power``."""
    poly = max(0.0, 1.0 - it / cfg.max_iters) ** cfg.poly_power
    if it < cfg.warmup_iters:
        alpha = it / cfg.warmup_iters
        return poly * (cfg.warmup_factor * (1 - alpha) + alpha)
    return poly


def build_optimizer(cfg: TrainConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """SGD with momentum (the reference recipe) or AdamW, using the multi-tensor/fused implementations."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               foreach=True)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay,
                             fused=device.type == "cuda", foreach=None if device.type == "cuda" else True)


def build_model_for(cfg: TrainConfig, ctx: du.DistContext) -> tuple[nn.Module, nn.Module]:
    """The U-Net on the device (synchronised BatchNorm when distributed), and its DDP wrapper."""
    torch.manual_seed(cfg.seed)  # same initial weights on every rank and in every run
    model = build_model(cfg.width)
    if ctx.distributed:
        model = convert_sync_batchnorm(model, ctx.device)
    model = model.to(ctx.device)
    if ctx.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if not ctx.distributed:
        return model, model
    ddp = DDP(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
              forward_sync_buffers=False, gradient_as_bucket_view=True)  # SyncBN keeps buffers equal
    return model, ddp


class Trainer:
    """Owns the state of one run; ``fit()`` trains from wherever the state stands to ``max_iters``."""

    def __init__(self, cfg: TrainConfig, ctx: du.DistContext):
        self.cfg, self.ctx = cfg, ctx
        self.out = Path(cfg.out_dir)
        self.channels_last = ctx.device.type == "cuda"
        self.dtype = amp_dtype(cfg.amp, ctx.device)
        train_set = CityscapesDataset(cfg.data_root, cfg.train_split,
                                      TrainTransform(cfg.crop_hw, (cfg.scale_min, cfg.scale_max), cfg.seed))
        self.sampler = TrainSampler(len(train_set), cfg.batch_size, ctx.world_size, ctx.rank, cfg.seed)
        pin = ctx.device.type == "cuda"
        self.loader = make_loader(train_set, self.sampler, cfg.batch_size, cfg.workers, pin, drop_last=True)
        self.val, _ = val_loader(cfg.data_root, cfg.val_split, ctx, min(cfg.workers, 2), cfg.max_val_images)
        self.model, self.ddp = build_model_for(cfg, ctx)
        self.optimizer = build_optimizer(cfg, self.model, ctx.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda it: lr_factor(it, cfg))
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=self.dtype == torch.float16)
        self.iteration, self.best_miou, self.wandb_id = 0, -1.0, None
        self.log = RunLogger(self.out, ctx.is_main)

    # -- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run."""
        return {
            "model": ckpt.model_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "epoch": self.iteration // self.sampler.steps_per_epoch,
            "world_size": self.ctx.world_size,
            "best_miou": self.best_miou,
            "config": self.cfg.to_dict(),
            "rng": ckpt.rng_state(),
            "wandb_id": self.wandb_id,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint written by :meth:`state_dict`."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        self.best_miou = float(state["best_miou"])
        self.wandb_id = state.get("wandb_id")
        ckpt.set_rng_state(state["rng"])

    def resume(self) -> None:
        """Continue from ``OUT/last.pt`` when it exists."""
        path = self.out / ckpt.LAST
        if not path.is_file():
            return
        state = ckpt.load(path, map_location=self.ctx.device)
        ckpt.check_compatible(state.get("config", {}), self.cfg.to_dict(), path)
        self.load_state_dict(state)
        self.log.info(f"Resumed from {path} at iteration {self.iteration}")

    def save(self, name: str) -> None:
        """Rank 0 writes ``OUT/name`` atomically, then every rank waits for it."""
        state = self.state_dict()
        if self.ctx.is_main:
            ckpt.save(state, self.out / name)
        du.barrier()

    # -- loop ------------------------------------------------------------------------------------------
    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns this rank's summed loss and valid-pixel count (device tensors)."""
        x = to_input(images, self.ctx.device, self.channels_last)
        y = to_target(labels, self.ctx.device)
        with autocast(self.ctx.device, self.dtype):
            logits = self.ddp(x)
        loss_sum = F.cross_entropy(logits.float(), y, ignore_index=IGNORE_INDEX, reduction="sum")
        valid = (y != IGNORE_INDEX).sum()
        # Normalise by the valid pixels of the *global* batch; DDP averages gradients over ranks, hence the
        # world-size factor. N processes x batch B then train the same weights as 1 process x batch N*B.
        total = du.all_reduce_sum(valid.detach().to(torch.float32))
        loss = loss_sum * (self.ctx.world_size / total.clamp_min(1.0))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss_sum.detach(), valid

    def fit(self) -> dict[str, Any]:
        """Train to ``max_iters``, evaluating and checkpointing on the way."""
        cfg = self.cfg
        self._start_logging()
        window = _Window(self.ctx.device)
        while self.iteration < cfg.max_iters:
            epoch, step = divmod(self.iteration, self.sampler.steps_per_epoch)
            self.sampler.set_epoch(epoch, step)
            for images, labels, _ in self.loader:
                window.add(*self.train_step(images, labels), images.shape[0])
                self.iteration += 1
                self.log.advance()
                self._after_step(window)
                if self.iteration >= cfg.max_iters:
                    break
        return self._finish()

    def _after_step(self, window: "_Window") -> None:
        cfg, it = self.cfg, self.iteration
        last = it >= cfg.max_iters
        if it % cfg.log_every == 0 or last:
            self._log_train(window)
        if (cfg.eval_every and it % cfg.eval_every == 0) or last:
            self._evaluate()
        if (cfg.ckpt_every and it % cfg.ckpt_every == 0) or last:
            self.save(ckpt.LAST)

    def _log_train(self, window: "_Window") -> None:
        loss, imgs_per_s = window.flush(self.ctx.world_size)  # the only host sync of the loop
        if not math.isfinite(loss):
            self.log.info(f"warning: non-finite loss {loss} at iteration {self.iteration}")
        lr = self.optimizer.param_groups[0]["lr"]
        record = {"train/loss": loss, "train/lr": lr, "train/images_per_s": imgs_per_s,
                  "train/epoch": self.iteration / self.sampler.steps_per_epoch}
        self.log.log(self.iteration, record)
        eta = (self.cfg.max_iters - self.iteration) * window.last_step_time
        self.log.report(f"it {self.iteration}/{self.cfg.max_iters} loss {loss:.4f} lr {lr:.3e} "
                        f"{imgs_per_s:.1f} img/s eta {_hms(eta)}",
                        loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{imgs_per_s:.1f}")

    def _evaluate(self) -> None:
        t0 = time.perf_counter()
        result = evaluate(self.model, self.val, self.ctx.device, self.dtype, self.channels_last).compute()
        miou = result["miou"] if result["miou"] is not None else 0.0
        is_best = miou > self.best_miou
        if is_best:
            self.best_miou = miou
        self.log.log(self.iteration, {"val/miou": miou, "val/pixel_acc": result["pixel_acc"],
                                      "val/mean_acc": result["mean_acc"],
                                      **{f"val/iou/{k}": v for k, v in result["iou"].items() if v is not None}})
        self.log.info(f"it {self.iteration}: val mIoU {100 * miou:.2f}% (best {100 * self.best_miou:.2f}%, "
                      f"{time.perf_counter() - t0:.1f}s)")
        if is_best:
            self.save(ckpt.BEST)

    def _start_logging(self) -> None:
        cfg = self.cfg
        if self.ctx.is_main:
            save_yaml(cfg, self.out / "config.yaml")
        mode = resolve_wandb_mode(cfg.wandb)
        self.wandb_id = self.log.start_wandb(mode, cfg.to_dict(), self.wandb_id, cfg.wandb_project,
                                             cfg.wandb_entity, cfg.run_name or self.out.name)
        self.wandb_id = du.broadcast_object(self.wandb_id)
        self.log.open_bar(cfg.max_iters, self.iteration)
        self.log.info(f"training {cfg.max_iters} iterations on {self.ctx.world_size} x {self.ctx.device.type} "
                      f"(global batch {cfg.batch_size * self.ctx.world_size}, "
                      f"{self.sampler.steps_per_epoch} iterations per epoch) -> {self.out}")

    def _finish(self) -> dict[str, Any]:
        self.log.info(f"done: {self.iteration} iterations, best val mIoU {100 * max(self.best_miou, 0):.2f}%")
        self.log.close()
        return {"iteration": self.iteration, "best_miou": self.best_miou}


class _Window:
    """Loss and pixel sums kept on the device between log intervals, so steps never wait for the host."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.pixels = torch.zeros((), dtype=torch.float64, device=device)
        self.images, self.steps, self.t0 = 0, 0, time.perf_counter()
        self.last_step_time = 0.0

    def add(self, loss_sum: torch.Tensor, valid: torch.Tensor, images: int) -> None:
        self.loss += loss_sum
        self.pixels += valid
        self.images += images
        self.steps += 1

    def flush(self, world_size: int) -> tuple[float, float]:
        """Global mean loss per valid pixel and images/s since the last flush; resets the window."""
        both = du.all_reduce_sum(torch.stack([self.loss, self.pixels]))
        loss, pixels = both.tolist()
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.images * world_size / elapsed
        self.last_step_time = elapsed / max(self.steps, 1)
        self.loss.zero_(), self.pixels.zero_()
        self.images, self.steps, self.t0 = 0, 0, time.perf_counter()
        return loss / max(pixels, 1.0), rate


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the training a config describes: set up distributed, resume, loop, tear down."""
    with du.session(cfg.device) as ctx:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        trainer = Trainer(cfg, ctx)
        try:
            trainer.resume()
            return trainer.fit()
        finally:
            trainer.log.close()
