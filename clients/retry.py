"""Retries with exponential backoff and jitter, for errors a retry can fix.

Only `ServerUnavailableError` (not running, restarting, connection reset) and `ModelNotReadyError`
(a model loading after a restart) are retried by default: every other error would fail the same
way again. Inference requests to kiln's models are stateless, so sending one again is safe even
when the first attempt may have reached the server.

The default policy of `Client` and `AsyncClient` is `RetryPolicy()`: 3 attempts in all (2 retries),
waiting 0.05-0.1 s then 0.1-0.2 s, so a brief blip is ridden out and a dead server
is reported in well under a second. `RetryPolicy.disabled()` turns retries off; a policy with more
attempts and a `deadline_s` rides out a server restart (see docs/client.md).

With several replicas (`Client([url, ...])`), one attempt tries the replicas in turn: a refusal
goes to the next replica at once, and this policy's backoff comes only after every replica refused
(`kiln.clients._replicas`). There a request that may already have run (a connection lost after
sending) is sent again only when the call is idempotent; with one URL this policy alone decides,
as above.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from kiln.clients.errors import RETRYABLE, KilnError

DEFAULT_ATTEMPTS = 3
DEFAULT_INITIAL_BACKOFF_S = 0.1
DEFAULT_MAX_BACKOFF_S = 2.0
DEFAULT_MULTIPLIER = 2.0
DEFAULT_JITTER = 0.5


@dataclass(frozen=True)
class RetryPolicy:
    """When and how often a failed call is sent again.

    The n-th retry (n = 1, 2, ...) waits `min(max_backoff_s, initial_backoff_s * multiplier**(n-1))`
    scaled by a random factor in `[1 - jitter, 1]` (jitter=1.0 is AWS's "full jitter"; the default
    0.5 keeps at least half of each wait), so clients that failed together do not come back
    together.

    Attributes:
        max_attempts: Attempts in all, the first included; 1 disables retries.
        initial_backoff_s: The wait before the first retry (before jitter).
        max_backoff_s: The longest wait between two attempts (before jitter).
        multiplier: Growth of the wait per retry.
        jitter: Fraction of each wait that is randomized, 0 (none) to 1 (full).
        deadline_s: Give up retrying once this many seconds have passed since the first attempt
            (None: only `max_attempts` limits). The timeout of each attempt is separate.
        retry_on: The error classes worth retrying.
    """

    max_attempts: int = DEFAULT_ATTEMPTS
    initial_backoff_s: float = DEFAULT_INITIAL_BACKOFF_S
    max_backoff_s: float = DEFAULT_MAX_BACKOFF_S
    multiplier: float = DEFAULT_MULTIPLIER
    jitter: float = DEFAULT_JITTER
    deadline_s: float | None = None
    retry_on: tuple[type[KilnError], ...] = RETRYABLE

    def __post_init__(self) -> None:
        problems = []
        if self.max_attempts < 1:
            problems.append(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0:
            problems.append(f"initial_backoff_s must be >= 0, got {self.initial_backoff_s}")
        if self.max_backoff_s < self.initial_backoff_s:
            problems.append(
                f"max_backoff_s must be >= initial_backoff_s ({self.initial_backoff_s}), "
                f"got {self.max_backoff_s}"
            )
        if self.multiplier < 1:
            problems.append(f"multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            problems.append(f"jitter must be in [0, 1], got {self.jitter}")
        if self.deadline_s is not None and self.deadline_s <= 0:
            problems.append(f"deadline_s must be > 0 or None, got {self.deadline_s}")
        if problems:
            raise ValueError("invalid RetryPolicy: " + "; ".join(problems))

    @classmethod
    def disabled(cls) -> RetryPolicy:
        """A policy that never retries."""
        return cls(max_attempts=1)

    def backoff(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number `retry` (1 for the first retry)."""
        if retry < 1:
            raise ValueError(f"retry numbers start at 1, got {retry}")
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        factor = 1.0 - self.jitter * (rng or random).random()
        return base * factor

    def should_retry(self, error: BaseException, attempt: int, elapsed_s: float, wait_s: float) -> bool:
        """Whether to send the call again after `attempt` (1-based) failed with `error`.

        Args:
            error: The error the attempt raised.
            attempt: How many attempts were made so far.
            elapsed_s: Seconds since the first attempt started.
            wait_s: The backoff that would precede the next attempt.
        """
        if attempt >= self.max_attempts or not isinstance(error, self.retry_on):
            return False
        return self.deadline_s is None or elapsed_s + wait_s < self.deadline_s

    def waits(self, rng: random.Random | None = None) -> Iterator[float]:
        """The backoffs before each retry this policy allows (ignoring the deadline)."""
        for retry in range(1, self.max_attempts):
            yield self.backoff(retry, rng)
