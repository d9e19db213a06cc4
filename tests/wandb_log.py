"""Read the records of an offline run's .wandb file, to check what a run really logged.

The file is W&B's 7-byte header, then a LevelDB-style log: 32 KiB blocks of chunks, each with a
7-byte header (crc32, little-endian length, type 1=full 2=first 3=middle 4=last), each whole
record a serialized `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
from pathlib import Path

BLOCK = 32 * 1024


def read_records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a .wandb file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        kind = data[pos + 6]
        if length == 0 and kind == 0:  # zero padding to the block end
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def history(path: Path) -> list[dict]:
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def run_info(path: Path):
    for record in read_records(path):
        if record.WhichOneof("record_type") == "run":
            return record.run
    return None
