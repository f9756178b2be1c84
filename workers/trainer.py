"""TrainerActor: trains one model for a train job (on a GPU when there is one)."""

from __future__ import annotations

import ray
import torch

from dsq.db.session import make_engine
from dsq.kinds import train


@ray.remote(max_restarts=0)
class TrainerActor:
    def __init__(self, settings, threads: int, device: str = "cpu"):
        torch.set_num_threads(threads)
        self.settings, self.device = settings, device

    def train(self, job_id: int, spec) -> dict:
        engine = make_engine(self.settings.database_url, retry_seconds=self.settings.db_grace_seconds)
        try:
            return train.run_training(engine, self.settings, job_id, spec, self.device)
        finally:
            engine.dispose()
