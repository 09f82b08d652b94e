"""Evaluate a checkpoint on a Cityscapes split at full resolution (19-class IoU, official rules).

    python evaluate.py --checkpoint runs/unet/best.pt --data-root /path/to/cityscapes --split val
    torchrun --standalone --nproc_per_node=4 evaluate.py --checkpoint runs/unet/best.pt --data-root ...
Writes OUT/metrics.json (OUT = --out-dir, or the checkpoint's directory). Every flag: python evaluate.py --help
"""

import os
import sys

try:  # Ctrl-C at any point, imports included: one line and status 130, not a traceback
    from cityseg.config import EvalConfig, parse_config
    from cityseg.errors import report_user_errors
    from cityseg.eval_job import run_evaluation
except KeyboardInterrupt:
    sys.exit(130)


def main(argv=None) -> None:
    try:
        with report_user_errors():
            cfg = parse_config(argv, EvalConfig)
            run_evaluation(cfg)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            print("evaluate.py: interrupted (Ctrl-C).", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
