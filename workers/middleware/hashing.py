"""The argon2id hashing threads start with the worker, before its own threads.

glibc gives each thread an arena for its mallocs, at most eight per core. A
thread started once they are all taken shares one, and the process's hashing
thread (``models.access_codes.GatedHasher``) used to start with the first new
account, after Dramatiq's consumer and worker threads: the busy thread it
shared with took small blocks out of each freed argon2id block, so the next
hash mapped another one. Started first, it keeps an arena and one block.
"""

from __future__ import annotations

from typing import Any

import dramatiq

from models.access_codes import HashParameters, password_hasher


class HashingThreads(dramatiq.Middleware):
    """Starts the process's argon2id hashing threads before the worker starts its own."""

    def __init__(self, *, parameters: HashParameters) -> None:
        self.parameters = parameters

    def before_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        password_hasher(self.parameters).start()
