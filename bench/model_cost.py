"""Parameters and forward FLOPs of the U-Net per crop, with and without the auxiliary head.

    python bench/model_cost.py [--width 64] [--crop 512x1024]

FLOPs are counted by torch.utils.flop_counter on meta tensors (shapes only, nothing is computed), so this runs
in seconds on any machine. The counter counts convolutions and matrix products (2 FLOPs per multiply-add);
poolings, activations, normalisations and the auxiliary head's bilinear upsampling are not counted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from cityseg.model import UNet  # noqa: E402


def cost(width: int, crop: tuple[int, int], aux: bool) -> tuple[int, float]:
    """(parameters, forward FLOPs for one crop)."""
    with torch.device("meta"):
        model = UNet(width=width, aux=aux)
        x = torch.empty(1, 3, *crop)
    with FlopCounterMode(display=False) as counter:
        model(x, aux=aux)
    return sum(p.numel() for p in model.parameters()), float(counter.get_total_flops())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--crop", default="512x1024")
    args = p.parse_args()
    crop = tuple(int(v) for v in args.crop.lower().split("x"))
    params, flops = cost(args.width, crop, aux=False)
    params_aux, flops_aux = cost(args.width, crop, aux=True)
    print(f"U-Net width {args.width}, one {crop[0]}x{crop[1]} crop, forward:")
    print(f"  without auxiliary head: {params:,} parameters, {flops / 1e9:.1f} GFLOPs")
    print(f"  with auxiliary head:    {params_aux:,} parameters, {flops_aux / 1e9:.1f} GFLOPs")
    print(f"  the head adds {params_aux - params:,} parameters ({100 * (params_aux / params - 1):.3f}%) and "
          f"{(flops_aux - flops) / 1e9:.2f} GFLOPs ({100 * (flops_aux / flops - 1):.2f}%)")


if __name__ == "__main__":
    main()
