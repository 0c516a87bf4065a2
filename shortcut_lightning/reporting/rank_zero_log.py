"""Info lines that only rank 0 says, through the calling module's own logger (under ``shortcut_lightning``).

Lightning's ``rank_zero_info`` logs through Lightning's logger, so a user could not tell the library's lines
from Lightning's, nor silence them alone. Here a module passes its ``logging.getLogger(__name__)``, so
``logging.getLogger("shortcut_lightning").setLevel(logging.WARNING)`` silences every such line, and under DDP
one rank says it, not each.
"""

from __future__ import annotations

import logging

from lightning.pytorch.utilities import rank_zero_only


@rank_zero_only
def rank_zero_log(logger: logging.Logger, message: str, level: int = logging.INFO) -> None:
    """Logs ``message`` through ``logger`` at ``level`` on global rank 0 only (Lightning's ``rank_zero_only``).

    The record names the caller's line, not this helper's (``stacklevel`` skips it and the rank-0 wrapper).
    """
    logger.log(level, message, stacklevel=3)
