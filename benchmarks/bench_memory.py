"""Peak memory of a server process and the processes it forks, read from Linux ``/proc``.

A single-process server's peak is exact: ``VmHWM`` of ``/proc/<pid>/status`` (the
kernel's high-water mark of resident memory). A server that forks a child per
association (``storescp --fork``) has no such figure for the whole tree, so a thread
samples the resident memory (``VmRSS``) of the process and all its descendants every
:data:`SAMPLE_S` seconds; the tree's peak is the largest sum seen. Shared pages of a
forked child count once per process, so the sampled sum is an upper estimate of what
the tree holds, and a peak shorter than one sample may be missed.
"""

from __future__ import annotations

import threading
from pathlib import Path

SAMPLE_S = 0.05


def _status_kib(pid: int, field: str) -> int:
    """A ``kB`` field (``VmHWM``, ``VmRSS``) of ``/proc/<pid>/status``; 0 once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    for line in text.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0  # a zombie has no memory fields


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (``/proc/<pid>/task/<tid>/children``, Linux 3.5+)."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return found
    for task in tasks:
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def tree_rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` and every descendant now, KiB."""
    total, todo, seen = 0, [pid], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        total += _status_kib(current, "VmRSS")
        todo += _children(current)
    return total


class PeakMemory:
    """Samples the resident memory of a process tree in a daemon thread until :meth:`stop`.

    Parameters
    ----------
    pid:
        The server's process; its descendants are found anew at each sample.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._peak_kib = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._sample()

    def _sample(self) -> None:
        now = max(_status_kib(self.pid, "VmHWM"), tree_rss_kib(self.pid))
        with self._lock:
            self._peak_kib = max(self._peak_kib, now)

    def peak_kib(self) -> int:
        """The larger of the root's ``VmHWM`` and the largest tree sum seen so far, KiB.

        Read it before the process ends: afterwards only the last sample's figure is left.
        """
        self._sample()
        with self._lock:
            return self._peak_kib

    def stop(self) -> None:
        """End the sampling thread (the figures so far stay readable)."""
        self._stop.set()
        self._thread.join()
