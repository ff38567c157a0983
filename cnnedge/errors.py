"""Exit codes and the one exception type the CLI turns into a one-line message."""

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    PARTIAL = 1  # some inputs failed; the rest of the batch ran
    USAGE = 2  # bad arguments, missing data, unreadable model or checkpoint, unavailable provider
    CHECK_FAILED = 3  # a model disagrees with its documented layer table, or ONNX parity failed
    INTERNAL = 4  # a bug in cnnedge: rerun with CNNEDGE_DEBUG=1 for the traceback
    INTERRUPTED = 130  # SIGINT (Ctrl-C); the last completed epoch's checkpoint is kept
    BROKEN_PIPE = 141  # stdout's reader went away (`| head`): 128 + SIGPIPE, as a shell reports it; no message
    TERMINATED = 143  # SIGTERM; same guarantee as SIGINT


class CnnedgeError(Exception):
    """An error the user can act on: printed as one line, exits with `code`."""

    def __init__(self, message: str, code: int = ExitCode.USAGE):
        super().__init__(message)
        self.code = int(code)


class ImageError(Exception):
    """An input that cannot be turned into a network input; the message names the reason."""


class ImageTooLarge(ImageError):
    """An input refused for its size (bytes or pixels) before any work on it: `cnnedge serve` answers 413."""
