"""Exponential moving average of the weights (``--ema-decay``), kept on the device without host syncs."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class EMA(AveragedModel):
    """``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn(decay)``, parameters and buffers
    (BatchNorm's running statistics) averaged, updated after every optimizer step.

    ``AveragedModel.update_parameters`` asks its counter ``n_averaged`` whether this is the first update
    (``bool(self.n_averaged == 0)``, twice a step) and copies it to the device for the average: once the counter
    is on the GPU (the average moved there, as a checkpointed one is), each question makes the host wait for
    the GPU. Here the host keeps that answer itself (:attr:`started`), restored from the counter when a
    checkpoint is loaded. Integer buffers (BatchNorm's step count) are copied, not averaged."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.started = False

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:  # type: ignore[override]
        """Move the average one step towards ``model``'s weights (the first update copies them)."""
        ema = [*self.module.parameters(), *self.module.buffers()]
        now = [*model.parameters(), *model.buffers()]
        floats = [(e, n) for e, n in zip(ema, now) if e.is_floating_point()]
        if self.started:
            self.multi_avg_fn([e for e, _ in floats], [n.detach() for _, n in floats], self.n_averaged)
        else:
            torch._foreach_copy_([e for e, _ in floats], [n.detach() for _, n in floats])
            self.started = True
        for e, n in zip(ema, now):
            if not e.is_floating_point():
                e.copy_(n)
        self.n_averaged += 1

    def state(self) -> dict[str, Any]:
        """The averaged weights (the model's own key names) and the number of updates, for checkpoints."""
        return {"weights": self.module.state_dict(), "updates": int(self.n_averaged)}

    def load(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state`."""
        self.module.load_state_dict(state["weights"])
        self.n_averaged.fill_(int(state["updates"]))
        self.started = int(state["updates"]) > 0
