"""What the GPU saw: every tensor sent to it during the measured inference, in order, labelled.

The audit folder holds one `NNNNN.pt` per crossing and an `index.json` listing them, so that anyone
(and the leakage attacks) can check what crossed without any access to TEE state.
"""
from __future__ import annotations

import json
import os

import torch

from splitinfer.errors import UserError


class AuditLog:
    """Collects crossings in memory during the inference (no I/O in the timed region); `write` saves them."""

    def __init__(self):
        self.records: list[tuple[int | None, str, torch.Tensor]] = []

    def __call__(self, layer: int | None, op: str, tensor: torch.Tensor) -> None:
        self.records.append((layer, op, tensor))

    def write(self, folder: str) -> None:
        index = []
        for i, (layer, op, tensor) in enumerate(self.records):
            filename = f"{i:05d}.pt"
            torch.save(tensor.detach().to("cpu").contiguous(), os.path.join(folder, filename))
            index.append({"index": i, "layer": layer, "op": op, "shape": list(tensor.shape),
                          "dtype": str(tensor.dtype).replace("torch.", ""), "file": filename})
        with open(os.path.join(folder, "index.json"), "w") as f:
            json.dump(index, f, indent=1)


def prepare_audit_dir(folder: str) -> None:
    """Create the folder (or accept an empty one), refusing with a clear message where it cannot be written."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"--audit-dir '{folder}' cannot be created: {e.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"--audit-dir '{folder}' is not writable")
    if os.listdir(folder):
        raise UserError(f"--audit-dir '{folder}' is not empty; give a new or empty folder")


def read_audit(folder: str) -> list[dict]:
    """The crossings in order: dicts with layer, op and the tensor itself."""
    with open(os.path.join(folder, "index.json")) as f:
        index = json.load(f)
    return [{**entry, "tensor": torch.load(os.path.join(folder, entry["file"]))} for entry in index]
