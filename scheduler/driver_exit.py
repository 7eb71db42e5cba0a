"""The job driver's exit protocol: the one copy both of its sides import.

`python -m workers.driver` ends every attempt with one of these statuses (and writes
`{"code", "message", "reason"}` to its exit file first); the controller's launchers read
them back, from the process (controller.launchers.ray) or from the Ray job API's
`driver_exit_code` (controller.launchers.kubernetes), and turn them into events:

    EXIT_OK      0  every rank finished, or drained after a stop request -> COMPLETED
    EXIT_LOST    1  a rank died, failed or was fenced off: the attempt is lost and the
                    job's restart policy decides -> WORKER_LOST (as is any other status)
    EXIT_FAILED  3  the job cannot run as specified; a restart will not help -> FAILED

`INVALID_INPUT` is the exit file's `reason` when the user's data or config is at fault.
It lives in scheduler/ because that is the torch-free layer both the controller and the
workers may import (docs/architecture.md).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_LOST = 1
EXIT_FAILED = 3
INVALID_INPUT = "InvalidInput"

__all__ = ["EXIT_FAILED", "EXIT_LOST", "EXIT_OK", "INVALID_INPUT"]
