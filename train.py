"""Train a U-Net on Cityscapes.

One process (CPU or one GPU):
    python train.py --data-root /path/to/cityscapes --config cityseg/configs/cityscapes_unet.yaml
Four GPUs on one node:
    torchrun --standalone --nproc_per_node=4 train.py --data-root /path/to/cityscapes \
        --config cityseg/configs/cityscapes_unet.yaml --out-dir runs/unet
Two nodes (run on each, with the first node's address):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train.py ...
Starting again with the same --out-dir resumes from OUT/last.pt. Every flag: python train.py --help
"""

from cityseg.config import parse_config
from cityseg.engine import train
from cityseg.errors import report_user_errors


def main(argv=None) -> None:
    with report_user_errors():
        cfg = parse_config(argv)
        train(cfg)


if __name__ == "__main__":
    main()
