"""Files of ours in the shared temporary folder: unpredictable names made with O_EXCL (a link planted under a
predictable name could redirect a write), tagged with the owner's pid so that the next run removes what a killed
one (SIGKILL runs no cleanup) left behind."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path


def create(prefix: str, suffix: str) -> tuple[int, Path]:
    """A new private file `<tmp>/<prefix><pid>-<random><suffix>` (0600, never an existing path or link); returns
    its descriptor and path. Stale files of the same kind are swept first."""
    sweep(prefix, suffix)
    fd, path = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}-", suffix=suffix)
    return fd, Path(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def sweep(prefix: str, suffix: str) -> int:
    """Remove this user's `<prefix><pid>-*<suffix>` files whose process is gone; returns how many."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)-[^/]*" + re.escape(suffix) + "$")
    removed = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(tempfile.gettempdir()):
            m = pattern.match(entry.name)
            if not m or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
                continue
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_uid == os.getuid():
                    os.unlink(entry.path)
                    removed += 1
    return removed
