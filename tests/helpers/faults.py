"""Faults the real components meet: a disk that refuses every write."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from gateway.audit import AuditLog


@contextmanager
def full_disk(log: AuditLog) -> Iterator[None]:
    """Writes to ``log`` fail with ENOSPC, as on a full disk, until the block ends.

    The log's descriptor points at ``/dev/full`` meanwhile: the kernel's own "no space left on
    device", with the log's code unchanged.
    """
    saved = os.dup(log.fileno())
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        os.dup2(full, log.fileno())
        yield
    finally:
        os.dup2(saved, log.fileno())
        os.close(saved)
        os.close(full)
