"""Running jobs: the Celery app and task, the per-job process, the runner, the pipeline and the reporter.

A job id travels queue.py → tasks.py → job_process.py → runner.py (claim, outcome) → pipeline.py (Hub → engine →
Hub), with reporting.py writing progress to the job row; reconcile.py finds dead, stuck or lost jobs. Importing
this package pulls in neither torch nor Celery.
"""
