"""Named errors of the API certification (all ``DsqError``: one line at the CLI and job boundary).

None of their messages ever holds a credential: they name the variables or profile to set, never a value.
"""

from dsq.errors import DsqError


class MissingCredentials(DsqError):
    """A real provider was asked for but its SDK finds no credentials."""


class EndpointUnreachable(DsqError):
    """The emulator or server named by ``--endpoint`` does not answer."""


class BudgetReached(DsqError):
    """The job stopped because its next query would exceed ``max_queries`` (resumable)."""


class ApiQueryFailed(DsqError):
    """A query kept failing after every retry (throttled, unavailable, or refused)."""


class UnreadableImage(DsqError):
    """An input is not a readable image (recorded for that image; the job goes on)."""
