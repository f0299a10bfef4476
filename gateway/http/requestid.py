"""Request ids: one per request, echoed in X-Request-Id and stamped on its Kafka messages."""

from __future__ import annotations

import itertools
import re
import uuid

# An id a client or proxy sent is kept if it is short and plain: it goes into logs,
# Kafka headers and the response, where control characters or quotes would do harm.
_SANE = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")


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

    def adopt(self, supplied: str | None) -> str:
        """The id the caller sent in X-Request-Id if it is sane, else a new one."""
        if supplied and _SANE.fullmatch(supplied):
            return supplied
        return self.next()
