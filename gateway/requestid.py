"""Request ids: one per request, echoed in X-Request-Id and stamped on its Kafka messages."""

from __future__ import annotations

import itertools
import uuid


class RequestIds:
    """Ids unique across workers and restarts: a random prefix drawn per app, and a count.

    Cheaper than a uuid4 per request, which costs a getrandom() system call. Made in
    create_app, so each forked worker draws its own prefix.
    """

    def __init__(self) -> None:
        self._prefix = uuid.uuid4().hex[:16]
        self._count = itertools.count(1)

    def next(self) -> str:
        """The next id: 32 hex digits."""
        return f"{self._prefix}{next(self._count):016x}"
