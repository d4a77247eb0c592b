"""Running a job: the ``lit-gcpo`` command, checkpoints, resume, run directories, predictions."""
