"""Evaluate a checkpoint on a Cityscapes split at full resolution (19-class IoU, official rules).

    python evaluate.py --checkpoint runs/unet/best.pt --data-root /path/to/cityscapes --split val
    torchrun --standalone --nproc_per_node=4 evaluate.py --checkpoint runs/unet/best.pt --data-root ...
Writes OUT/metrics.json (OUT = --out-dir, or the checkpoint's directory). Every flag: python evaluate.py --help
"""

from cityseg.config import EvalConfig, parse_config
from cityseg.errors import report_user_errors
from cityseg.evaluation import run_evaluation


def main(argv=None) -> None:
    with report_user_errors():
        cfg = parse_config(argv, EvalConfig)
        run_evaluation(cfg)


if __name__ == "__main__":
    main()
