"""Test-only instrumentation, loaded into every Python process a test starts with this folder on
PYTHONPATH (the orchestrator, `accelerate launch`, and each stage rank). Production code has no hooks
for it.

RLHF_TEST_AUDIT_DIR      each process appends one JSON line per file write under RLHF_TEST_AUDIT_ROOT
                         (files opened for writing, and os.replace/os.rename destinations) to
                         <dir>/writes-<pid>.jsonl, tagged with its RANK.
RLHF_TEST_KILL_ON        a regex: the process SIGKILLs itself just before the RLHF_TEST_KILL_NTH-th
                         (default 1st) write whose path matches: a file opened for writing or
                         appending, or an os.replace destination (the middle of an atomic write,
                         after the temp data is on disk).
RLHF_TEST_ENOSPC_ON      a regex: opening a matching path for writing raises OSError(ENOSPC), as a
                         full disk would.
"""
import builtins
import errno
import io
import json
import os
import re
import signal

_audit_dir = os.environ.get("RLHF_TEST_AUDIT_DIR")
_audit_root = os.path.realpath(os.environ.get("RLHF_TEST_AUDIT_ROOT", "/"))
_kill_re = re.compile(os.environ["RLHF_TEST_KILL_ON"]) if os.environ.get("RLHF_TEST_KILL_ON") else None
_kill_nth = int(os.environ.get("RLHF_TEST_KILL_NTH", "1"))
_kill_seen = 0
_enospc_re = re.compile(os.environ["RLHF_TEST_ENOSPC_ON"]) if os.environ.get("RLHF_TEST_ENOSPC_ON") else None

_open, _os_open, _replace, _rename = builtins.open, os.open, os.replace, os.rename


def _audit(kind, path):
    if not _audit_dir:
        return
    try:
        real = os.path.realpath(os.fsdecode(path))
    except TypeError:  # a file descriptor
        return
    if not real.startswith(_audit_root) or real.startswith(os.path.realpath(_audit_dir)):
        return
    line = json.dumps({"pid": os.getpid(), "rank": os.environ.get("RANK", "0"), "kind": kind, "path": real}) + "\n"
    fd = _os_open(os.path.join(_audit_dir, f"writes-{os.getpid()}.jsonl"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _maybe_kill(path):
    global _kill_seen
    if _kill_re is not None and isinstance(path, (str, bytes, os.PathLike)) and _kill_re.search(os.fsdecode(path)):
        _kill_seen += 1
        if _kill_seen == _kill_nth:
            os.kill(os.getpid(), signal.SIGKILL)


def _maybe_full(path):
    if _enospc_re is not None and isinstance(path, (str, bytes, os.PathLike)) and _enospc_re.search(os.fsdecode(path)):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fsdecode(path))


def _audited_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+"):
        _maybe_kill(file)
        _maybe_full(file)
        _audit("open", file)
    return _open(file, mode, *args, **kwargs)


def _audited_os_open(path, flags, *args, **kwargs):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
        _maybe_kill(path)
        _maybe_full(path)
        _audit("open", path)
    return _os_open(path, flags, *args, **kwargs)


def _audited_replace(src, dst, *args, **kwargs):
    _maybe_kill(dst)
    _audit("replace", dst)
    return _replace(src, dst, *args, **kwargs)


def _audited_rename(src, dst, *args, **kwargs):
    _audit("replace", dst)
    return _rename(src, dst, *args, **kwargs)


if _audit_dir or _kill_re is not None or _enospc_re is not None:
    builtins.open = io.open = _audited_open  # pathlib opens through io.open
    os.open = _audited_os_open
    os.replace = _audited_replace
    os.rename = _audited_rename
