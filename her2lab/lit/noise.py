"""Third-party messages that say nothing about a run, kept out of its output.

Each is matched by its exact text and origin, so that any other warning or message still shows:

- PyTorch Lightning's advertising tips on ``Trainer`` creation (install ``litlogger`` /
  ``litmodels``), which no setting turns off: dropped by a filter on Lightning's logger;
- the ``FutureWarning`` that ``torch.utils._pytree.LeafSpec`` is deprecated, raised inside
  Lightning's own ``utilities/_pytree.py`` on every fit (nothing a user of Lightning can change).
"""

from __future__ import annotations

import logging
import warnings

#: Lightning's logger for ``rank_zero_info`` messages.
LIGHTNING_INFO_LOGGER = "pytorch_lightning.utilities.rank_zero"
#: What the tips start with, and the packages they advertise.
_TIP = "💡 Tip:"
_ADVERTISED = ("pypi.org/project/litlogger/", "pypi.org/project/litmodels/")


class LightningTipFilter(logging.Filter):
    """Drops Lightning's tips advertising ``litlogger`` and ``litmodels``; passes everything else."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith(_TIP) and any(a in msg for a in _ADVERTISED))


def quiet_third_party() -> None:
    """Install the narrow filters described in this module's docstring (idempotent)."""
    loggers = {logging.getLogger(LIGHTNING_INFO_LOGGER)}
    try:  # the logger Lightning's rank_zero_info writes to now (set when Lightning is imported)
        from lightning_utilities.core import rank_zero

        loggers.add(rank_zero.log)
    except (ImportError, AttributeError):
        pass
    for lg in loggers:
        if not any(isinstance(f, LightningTipFilter) for f in lg.filters):
            lg.addFilter(LightningTipFilter())
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"pytorch_lightning\.utilities\._pytree",
    )
