"""Named exceptions of dsq.

Every error a user can cause is one of these; the job runner and the CLI catch
``DsqError`` at their boundary and show its message as one line (exit code 2).
Abstaining is a value (prediction -1), never an exception.
"""


class DsqError(Exception):
    """Base class: a problem with what was asked, explained in one line."""


class InvalidArgument(DsqError, ValueError):
    """A parameter is out of range or has the wrong shape (sigma, n, alpha, image...)."""


class UnknownName(DsqError, KeyError):
    """An architecture, dataset, objective, provider or denoiser name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(DsqError):
    """A checkpoint is missing, corrupt, or does not match its architecture."""


class DatasetMissing(DsqError):
    """A dataset folder or file is not where it was said to be."""


class ModelWeightsMissing(DsqError):
    """Pretrained weights are not cached locally and cannot be downloaded."""


class JobNotFound(DsqError):
    """No job has the given id."""


class JobStateError(DsqError):
    """The job is in a state that does not allow the request (cancel a finished job...)."""


class DatabaseUnreachable(DsqError):
    """The database URL is malformed or the server cannot be reached.

    ``transient``: the server did not answer at all (down, restarting, not up yet), which asking again may cure;
    a refused login or a missing database is not."""

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class ClusterUnreachable(DsqError):
    """The Ray address cannot be reached."""


class VersionMismatch(DsqError):
    """The cluster runs another dsq, Ray or Python (major.minor) than the client that joins it."""


class JobCancelled(DsqError):
    """Raised inside a running job when a cancel was requested."""


class ArtifactStoreError(DsqError):
    """The artifact store cannot be reached or used (no access, no such bucket...)."""


# Certifying vision APIs. No message ever holds a credential: they name the variable or profile to set.
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


class NonFiniteOutput(DsqError):
    """A model returned NaN or inf where dsq needs a finite image (a denoiser's output on the API path)."""


class TrainingDiverged(DsqError):
    """The training loss or the weights became NaN or inf; the job stops before anything is saved."""


class JobInterrupted(DsqError):
    """Raised inside a running job when its worker stops: the job goes back to the queue, nothing is lost."""
