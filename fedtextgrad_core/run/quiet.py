"""One line for a user's mistake: this project's own errors reach Flower's log without a traceback.

Flower logs every exception that leaves a ServerApp with its traceback, and in simulation again as
the simulation's. For an error this project raised on purpose (a setting refused, too few clients
answered, a data file in the wrong format) the traceback says nothing the message does not, and it
buries the one line a user can act on under twenty. This filter, added to Flower's logger by the
apps, drops the traceback of such records (setting ``debug = true`` keeps it). A bug (any other
exception) keeps its traceback.
"""

from __future__ import annotations

import logging

from fedtextgrad_core.errors import FedTextGradError


def ours(error: BaseException | None) -> bool:
    """Whether ``error``, or an error it was raised from, is one of this project's own."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, FedTextGradError):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


class OwnErrorsWithoutTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and ours(record.exc_info[1]):
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_own_errors(logger: logging.Logger, enabled: bool = True) -> None:
    """Add the filter to ``logger`` once (an app's process may start many runs), or take it away."""
    present = [f for f in logger.filters if isinstance(f, OwnErrorsWithoutTraceback)]
    if enabled and not present:
        logger.addFilter(OwnErrorsWithoutTraceback())
    if not enabled:
        for found in present:
            logger.removeFilter(found)
