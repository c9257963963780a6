"""The ``tissuegraph`` logger (standard library only).

Every module logs to ``logging.getLogger("tissuegraph")`` (or a child). As scanpy does for its
own logger, tissuegraph gives it one handler that writes the bare message to the current
``sys.stderr`` at level INFO, and does not propagate to the root logger (no duplicates when
an application configures logging too). So summaries and failures stay visible by default.

- quieter: ``logging.getLogger("tissuegraph").setLevel(logging.WARNING)``;
- route the messages elsewhere: remove :data:`HANDLER` from the logger and set its
  ``propagate`` back to ``True`` (or add your own handler);
- the command line sets the level with ``--verbose`` (DEBUG) and ``--quiet`` (WARNING).
"""

from __future__ import annotations

import logging
import sys

__all__ = ["HANDLER", "logger", "set_verbosity"]

LOGGER_NAME = "tissuegraph"


class _StderrHandler(logging.StreamHandler):
    """A stream handler bound to whatever ``sys.stderr`` is when a record is emitted (so
    redirections made after import, e.g. by test runners, are honoured)."""

    def __init__(self, level: int = logging.NOTSET):
        logging.Handler.__init__(self, level)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.setStream; the stream is always stderr
        pass


logger = logging.getLogger(LOGGER_NAME)

#: the handler tissuegraph adds to its logger (bare messages on stderr)
HANDLER: logging.Handler = (
    next((h for h in logger.handlers if isinstance(h, _StderrHandler)), None) or _StderrHandler()
)
if HANDLER not in logger.handlers:
    HANDLER.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(HANDLER)
    logger.propagate = False
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def set_verbosity(verbose: bool = False, quiet: bool = False) -> int:
    """Level of the ``tissuegraph`` logger: DEBUG with ``verbose``, WARNING with ``quiet``,
    else INFO. Returns the level."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logger.setLevel(level)
    if HANDLER not in logger.handlers:
        logger.addHandler(HANDLER)
    return level
