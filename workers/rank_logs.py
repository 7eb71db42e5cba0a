"""A rank's log lines into the job's log: warnings, checkpoints, restores, errors.

`RankLogs` is a logging handler a rank installs while it serves a job attempt: records of
the `workers` loggers at INFO and above, every other logger's WARNING and above, and
Python warnings (`logging.captureWarnings`: torch's, DCP's) are kept in a bounded buffer
and sent to the controller with `ReportLogs` whenever `flush()` is called (by the
heartbeat thread, once per beat, and when the rank ends). The controller appends them to
the job's log under the rank's number, so `ringmaster logs` shows them beside the
controller's own lines whatever launcher started the rank.

Memory is bounded (the oldest lines are dropped past `capacity`, with a line saying how
many); a controller that cannot be reached keeps the lines for the next flush.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from controller.rpc import ringmaster_pb2 as pb

WORKERS_LOGGER = "workers"


class RankLogs(logging.Handler):
    """See the module docstring; `attach()` while serving, `detach()` after."""

    def __init__(self, client, *, capacity: int = 1000, batch: int = 500):
        super().__init__(level=logging.INFO)
        self.client, self.batch = client, batch
        self._capacity = capacity
        self._lines: deque[pb.LogEntry] = deque(maxlen=capacity)
        self._dropped = 0
        self._send_lock = threading.Lock()
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING and not record.name.startswith(WORKERS_LOGGER):
            return
        if len(self._lines) == self._lines.maxlen:
            self._dropped += 1
        text = self.format(record).strip().splitlines()
        self._lines.append(pb.LogEntry(at=record.created, level=record.levelname,
                                       text=" ".join(text)[:8000] if text else ""))

    def flush(self) -> None:
        """Send what is buffered (a failed send keeps it for the next call)."""
        with self._send_lock:
            while self._lines:
                entries = [self._lines.popleft() for _ in range(min(self.batch,
                                                                    len(self._lines)))]
                if self._dropped:
                    entries.insert(0, pb.LogEntry(level="WARNING", text=f"{self._dropped} "
                                                  "log lines of this rank were dropped"))
                    self._dropped = 0
                try:
                    self.client.report_logs(entries)
                except Exception:  # away or fenced: keep them (bounded) and try again
                    self._lines.extendleft(reversed(entries[-self._capacity:]))
                    return

    def attach(self) -> RankLogs:
        root = logging.getLogger()
        root.addHandler(self)
        logging.captureWarnings(True)
        logging.getLogger(WORKERS_LOGGER).setLevel(logging.INFO)
        return self

    def detach(self) -> None:
        logging.getLogger().removeHandler(self)
        logging.captureWarnings(False)
