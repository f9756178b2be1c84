"""Local stand-ins for the vision APIs, speaking each wire protocol well enough for the real SDK clients.

=========  ==============================================================  ==========================
provider   protocol                                                        SDK client setting
=========  ==============================================================  ==========================
aws        HTTP POST ``/``, ``X-Amz-Target: RekognitionService.DetectLabels``  boto3 ``endpoint_url``
           (``application/x-amz-json-1.1``); errors as ``{"__type": ...}``
google     gRPC ``google.cloud.vision.v1.ImageAnnotator/BatchAnnotateImages``  an insecure gRPC channel
azure      HTTP POST ``/computervision/imageanalysis:analyze?features=tags``   an ``http://`` endpoint
           (4.0 REST); 429 with ``Retry-After``
clarifai   gRPC ``clarifai.api.V2/PostModelOutputs``; throttling is status     an insecure gRPC channel
           11005 (CONN_THROTTLED) inside a normal response
=========  ==============================================================  ==========================

Labels come from a real local classifier (``labeller``): by default a logistic regression trained on
the digits train split, or any dsq classifier checkpoint. Faults are injected per request
(``EmulatorConfig``: a throttled fraction, a transient-error fraction, latency, Retry-After), drawn
from a seeded RNG. ``Ledger`` counts what was answered (billed) per sha256 of the image bytes.
"""

from __future__ import annotations

from dsq.apis.emulators.service import PROTOCOLS, EmulatorConfig, Ledger, Service


class Emulator:
    """A running emulator: ``address`` (HOST:PORT), ``service`` (faults, ledger), ``stop()``."""

    def __init__(self, provider: str, service: Service, address: str, stop):
        self.provider, self.service, self.address, self._stop = provider, service, address, stop

    @property
    def ledger(self) -> Ledger:
        return self.service.ledger

    @property
    def endpoint(self) -> str:
        return f"http://{self.address}" if self.provider in ("aws", "azure") else self.address

    def stop(self) -> None:
        self._stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start(provider: str, *, port: int = 0, labeller=None, config: EmulatorConfig = EmulatorConfig(),
          host: str = "127.0.0.1") -> Emulator:
    """Start the emulator of ``provider`` on ``host:port`` (0: a free port) in background threads."""
    from dsq.apis.emulators import grpc_servers, http_servers, labellers
    from dsq.errors import UnknownName

    if provider not in PROTOCOLS:
        raise UnknownName(f"unknown provider {provider!r}; expected one of {', '.join(PROTOCOLS)}")
    service = Service(labeller or labellers.digits_labeller(), config)
    module = http_servers if provider in ("aws", "azure") else grpc_servers
    address, stop = module.serve(provider, service, host, port)
    return Emulator(provider, service, address, stop)
