"""Errors a user can cause. The CLI prints any DlstoreError as one line and exits non-zero."""


class DlstoreError(Exception):
    """Base class: something the user gave (spec, store, run id, query, file) is wrong.

    The message is always one line: line breaks that arrive with user text (a key, a query)
    are shown escaped."""

    def __init__(self, message: str = ""):
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


class SpecError(DlstoreError):
    """A zoo spec is malformed: unknown key, wrong type, unknown dataset or architecture."""


class DataSourceError(SpecError):
    """The files a spec's dataset reads (its `path`) are missing, unreadable or not in the
    format expected: a SpecError, since the spec names them, raised when they are first read."""


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
    """Regenerated training data differs from what a run recorded it trained on, or the files
    it was read from cannot be read any more."""


class BuildInterrupted(DlstoreError):
    """A build stopped by Ctrl-C or SIGTERM after keeping what had finished. The CLI prints the
    message as it is (it is no error of the user's) and exits 128 + the signal's number."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


# A spec with a million unknown keys once gave a 40 MB error line: name the first few.
MAX_REPORTED_ERRORS = 5
MAX_LOCATION_CHARS = 80
MAX_MESSAGE_CHARS = 200


def format_validation_error(error, prefix: str = "") -> str:
    """One line naming the bad fields of a pydantic ValidationError (the first few, and how many
    more), e.g. `train.lr: Input should be greater than 0; train.epochs: ...`."""
    errors = error.errors()
    parts = []
    for err in errors[:MAX_REPORTED_ERRORS]:
        loc = _clip(".".join(str(p) for p in (prefix, *err["loc"]) if p != ""),
                    MAX_LOCATION_CHARS)
        msg = _clip(err["msg"], MAX_MESSAGE_CHARS)  # a validator's message may quote user text
        parts.append(f"{loc}: {msg}" if loc else msg)
    if len(errors) > MAX_REPORTED_ERRORS:
        parts.append(f"and {len(errors) - MAX_REPORTED_ERRORS:,} more")
    return "; ".join(parts)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
