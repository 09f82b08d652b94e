"""Submit cityseg training or evaluation to SLURM with submitit (see slurm/README.md for recipes).

    python slurm/submit.py --nodes 1 --gpus-per-node 4 --partition gpu -- \
        --config cityseg/configs/cityscapes_unet.yaml --data-root /path/to/cityscapes --out-dir runs/unet
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from cityseg.errors import report_user_errors  # noqa: E402
from cityseg.launch import submit  # noqa: E402

if __name__ == "__main__":
    with report_user_errors():
        sys.exit(submit())
