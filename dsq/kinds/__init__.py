"""Job kinds: one module each (its spec, its checks, what it holds while it runs), registered here once.

A kind is run by a loop in ``workers/`` named by ``run`` (``module:function``), so the library never
imports ``workers/``. Adding a kind is one module here with its ``KIND``, its entry in ``_load`` (and its
spec class in ``dsq.specs.SPECS``, which rebuilds stored specs), and its loop in ``workers/``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from dsq.errors import UnknownName


@dataclass(frozen=True)
class Kind:
    name: str
    spec: type  # frozen dataclass with to_dict(); constructing it validates it
    check: Callable  # (session, spec, settings) -> work total; raises a DsqError when the job cannot run
    demand: Callable  # (spec, cluster resources) -> what a running job holds, e.g. {"CPU": 1.0}
    run: str  # "module:function" in workers/: (engine, settings, job_id, spec, control) -> None

    def runner(self) -> Callable:
        module, _, function = self.run.partition(":")
        return getattr(importlib.import_module(module), function)


def _load() -> dict[str, Kind]:
    from dsq.kinds import certify, certify_api, train

    return {kind.name: kind for kind in (train.KIND, certify.KIND, certify_api.KIND)}


def get(name: str) -> Kind:
    kinds = _load()
    if name not in kinds:
        raise UnknownName(f"unknown job kind {name!r}; expected one of {', '.join(kinds)}")
    return kinds[name]


def on_gpu(cluster: dict) -> bool:
    return cluster.get("GPU", 0) >= 1
