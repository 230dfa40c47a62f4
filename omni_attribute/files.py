"""Writing files so that a killed writer never leaves half a file behind, and a new file never replaces
an existing one unless asked to.

The finished data is first written to a temporary file beside the target (created by safetensors with
the usual permissions: 0666 less the process umask, as ComfyUI's own outputs), then renamed over the
target (:func:`atomic_save_safetensors`) or hard-linked to it, which fails if the name is taken
(:func:`save_safetensors_new`).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file


def _write_temporary(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """save_file into a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    tmp = _write_temporary(tensors, path, metadata)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_safetensors_new(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Like :func:`atomic_save_safetensors`, but ``path`` must not exist: raises FileExistsError (decided
    atomically by the file system, so two writers racing for one name never replace each other's file)."""
    path = Path(path)
    if os.path.lexists(path):
        raise FileExistsError(f"{path} exists")
    tmp = _write_temporary(tensors, path, metadata)
    try:
        try:
            os.link(tmp, path)  # fails if the name is taken, even by a dangling link
        except FileExistsError:
            raise
        except OSError:  # no hard links on this file system: reserve the name exclusively, then move onto it
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
