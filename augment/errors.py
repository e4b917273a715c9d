"""Exceptions users cause, importable without torch (the CLI catches them before anything heavy is loaded)."""

import errno


class ModelError(ValueError):
    """A checkpoint the user pointed at that cannot be used."""


class DataError(ValueError):
    """Input data the user must fix; the message names the file, column or value."""


class WorkerError(RuntimeError):
    """A worker process kept dying (memory): what to lower, and that the same command resumes."""


class StorageError(OSError):
    """The disk refused a write (full, over quota, read-only): the message names the file and says how to resume."""

    DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})

    @classmethod
    def wrap(cls, err: OSError) -> "StorageError":
        where = f" writing {err.filename}" if err.filename else ""
        return cls(err.errno, f"{err.strerror or err}{where}: free space (or make the folder writable) and run "
                              "the same command again; it resumes from every finished stage")

    def __str__(self) -> str:
        return self.strerror or super().__str__()
