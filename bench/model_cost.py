"""Parameters and forward FLOPs per crop of every registered model, with and without its auxiliary head.

    python bench/model_cost.py [--crop 512x1024] [--width 64] [--decoder-channels 256,128,64,32,16]

FLOPs are counted by torch.utils.flop_counter on meta tensors (shapes only, nothing is computed), so this runs
in seconds on any machine. The counter counts convolutions and matrix products (2 FLOPs per multiply-add);
poolings, activations, normalisations and upsampling are not counted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from cityseg.models import MODELS, create_model  # noqa: E402


def cost(name: str, crop: tuple[int, int], aux: bool, **options) -> tuple[int, float]:
    """(parameters, forward FLOPs for one crop) of model ``name``."""
    with torch.device("meta"):
        model = create_model(name, aux=aux, **options)
        x = torch.empty(1, 3, *crop)
    with FlopCounterMode(display=False) as counter:
        model(x, aux=aux)
    return sum(p.numel() for p in model.parameters()), float(counter.get_total_flops())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--crop", default="512x1024")
    p.add_argument("--width", type=int, default=64, help="Base width of the classic U-Net (model unet).")
    p.add_argument("--decoder-channels", default="256,128,64,32,16", help="Decoder widths of the unet_<encoder> "
                   "models.")
    args = p.parse_args()
    crop = tuple(int(v) for v in args.crop.lower().split("x"))
    options = {"width": args.width, "decoder_channels": args.decoder_channels}
    print(f"one {crop[0]}x{crop[1]} crop, forward pass (FLOPs by torch's FLOP counter on meta tensors)")
    print(f"{'model':<22}{'parameters':>14}{'GFLOPs':>10}   auxiliary head adds")
    for name in MODELS:
        params, flops = cost(name, crop, False, **options)
        params_aux, flops_aux = cost(name, crop, True, **options)
        print(f"{name:<22}{params:>14,}{flops / 1e9:>10.1f}   {params_aux - params:,} parameters, "
              f"{(flops_aux - flops) / 1e9:.2f} GFLOPs ({100 * (flops_aux / flops - 1):.2f}%)")


if __name__ == "__main__":
    main()
