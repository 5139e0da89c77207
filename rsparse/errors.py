"""The errors rsparse expects: a user's input or environment, not a bug.

Every one derives from `RsparseError`; the command line (rsparse.cli) prints it as one line
`error: <message>` and exits with status 2 (a traceback only with `--debug`). Anything else
that escapes is a bug and keeps its traceback. The kinds also derive from the built-in
exception a caller would expect (ValueError, FileNotFoundError, RuntimeError), so
`except ValueError` around a library call keeps working.
"""

from __future__ import annotations


class RsparseError(Exception):
    """Base class of the expected errors (see the module docstring)."""


class BadInputError(RsparseError, ValueError):
    """An argument or setting outside what it may be (a sparsity of 1.5, an unknown method, ...)."""


class RecipeError(BadInputError):
    """A recipe that does not fit the model it is applied to (missing or extra layers, shapes)."""


class UnreachableSparsityError(BadInputError):
    """A model-level sparsity that an MLP-only method cannot reach on this model."""


class UnsupportedModelError(RsparseError, ValueError):
    """The model is not a Llama-family decoder that rsparse can sparsify."""


class CheckpointError(RsparseError, ValueError):
    """A checkpoint that cannot be saved or loaded (corrupt, incomplete, newer format, ...)."""


class CheckpointFileMissing(CheckpointError, FileNotFoundError):
    """A file of the checkpoint (or the directory itself) does not exist."""


class MissingDataError(RsparseError, FileNotFoundError):
    """Data that is not there: a corpus file, the embedded model or data wheel, a results file."""


class EvaluationError(RsparseError, RuntimeError):
    """An evaluation that could not run (task data offline or missing, no scorer), with the reason."""


class EngineError(BadInputError):
    """A request the decode engine cannot serve (too long for the cache, too many prompts, ...)."""
