"""Run a preview job: one sampler actor with the certify job's f o D draws the preview of one of its images."""

from __future__ import annotations

import ray

from dsq import pipeline, previews, uploads
from dsq.db import repo
from dsq.db.session import session_scope
from workers import resources
from workers.certify_loop import model_sources, sampler_key, sampler_model
from workers.loop import POLL_SECONDS, Control
from workers.pool import ActorPool
from workers.sampler import SamplerActor


def run(engine, settings, job_id: int, spec, control: Control) -> None:
    target = spec.certify
    with session_scope(engine) as session:
        sources = model_sources(session, target)
    options, threads = resources.actor_options(1, resources.sized_for(control))
    device = resources.device_for("num_gpus" in options)
    model = sampler_model(sources, target)
    pool = control.pool or ActorPool()
    key = sampler_key(settings, threads, device, options)
    [actor] = pool.acquire(key, 1, lambda: SamplerActor.options(**options).remote(settings, threads, device))
    ended = False
    try:
        data = uploads.data_spec(settings, target)  # the store's copies of its folders, where it uploaded them
        channels = ray.get(actor.input_channels.remote(model))
        dataset, _ = pipeline.job_dataset(data, settings.data_root_of(data), channels)
        pending = actor.preview.remote(model, dataset[spec.image][0], sigma=target.sigma, seed=target.seed,
                                       image=spec.image, count=previews.SAMPLES)
        while not ray.wait([pending], timeout=POLL_SECONDS)[0]:
            control.check(engine, job_id)
        reply = ray.get(pending)
        with session_scope(engine) as session:
            repo.get_job(session, spec.job)  # deleted meanwhile: the preview has nowhere to go (one line)
            repo.upsert_preview(session, spec.job, spec.image, png=reply["png"], classes=reply["classes"])
            repo.add_log(session, job_id, f"stored the preview of image {spec.image} of job {spec.job}")
            repo.set_progress(session, job_id, 1, 1)
        control.report(1, 1)
        ended = True
    finally:
        pool.release(key, [actor], ended and control.pool is not None)
