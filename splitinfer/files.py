"""Result files: written atomically, read with one clear line where they are missing or broken. Imports no
torch, so that the commands that only read results (`splitinfer.targets`) start at once."""
from __future__ import annotations

import json
import os
import tempfile

from splitinfer.errors import UserError


def write_atomically(path: str, write) -> None:
    """Write via a temporary file in the same folder and rename, so no half-written file is ever left."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make results private to their writer
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_json(path: str, what: str) -> dict:
    """A JSON file the user named (`what`, e.g. "result file"); missing or unreadable, a UserError saying so."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{what} '{path}' does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {what} '{path}': {e}") from None


def write_json(path: str, result: dict) -> None:
    write_atomically(path, lambda f: f.write(json.dumps(result, indent=2).encode() + b"\n"))
