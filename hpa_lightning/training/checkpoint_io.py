"""Checkpoint files written whole or not at all, beside their final name.

Lightning's `TorchCheckpointIO` writes a local checkpoint through fsspec's transaction: into a temporary file in the
system's temp folder, then `shutil.move` onto the checkpoint. Where that folder is on another filesystem than the run
(a node-local /tmp, the run on a shared filesystem), the move is a copy into the checkpoint's own name: a job killed
during it leaves a truncated `last.ckpt`, and a full /tmp fails a run whose own disk has room. Here the bytes go to a
temporary sibling (`files.temporary_sibling`: host and pid in its name), are flushed to the disk and renamed onto the
checkpoint in one step; a kill leaves the previous checkpoint as it was, and the next save on the host removes the
dead process's temporary. Running out of space is one line naming the file and the space it needs
(`StorageFullError`, exit 2), with the previous checkpoints intact. Remote paths (`s3://...`) keep Lightning's way.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from hpa_lightning.files import NO_SPACE_ERRNOS, no_space, remove_stale_temporaries, temporary_sibling


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose local saves are atomic renames of a fully written sibling (module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"storage_options are not supported by {type(self).__name__} for local paths")
        path = Path(path)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getbuffer()
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)  # left by a process of this host killed while it wrote
        tmp = temporary_sibling(path)
        try:
            with open(tmp, "wb") as handle:
                self.write(handle, data)
                handle.flush()
                os.fsync(handle.fileno())  # on the disk before the name points at it: a node crash keeps one whole
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            if err.errno in NO_SPACE_ERRNOS:
                raise no_space(path, len(data)) from None
            raise

    def write(self, handle: IO[bytes], data: memoryview) -> None:
        """Write the serialised checkpoint into the open temporary file (a subclass may write it another way)."""
        handle.write(data)
