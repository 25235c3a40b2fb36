"""A dependency-free progress bar for long runs (benchmarks, training, the demo)."""

from __future__ import annotations

import sys
import time


class Progress:
    """``[#####.....] 12/40 3s label`` on stderr: redrawn in place on a terminal; elsewhere
    (CI logs) one line per 5% of the run, so that thousands of steps stay readable."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.tty = total, 0, sys.stderr.isatty()
        self.start = time.perf_counter()
        self._last_logged = -1

    def step(self, label: str) -> None:
        self.done += 1
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        elapsed = time.perf_counter() - self.start
        line = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {elapsed:5.0f}s {label}"
        if self.tty:
            sys.stderr.write("\r" + line[:120].ljust(120))
            if self.done == self.total:
                sys.stderr.write("\n")
        else:
            twentieth = 20 * self.done // max(self.total, 1)
            if twentieth == self._last_logged and self.done != self.total and self.total > 40:
                return
            self._last_logged = twentieth
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
