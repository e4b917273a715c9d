"""Exceptions users cause, importable without torch (the CLI catches them before anything heavy is loaded).

Every error a user can act on (a config value, a data file, a checkpoint, a run folder, a full disk) derives from
`UserError`: entry points print its message as one `error:` line (exit 2), and the flow does not retry it. The
exceptions of the other modules (`ConfigError`, `RunFolderError`, `RecordError`, the Prefect server's
`ServerError`) derive from it too, beside the builtin they have always been (ValueError, OSError, RuntimeError)."""

import errno


class UserError(Exception):
    """An error the user must fix (or wait out): its message names the file, field or value and what to do."""


class ModelError(UserError, ValueError):
    """A checkpoint the user pointed at that cannot be used."""


class DataError(UserError, ValueError):
    """Input data the user must fix; the message names the file, column or value."""


class WorkerError(UserError, RuntimeError):
    """A worker process kept dying (memory): what to lower, and that the same command resumes."""


class StorageError(UserError, OSError):
    """The disk refused a write (full, over quota, read-only): the message names the file and says how to resume."""

    DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})

    @classmethod
    def wrap(cls, err: OSError) -> "StorageError":
        where = f" writing {err.filename}" if err.filename else ""
        return cls(err.errno, f"{err.strerror or err}{where}: free space (or make the folder writable) and run "
                              "the same command again; it resumes from every finished stage")

    def __str__(self) -> str:
        return self.strerror or super().__str__()


# What entry points report as one line: every UserError, and a file the user named that is not there (a missing
# run folder file, a config path).
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError)


def user_error_names() -> set[str]:
    """The class names of every user error defined so far (log lines name an exception by its class)."""
    names, todo = set(), [UserError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names | {FileNotFoundError.__name__}
