"""Federated rounds over Flower 1.42's Message API.

The model owner's side: the `ServerApp` (FedAvg of adapters weighted by examples, with
optional DP, SecAgg+ and per-client update-norm bounds), per-round checkpoints and
metrics, the candidate release, and the job runner for the simulation and deployment
engines. The data owner's `ClientApp` lives in `offsite.client.flower_app`.
"""


def __getattr__(name: str):
    # The server loads its job-runner hook as `offsite.server.federation:run_job`; import
    # Flower and Ray only when a job actually runs.
    if name == "run_job":
        from .job_runner import run_job

        return run_job
    raise AttributeError(name)
