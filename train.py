"""Train a U-Net on Cityscapes.

One process (CPU or one GPU):
    python train.py --data-root /path/to/cityscapes --config cityseg/configs/cityscapes_unet.yaml
Four GPUs on one node:
    torchrun --standalone --nproc_per_node=4 train.py --data-root /path/to/cityscapes \
        --config cityseg/configs/cityscapes_unet.yaml --out-dir runs/unet
Two nodes (run on each, with the first node's address):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train.py ...
Starting again with the same --out-dir resumes from OUT/last.pt. SIGTERM, SIGINT, SIGUSR1 or SIGUSR2 make all
ranks finish their step, save a checkpoint and exit with status 128 + signal number. Every flag: --help
"""

from cityseg.config import parse_config
from cityseg.engine import train
from cityseg.errors import report_user_errors
from cityseg.signals import exit_now, exit_on_stop_signals


def main(argv=None) -> None:
    exit_on_stop_signals()  # before training takes the signals over, and after it gives them back
    with report_user_errors():
        cfg = parse_config(argv)
        result = train(cfg)
    if result["stopped_by"]:
        exit_now(128 + result["stopped_by"])  # everything is saved and closed


if __name__ == "__main__":
    main()
