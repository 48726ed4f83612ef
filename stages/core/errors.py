"""The errors a stage reports to the user in one line, and how a filesystem failure becomes one line."""
from __future__ import annotations

import errno


class StageError(RuntimeError):
    """A stage cannot proceed; the message is one line for the user."""


class ModelError(RuntimeError):
    """A model could not be provisioned or loaded; the message is one line for the user."""


def os_error_line(e: OSError) -> str:
    """A filesystem error as one line for the user (the CLI and every stage entry use it)."""
    if e.errno == errno.ENOSPC:
        return f"no space left on device while writing {e.filename or 'an artifact'}"
    return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")


def disk_full_error(e: BaseException) -> bool:
    """Whether an exception (or one it was raised from) is a full disk, whatever library raised it:
    safetensors' SafetensorError and torch.save's RuntimeError carry only the OS message."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        text = str(e)
        if "No space left on device" in text or "os error 28" in text or "error code: 28" in text:
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False
