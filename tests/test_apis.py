"""Vision-API certification: the real SDK clients against the local emulators, on a real local Ray and SQLite.

Each job is small (a few digits, n0 = 5, n = 20) so the whole file runs in well under a minute once Ray is up.
"""

from __future__ import annotations

import io
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from dsq import datasets, jobs, kinds
from dsq.apis import base, emulators, labels, providers, ratelimit
from dsq.errors import MissingCredentials
from dsq.db import repo
from dsq.db.session import open_database, session_scope
from dsq.errors import InvalidArgument, UnknownName
from dsq.kinds import certify_api
from dsq.kinds.certify_api import ApiCertifySpec


PROVIDERS = ("aws", "google", "azure", "clarifai")
N0, N = 5, 20
PER_IMAGE = N0 + N + 1
FAST = dict(qps=1000.0, burst=100, concurrency=8)


@pytest.fixture
def db(settings, opens_database):
    engine = open_database(settings.database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def emulator(request):
    started = []

    def start(provider: str, **config) -> emulators.Emulator:
        started.append(emulators.start(provider, config=emulators.EmulatorConfig(**config)))
        return started[-1]

    yield start
    for one in started:
        one.stop()


def api_spec(provider: str, endpoint: str, **overrides) -> ApiCertifySpec:
    fields = dict(provider=provider, sigma=0.25, dataset="digits", max_images=2, n0=N0, n=N, endpoint=endpoint,
                  **FAST)
    return ApiCertifySpec(**{**fields, **overrides})


def submit(engine, settings, spec) -> int:
    with session_scope(engine) as session:
        return jobs.submit(session, spec, settings).id


def run(settings, job_id: int) -> str:
    from workers import runner

    return runner.run_job(settings, job_id)


def results(engine, job_id: int):
    with session_scope(engine) as session:
        return repo.results_for_job(session, job_id)


def digests(row) -> list[str]:
    sha = row.extra["sha256"]
    return [sha["clean"], *sha["selection"], *sha["estimation"]]


def assert_each_paid_once(rows, ledger) -> None:
    """Every query of every image was answered (billed) exactly once: n0 + n + 1 per image."""
    for row in rows:
        assert len(set(digests(row))) == PER_IMAGE
        assert sum(ledger.answered[d] for d in set(digests(row))) == PER_IMAGE
        assert {ledger.answered[d] for d in digests(row)} == {1}


# -- the base classifier ---------------------------------------------------------------


def test_noise_has_an_identity_so_a_retry_resends_the_same_bytes():
    x = torch.rand(1, 8, 8)
    common = dict(sigma=0.5, seed=7, image=3, n0=4, n=6)
    first, again = base.image_queries(x, None, **common), base.image_queries(x, None, **common)
    assert [q.image for q in first] == [q.image for q in again]
    assert [q.phase for q in first] == ["clean"] + ["selection"] * 4 + ["estimation"] * 6
    assert len({q.sha256 for q in first}) == 11  # selection and estimation never share a draw
    other_image = base.image_queries(x, None, **{**common, "image": 4})
    assert not {q.sha256 for q in first[1:]} & {q.sha256 for q in other_image[1:]}
    assert first[0].image == base.encode_png(x)  # the clean query: no noise, no denoiser


def test_denoiser_sees_the_clipped_noisy_image_and_its_output_is_clamped_and_8_bit():
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, batch):
            seen.append(batch.clone())
            return batch * 3 - 1  # out of [0, 1] on purpose

    x = torch.full((1, 4, 4), 0.5)
    queries = base.phase_queries(x, Recorder(), sigma=2.0, seed=0, image=0, phase="estimation", num=3)
    assert seen[0].min() >= 0 and seen[0].max() <= 1
    expected = torch.round((seen[0] * 3 - 1).clamp(0, 1) * 255) / 255
    for query, image in zip(queries, expected):
        decoded = np.asarray(Image.open(io.BytesIO(query.image)), dtype=np.float32) / 255
        assert np.allclose(decoded, image[0].numpy(), atol=1e-6)


