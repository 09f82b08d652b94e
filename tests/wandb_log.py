"""Read an offline W&B run back from its ``run-<id>.wandb`` transaction log (a LevelDB-style record log)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = 7  # file header ":W&B" + magic + version; record headers are crc32, length, type


def records(path: str | Path) -> Iterator[pb.Record]:
    """Every record of the log, in order."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # block trailer too small for a header: skip to the next block
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            yield rec


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """The id, config and history rows ({step: {key: value}}) of every offline run under a wandb/ dir."""
    out: dict[str, Any] = {"ids": [], "config": {}, "history": []}
    for log in sorted(Path(run_dir).glob("offline-run-*/run-*.wandb")):
        for rec in records(log):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                out["ids"].append(rec.run.run_id)
                out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
            elif kind == "config":
                out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                out["history"].append((rec.history.step.num, row))
    return out
