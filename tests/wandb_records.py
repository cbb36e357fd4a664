"""Read the records of an offline wandb run file (run-*.wandb) for tests.

The file is a 7-byte header (":W&B", magic, version) then a LevelDB-style log: 32 KiB blocks of chunks, each chunk a
7-byte header (crc32, length uint16 LE, type 1=full 2=first 3=middle 4=last) and a slice of a serialized
wandb_internal_pb2.Record.
"""
import json
import struct
from pathlib import Path

BLOCK = 32 * 1024


def read_records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a wandb run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            pending = b""
            yield rec


def history(path: Path) -> list[dict]:
    """The logged rows, each {key: value} with JSON-decoded values."""
    rows = []
    for rec in read_records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item})
    return rows


def config(path: Path) -> dict:
    out = {}
    for rec in read_records(path):
        kind = rec.WhichOneof("record_type")
        if kind in ("run", "config"):  # the initial config rides on the run record
            for item in (rec.run.config if kind == "run" else rec.config).update:
                out[item.key] = json.loads(item.value_json)
    return out