def test_top_label_ties_break_lexicographically_and_an_empty_answer_is_its_own_class():
    assert labels.top_label([("dog", 0.9), ("cat", 0.9), ("ant", 0.5)]) == "cat"
    assert labels.top_label([]) == labels.NO_LABEL
    result = labels.certify_labels("cat", ["dog", "cat", "cat", "<none>"], ["cat"] * 99 + ["dog"], alpha=0.001, sigma=0.5)
    assert result.labels == ["<none>", "cat", "dog"]
    assert result.certified_label == "cat" and result.correct and result.cert.radius > 0
    tie = labels.certify_labels("zebra", ["b", "a"], ["a"] * 100, alpha=0.001, sigma=0.5)
    assert tie.certified_label == "a" and not tie.correct  # the tie went to "a"; the API said "zebra"


# -- rate limits and retries -----------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now, self.slept = 0.0, []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds


def test_token_bucket_allows_a_burst_then_the_rate():
    clock = FakeClock()
    bucket = ratelimit.TokenBucket(rate=10, burst=3, clock=clock)
    assert [bucket.reserve() for _ in range(3)] == [0, 0, 0]
    assert [round(bucket.reserve(), 6) for _ in range(2)] == [0.1, 0.2]  # queued fairly
    clock.now += 1.0
    assert bucket.reserve() == 0


def test_retries_back_off_honour_retry_after_and_resend_the_same_bytes():
    clock = FakeClock()
    limiter = ratelimit.Limiter(ratelimit.Limits(qps=1e6, burst=10, concurrency=2), ratelimit.RetryPolicy(base=0.1),
                                clock=clock, sleep=clock.sleep, rng=random.Random(0))
    sent = []
    outcomes = iter(["throttle", "transient", "ok"])

    def send():
        sent.append(b"same bytes")
        kind = next(outcomes)
        if kind != "ok":
            raise RuntimeError(kind)
        return {"answer": 1}

    def classify(error):
        return ratelimit.Decision(str(error), str(error), 2.5 if str(error) == "throttle" else None)

    assert limiter.call(send, classify) == {"answer": 1}
    assert sent == [b"same bytes"] * 3
    assert clock.slept[0] >= 2.5 and clock.slept[1] <= 0.2  # Retry-After, then jittered backoff
    assert limiter.retries == {"throttle": 1, "transient": 1}
    with pytest.raises(ratelimit.QueryRefused):
        limiter.call(lambda: (_ for _ in ()).throw(ValueError("bad image")),
                     lambda e: ratelimit.Decision("fatal", "bad"))
    short = ratelimit.Limiter(ratelimit.Limits(1e6, 10, 2), ratelimit.RetryPolicy(max_attempts=3), sleep=lambda s: None)
    with pytest.raises(ratelimit.RetriesExhausted):
        short.call(lambda: (_ for _ in ()).throw(RuntimeError("x")), lambda e: ratelimit.Decision("throttle", "slow"))


# -- the SDK clients against the emulators ---------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
def test_sdk_client_reads_labels_and_classifies_failures(provider, emulator):
    server = emulator(provider, retry_after=1.5)
    client = providers.make_client(provider, server.endpoint, {})
    digit = base.encode_png(datasets.get_dataset("digits", "test")[0][0])
    raw = client.detect(digit)
    assert labels.top_label(providers.labels(provider, raw)) == "zero"
    for fault, kind in (("throttle", "throttle"), ("errors", "transient")):
        server.service.configure(**{fault: 1.0})
        with pytest.raises(Exception) as failure:
            client.detect(digit)
        decision = client.classify(failure.value)
        assert decision.kind == kind
        if provider == "azure" and kind == "throttle":
            assert decision.retry_after == 1.5
        server.service.configure(**{fault: 0.0})
    with pytest.raises(Exception) as failure:
        client.detect(b"not an image")
    assert client.classify(failure.value).kind == "fatal"
    assert server.ledger.billed == 1


