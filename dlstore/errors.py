"""Errors a user can cause. The CLI prints any DlstoreError as one line and exits non-zero."""


class DlstoreError(Exception):
    """Base class: something the user gave (spec, store, run id, query, file) is wrong.

    The message is always one line: line breaks that arrive with user text (a key, a query)
    are shown escaped."""

    def __init__(self, message: str = ""):
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


class SpecError(DlstoreError):
    """A zoo spec is malformed: unknown key, wrong type, unknown dataset or architecture."""


class StoreError(DlstoreError):
    """A store is missing, unreadable, or not a dlstore store."""


class NotFoundError(DlstoreError):
    """A run id, step or blob that the store does not hold."""


class QueryError(DlstoreError):
    """A SQL query failed to parse, bind or run."""


class CorruptBlobError(DlstoreError):
    """A weight shard whose bytes do not match its content hash, or that cannot be read."""


class LayoutError(DlstoreError):
    """Weights that do not fit a layout (unknown tensor, wrong shape, rows of several layouts)."""


class UsageError(DlstoreError):
    """A command-line option is malformed, or needs an optional package that is not installed."""


class DataMismatchError(DlstoreError):
    """Regenerated training data differs from what a run recorded it trained on."""


def format_validation_error(error, prefix: str = "") -> str:
    """One line naming every bad field of a pydantic ValidationError, e.g.
    `train.lr: Input should be greater than 0; train.epochs: ...`."""
    parts = []
    for err in error.errors():
        loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts)
