"""Progress lines with rate and ETA for long loops (training epochs, backfill batches)."""
from __future__ import annotations

import logging
import time


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """Log `label done/total (pct) elapsed, ETA` after each `update`; at most every
    `min_interval` seconds unless it is the last step."""

    def __init__(self, label: str, total: int, logger: logging.Logger, unit: str = "",
                 min_interval: float = 0.0):
        self.label, self.total, self.log, self.unit = label, max(int(total), 0), logger, unit
        self.min_interval = min_interval
        self.done = 0
        self.start = self._last = time.monotonic()

    def eta_seconds(self) -> float | None:
        if self.done == 0 or self.total == 0:
            return None
        elapsed = time.monotonic() - self.start
        return elapsed / self.done * (self.total - self.done)

    def update(self, n: int = 1, extra: str = "") -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last < self.min_interval and self.done < self.total:
            return
        self._last = now
        eta = self.eta_seconds()
        pct = 100.0 * self.done / self.total if self.total else 100.0
        msg = (f"{self.label} {self.done}/{self.total}{self.unit} ({pct:.0f}%) "
               f"elapsed {format_seconds(now - self.start)}")
        if eta is not None and self.done < self.total:
            msg += f", ETA {format_seconds(eta)}"
        self.log.info(msg + (f" | {extra}" if extra else ""))
