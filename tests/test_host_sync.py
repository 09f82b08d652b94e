"""No host synchronisation between log intervals, proven on the CPU.

A GPU step is fast only if the host never waits for the device inside it. What would make it wait is visible
on any device as an ATen call: ``.item()`` and ``bool(t)`` reach ``aten::_local_scalar_dense``, a boolean mask
reaches ``aten::nonzero``, ``torch.equal`` is ``aten::equal``, and so on. A ``TorchDispatchMode`` sees every
call the real training loop makes (forward, backward, DDP, synchronised BatchNorm, OHEM, the optimizer, the
GradScaler), here on 2 gloo processes. The GPU-marked test with ``torch.cuda.set_sync_debug_mode("error")``
stays the final word; this one runs everywhere.
"""

from __future__ import annotations

import json
import os
import traceback

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import free_port, spawn, tiny_trainer

#: ATen calls that read a device value back to the host (or whose output size depends on values).
SYNC_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero", "aten::equal",
            "aten::allclose", "aten::masked_select", "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim",
            "aten::bincount", "aten::repeat_interleave", "aten::histc"}


class SyncRecorder(TorchDispatchMode):
    """Records the host-synchronising calls made while ``armed`` returns True (with where they came from).

    Two host-side paths are left out, because their tensors are CPU tensors on every device: the stop flag's
    poll (a flag on the gloo control group, read one step after its reduction started; cityseg/signals.py),
    counted apart to show that the recorder sees such calls at all, and the DataLoader (its iterator draws a
    seed with ``.item()`` on a CPU generator at each epoch)."""

    def __init__(self, armed):
        super().__init__()
        self.armed, self.seen, self.control_reads = armed, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        boolean_index = name == "aten::index.Tensor" and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or []))
        if (name in SYNC_OPS or boolean_index) and self.armed():
            frames = traceback.extract_stack()[:-1]
            if any(f.filename.endswith(os.path.join("cityseg", "signals.py")) for f in frames):
                self.control_reads += 1
            elif not any(os.path.join("torch", "utils", "data", "") in f.filename for f in frames):
                where = [f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in frames][-8:]
                self.seen.append(f"{name} at {' < '.join(reversed(where))}")
        return func(*args, **(kwargs or {}))


MAX_ITERS = 4
RECIPES = {
    "ce+aux+accum+ema": dict(aux_weight=0.4, accum_steps=2, ema_decay=0.9),
    "ohem+aux+accum+fp16": dict(loss="ohem", ohem_min_kept=3000, aux_weight=0.4, accum_steps=2, amp="fp16"),
    "encoder+drop-path+layer-decay+ema": dict(model="unet_resnet18", encoder_weights="none",
                                             decoder_channels="16,16,8,8,8", drop_path=0.3, layer_decay=0.8,
                                             ema_decay=0.9),
}


def _worker(rank: int, port: int, root: str, out: str) -> None:
    from cityseg import distributed as du

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = du.init("cpu")
    results = {}
    try:
        for name, recipe in RECIPES.items():
            trainer = tiny_trainer(root, f"{out}/{name}", ctx, batch_size=1, max_iters=MAX_ITERS, log_every=1000,
                                   eval_every=0, ckpt_every=0, num_pictures=0, max_val_images=1, **recipe)
            # From the second step (the first settles DDP's buckets) until the last step's optimizer update;
            # the last iteration's log, evaluation and checkpoint come after it and may synchronise.
            recorder = SyncRecorder(lambda: 1 <= trainer.iteration < MAX_ITERS)
            with recorder:
                trainer.fit()
            trainer.log.close()
            results[name] = {"seen": recorder.seen, "control_reads": recorder.control_reads,
                             "scaler": bool(trainer.scaler.state_dict())}
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.quick
def test_no_host_synchronisation_between_log_intervals(synthetic_root, tmp_path):
    spawn(_worker, (free_port(), str(synthetic_root), str(tmp_path)))
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name, result in results.items():
            assert result["seen"] == [], f"{name}:\n" + "\n".join(result["seen"])
            assert result["control_reads"] >= MAX_ITERS - 2  # the recorder does see .item() calls
            assert result["scaler"] == ("fp16" in name)  # fp16 really trained through the GradScaler
