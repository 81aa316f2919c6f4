"""What a model folder's safetensors files hold, read without loading a weight: their size and
which of their bytes are stored in a given dtype (the memory plan's loading moment, memory_plan.py)."""
from __future__ import annotations

from pathlib import Path

import torch


def file_bytes(location: str) -> float:
    """Bytes of the folder's safetensors files (0 for a hub id or a folder without them)."""
    folder = Path(location)
    return float(sum(f.stat().st_size for f in folder.glob("*.safetensors"))) if folder.is_dir() else 0.0


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def bytes_stored_in(location: str, dtype: torch.dtype) -> float:
    """Bytes of the folder's safetensors tensors stored in ``dtype`` (read from the files' headers).
    Loaded on CPU in that dtype, transformers keeps them in the file's memory map instead of copying
    them (checked in tests/test_plan.py), so their file pages are the weights' own."""
    import json
    import struct

    folder, name = Path(location), SAFETENSORS_DTYPES.get(dtype)
    if name is None or not folder.is_dir():
        return 0.0
    total = 0
    for path in folder.glob("*.safetensors"):
        try:
            with path.open("rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
            total += sum(t["data_offsets"][1] - t["data_offsets"][0] for key, t in header.items()
                         if key != "__metadata__" and t.get("dtype") == name)
        except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError, AttributeError):
            continue  # unreadable: counted as copied, the larger plan
    return float(total)
