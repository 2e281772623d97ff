"""lorafold's worker side: the merge engine, Hub I/O, the job record and the Celery task.

Importing this package pulls in nothing heavy: `worker.jobs` needs only SQLAlchemy, `worker.engine` needs torch.
"""
