"""The ``certify-api`` kind: certify a vision API's smoothed top label (its checks live in ``dsq.apis.jobs``)."""

from __future__ import annotations

from dsq.apis import jobs as api_jobs
from dsq.apis.spec import ApiCertifySpec
from dsq.kinds import Kind


def demand(spec: ApiCertifySpec, cluster: dict) -> dict:
    """Its API actor mostly waits on the network: a quarter of a CPU."""
    return {"CPU": 0.25}


KIND = Kind(name="certify_api", spec=ApiCertifySpec, check=api_jobs.check_spec, demand=demand,
            run="workers.api_runner:run")