@pytest.mark.parametrize("provider", PROVIDERS)
def test_missing_credentials_name_what_to_set(provider, monkeypatch, tmp_path):
    for name in (*providers.SECRET_VARS, "AWS_PROFILE", "GOOGLE_APPLICATION_CREDENTIALS", "VISION_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("NO_GCE_CHECK", "True")
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    assert not providers.has_credentials(provider, os.environ)
    assert certify_api.default_endpoint(provider, os.environ) == "embedded"
    with pytest.raises(MissingCredentials) as missing:
        providers.check_credentials(provider, os.environ)
    message = str(missing.value)
    assert "\n" not in message and provider in message
    assert {"aws": "AWS_ACCESS_KEY_ID", "google": "GOOGLE_APPLICATION_CREDENTIALS", "azure": "VISION_KEY",
            "clarifai": "CLARIFAI_PAT"}[provider] in message


def _aws_keys_only(monkeypatch, tmp_path):
    """AWS keys in the environment and nothing else: no region, no profile, no config files, no metadata server."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLEKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "example-secret-key")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_aws_keys_without_a_region_say_the_region_is_missing(monkeypatch, tmp_path):
    _aws_keys_only(monkeypatch, tmp_path)
    with pytest.raises(MissingCredentials) as missing:
        providers.check_credentials("aws", os.environ)
    message = str(missing.value)
    assert "no aws credentials" not in message.lower() and "\n" not in message
    assert "region" in message and "AWS_REGION" in message and "AWS_DEFAULT_REGION" in message
    assert "example-secret-key" not in message and "AKIDEXAMPLEKEY" not in message


@pytest.mark.parametrize("variable", ["AWS_REGION", "AWS_DEFAULT_REGION"])
def test_aws_region_from_either_variable_reaches_the_client(monkeypatch, tmp_path, variable):
    _aws_keys_only(monkeypatch, tmp_path)
    monkeypatch.setenv(variable, "eu-west-1")
    providers.check_credentials("aws", os.environ)
    client = providers.make_client("aws", None, os.environ)  # builds the client; sends nothing
    assert client.client.meta.region_name == "eu-west-1"


# -- the spec --------------------------------------------------------------------------


def test_spec_round_trips_and_refuses_bad_input():
    spec = api_spec("clarifai", "127.0.0.1:5000", inputs=("a.png", "b.jpg"), dataset=None, max_queries=500,
                    price_per_1000=2.0)
    assert kinds.from_dict(spec.to_dict()) == spec
    assert kinds.from_dict(spec.to_dict()) == spec
    assert (spec.n0, spec.n) == (N0, N) and ApiCertifySpec("aws", 0.5, dataset="digits").n0 == 20
    bad = [dict(provider="bing"), dict(sigma=0), dict(sigma=-1.0), dict(n0=0), dict(n=0), dict(alpha=1.5),
           dict(alpha=0), dict(max_queries=PER_IMAGE - 1), dict(dataset=None), dict(inputs=("x.png",)),
           dict(endpoint="not an address"), dict(concurrency=1000), dict(qps=0)]
    for change in bad:
        with pytest.raises((InvalidArgument, UnknownName)):
            api_spec(change.pop("provider", "aws"), change.pop("endpoint", "127.0.0.1:5000"), **change)


# -- the answer cache on SQLite and PostgreSQL -----------------------------------------


def test_answers_are_kept_first_come_and_counted_for_the_paying_job(engine):
    from alembic import command

    from dsq.db.session import alembic_config

    with engine.begin() as connection:
        command.check(alembic_config(connection))  # models and migrations agree
    with session_scope(engine) as session:
        job_id = repo.create_job(session, kind="certify_api", spec={}, seed=0).id
        first = dict(provider="aws", service="vendor", sha256="a" * 64, top_label="cat", job_id=job_id)
        assert repo.store_api_answer(session, answer={"Labels": [{"Name": "cat", "Confidence": 99.0}]}, **first)
        assert not repo.store_api_answer(session, answer={"Labels": []}, **{**first, "top_label": "<none>"})
        assert repo.store_api_answer(session, answer={}, **{**first, "service": "embedded", "job_id": None})
        stored = repo.api_answers(session, "aws", "vendor", ["a" * 64, "b" * 64])
        assert list(stored) == ["a" * 64] and stored["a" * 64].top_label == "cat"
        assert stored["a" * 64].answer == {"Labels": [{"Name": "cat", "Confidence": 99.0}]}
        assert repo.count_paid_api_answers(session, job_id) == 1
