"""Reads in flight over one NBD connection: handles, matching of replies, the window.

Sans-IO bookkeeping for a pipelined client (:class:`~edgevisor.storage.nbd_blocking.
BlockingReader`): the caller sends a *job* (one read, split into one or more NBD
commands when it is larger than the server's maximum payload) and receives replies in
whatever order the server sends them; NBD matches a reply to its command only by the
64-bit handle (simple replies may come in any order, and so may the chunks of different
structured replies). This module owns the handles, so two commands in flight can never
share one, and tells when a job is complete: when every one of its commands replied.

Theory of operation (one job)::

    add(pieces) --> IN FLIGHT (handles waiting) --reply(h) for each handle--> COMPLETE
    IN FLIGHT --drain() (the connection broke)--> ABANDONED (the caller fails or retries it)

A job whose piece got an error reply still waits for its other pieces (their payloads
are landing in the job's buffer) and then completes with the first error. The window's
size is the number of jobs in flight; :attr:`PipeWindow.depth` bounds it for callers that
ask :attr:`PipeWindow.has_room` before :meth:`PipeWindow.add`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from edgevisor.proto.nbd_wire import LocalProtocolError, RemoteProtocolError

__all__ = ["Completed", "PipeWindow"]


@dataclass(frozen=True)
class Completed:
    """A job whose every command replied; ``error`` 0 means its buffer is complete."""

    ticket: int
    error: int = 0
    message: str = ""
    error_offset: int = 0


@dataclass
class _Job:
    ticket: int
    waiting: dict[int, int] = field(default_factory=dict)  # handle -> offset of its piece
    error: int = 0
    message: str = ""
    error_offset: int = 0


class PipeWindow:
    """Jobs in flight over one connection (see the module docstring)."""

    def __init__(self, depth: int) -> None:
        if depth < 1:
            raise ValueError("a pipeline window holds at least one job")
        self.depth = depth
        self._handles = itertools.count(1)
        self._tickets = itertools.count(1)
        self._jobs: dict[int, _Job] = {}  # by ticket, in submission order
        self._owner: dict[int, _Job] = {}  # handle -> its job

    def __len__(self) -> int:
        return len(self._jobs)

    @property
    def has_room(self) -> bool:
        return len(self._jobs) < self.depth

    @property
    def commands(self) -> int:
        """Commands sent and not replied yet."""
        return len(self._owner)

    def add(self, offsets: list[int]) -> tuple[int, list[int]]:
        """A new job of one command per piece (``offsets``, for error messages): its
        ticket and the fresh handles to send its commands with, in that order."""
        if not offsets:
            raise LocalProtocolError("a job has at least one command")
        job = _Job(next(self._tickets))
        handles = [next(self._handles) for _ in offsets]
        for h, off in zip(handles, offsets, strict=True):
            job.waiting[h] = off
            self._owner[h] = job
        self._jobs[job.ticket] = job
        return job.ticket, handles

    def reply(self, handle: int, error: int = 0, message: str = "") -> Completed | None:
        """The reply to ``handle`` arrived; the job if that was its last command."""
        job = self._owner.pop(handle, None)
        if job is None:
            raise RemoteProtocolError(f"reply for handle {handle}, which is not in flight")
        off = job.waiting.pop(handle)
        if error and not job.error:
            job.error, job.message, job.error_offset = error, message, off
        if job.waiting:
            return None
        del self._jobs[job.ticket]
        return Completed(job.ticket, job.error, job.message, job.error_offset)

    def drain(self) -> list[int]:
        """Tickets of every job in flight, oldest first; the window is empty after."""
        tickets = list(self._jobs)
        self._jobs.clear()
        self._owner.clear()
        return tickets
