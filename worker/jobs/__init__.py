"""The job record: models, the store (compare-and-swap status changes), submit() for the three doors.

SQLAlchemy only: importing this package pulls in neither torch nor the engine nor Flask.
"""

from .admission import QueueFull
from .crypto import SecretBox, fingerprint
from .db import Database
from .models import Credential, Delivery, Job, JobLog, JobSample, JobStatus, Rule
from .request import Attempt, MergeRequest
from .store import JobStore
from .submit import JobRequest, submit

__all__ = [
    "Attempt",
    "Credential",
    "Database",
    "Delivery",
    "Job",
    "JobLog",
    "JobRequest",
    "JobSample",
    "JobStatus",
    "JobStore",
    "MergeRequest",
    "QueueFull",
    "Rule",
    "SecretBox",
    "fingerprint",
    "submit",
]
