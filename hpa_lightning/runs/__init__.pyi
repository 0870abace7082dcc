from .attempts import AttemptLog
from .find import Job, failed_jobs, find_jobs
from .gpus import claim_for_job
from .outputs import write_evaluation, write_results
from .rerun import plan_rerun
from .status import JobGuard, JobHooks

__all__ = [
    "AttemptLog",
    "Job",
    "JobGuard",
    "JobHooks",
    "claim_for_job",
    "failed_jobs",
    "find_jobs",
    "plan_rerun",
    "write_evaluation",
    "write_results",
]
