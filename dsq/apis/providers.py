"""One client per vision API, on the vendor's official SDK.

Every client has ``detect(image_bytes) -> raw answer`` (a JSON-able dict, what is stored) and
``classify(error) -> ratelimit.Decision``; ``labels(provider, raw)`` turns a stored answer into
``[(label, confidence)]`` so answers can be re-read offline. The SDKs' own retries are switched off:
dsq retries (``ratelimit.Limiter``), so that it alone decides, counts and honours Retry-After.

Credentials come only from each SDK's standard configuration and never leave the SDK: they are not
passed through specs, the database, logs or error messages (``scrub`` removes any that a library
would echo). With an emulator endpoint, configured credentials are sent to it as they would be to
the vendor; without any, a placeholder is sent.

=========  =========================================================  ===================================
provider   credentials (standard configuration)                       call
=========  =========================================================  ===================================
aws        AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY (+ AWS_SESSION_   boto3 rekognition ``detect_labels``
           TOKEN), or AWS_PROFILE / ~/.aws/credentials; region from
           AWS_DEFAULT_REGION / the profile (boto3), else AWS_REGION
google     GOOGLE_APPLICATION_CREDENTIALS (service-account key file)   google-cloud-vision ``label_detection``
           or ``gcloud auth application-default login``
azure      VISION_ENDPOINT + VISION_KEY (the SDK's documented names)   azure-ai-vision-imageanalysis
                                                                      ``analyze`` with TAGS
clarifai   CLARIFAI_PAT (personal access token)                        clarifai-grpc ``PostModelOutputs``
                                                                      on ``general-image-recognition``
=========  =========================================================  ===================================
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from dsq import checks
from dsq.apis import ratelimit
from dsq.errors import MissingCredentials
from dsq.apis.ratelimit import FATAL, THROTTLE, TRANSIENT, Decision

MAX_LABELS = 10  # labels asked of an API: the top label decides; ten keep ties visible and answers small
TIMEOUT_S = 30.0  # one query's read timeout: vendors answer in well under a second; a stalled one is retried
PLACEHOLDER = "dsq-emulator"
SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "VISION_KEY", "CLARIFAI_PAT")
NEEDED = {
    "aws": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_DEFAULT_REGION), "
           "or AWS_PROFILE / ~/.aws/credentials",
    "aws region": "set AWS_REGION or AWS_DEFAULT_REGION (e.g. us-east-1), or a region in the profile "
                  "(~/.aws/config)",
    "google": "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or run "
              "`gcloud auth application-default login`",
    "azure": "set VISION_ENDPOINT (https://NAME.cognitiveservices.azure.com) and VISION_KEY",
    "clarifai": "set CLARIFAI_PAT (a Clarifai personal access token)",
}

PROVIDERS = ("aws", "google", "azure", "clarifai")
EMBEDDED = "embedded"  # the endpoint of an emulator started inside the API actor: no credentials, no network


class ProviderStatus(Exception):
    """A failure reported inside a normal response (Clarifai status, Vision per-image error)."""

    def __init__(self, code: int, message: str):
        super().__init__(f"status {code}: {message}")
        self.code = code


# -- credentials ------------------------------------------------------------------------


def has_credentials(provider: str, env: Mapping[str, str]) -> bool:
    """Whether credentials are configured, checked without contacting anything (no metadata servers)."""
    home = Path(env.get("HOME") or Path.home())
    if provider == "aws":
        files = [env.get("AWS_SHARED_CREDENTIALS_FILE") or home / ".aws" / "credentials"]
        return bool(env.get("AWS_ACCESS_KEY_ID") or env.get("AWS_PROFILE") or any(Path(f).is_file() for f in files))
    if provider == "google":
        config = Path(env.get("CLOUDSDK_CONFIG") or home / ".config" / "gcloud")
        return bool(env.get("GOOGLE_APPLICATION_CREDENTIALS")
                    or (config / "application_default_credentials.json").is_file())
    if provider == "azure":
        return bool(env.get("VISION_ENDPOINT") and env.get("VISION_KEY"))
    return bool(env.get("CLARIFAI_PAT"))


def check_credentials(provider: str, env: Mapping[str, str]) -> None:
    """Raise MissingCredentials (naming what to set, never a value) unless the real service can be called."""
    if provider == "aws":
        import boto3
        from botocore.exceptions import BotoCoreError

        try:
            session = boto3.session.Session()
            found = session.get_credentials() is not None
        except BotoCoreError as error:  # a profile that does not exist...
            raise MissingCredentials(f"AWS configuration unusable ({checks.first_line(error)}): "
                                     f"{NEEDED[provider]}") from None
        if not found:
            _missing(provider)
        if not aws_region(session, env):
            raise MissingCredentials(f"AWS credentials found but no region: {NEEDED['aws region']}")
    elif provider == "google":
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError

        try:
            google.auth.default()
        except DefaultCredentialsError:
            _missing(provider)
    elif not has_credentials(provider, env):
        _missing(provider)


def aws_region(session, env: Mapping[str, str]) -> str | None:
    """The region boto3 finds (AWS_DEFAULT_REGION, the profile), else AWS_REGION, which boto3 does not read."""
    return session.region_name or env.get("AWS_REGION") or None


def _missing(provider: str):
    raise MissingCredentials(f"no {provider} credentials found: {NEEDED[provider]}")



def scrub(text: str, env: Mapping[str, str]) -> str:
    """``text`` with the value of every credential variable replaced by ``***``."""
    for name in SECRET_VARS:
        value = env.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def host_port(endpoint: str) -> str:
    return endpoint.split("://", 1)[-1].rstrip("/")


def make_client(provider: str, endpoint: str | None, env: Mapping[str, str]):
    """The provider's client for the vendor (``endpoint=None``) or an emulator at ``endpoint``."""
    if endpoint == EMBEDDED:
        raise ValueError("an embedded emulator must be started first; pass its address")
    if endpoint is None:
        check_credentials(provider, env)
    return CLIENTS[provider](endpoint, env)


def labels(provider: str, raw: dict) -> list[tuple[str, float]]:
    """``[(label, confidence)]`` of a stored answer."""
    return CLIENTS[provider].labels(raw)


# -- AWS Rekognition --------------------------------------------------------------------


class AwsClient:
    provider = "aws"
    THROTTLES = {"ThrottlingException", "ProvisionedThroughputExceededException", "TooManyRequestsException",
                 "LimitExceededException"}
    TRANSIENTS = {"InternalServerError", "ServiceUnavailable", "ServiceUnavailableException"}

    def __init__(self, endpoint: str | None, env: Mapping[str, str]):
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError

        config = Config(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=10,
                        read_timeout=TIMEOUT_S)
        try:
            session = boto3.session.Session()
            options = {"config": config, "region_name": aws_region(session, env)}
            if endpoint is not None:
                options.update(endpoint_url=f"http://{host_port(endpoint)}",
                               region_name=options["region_name"] or "us-east-1")
                if session.get_credentials() is None:
                    options.update(aws_access_key_id=PLACEHOLDER, aws_secret_access_key=PLACEHOLDER)
            self.client = session.client("rekognition", **options)
        except BotoCoreError as error:
            raise MissingCredentials(f"AWS configuration unusable ({checks.first_line(error)}): "
                                     f"{NEEDED['aws']}") from None

    def detect(self, image: bytes) -> dict:
        answer = self.client.detect_labels(Image={"Bytes": image}, MaxLabels=MAX_LABELS)
        return {"Labels": [{"Name": label["Name"], "Confidence": float(label["Confidence"])}
                           for label in answer.get("Labels", [])],
                "LabelModelVersion": answer.get("LabelModelVersion")}

    @staticmethod
    def labels(raw: dict) -> list[tuple[str, float]]:
        return [(label["Name"], label["Confidence"]) for label in raw.get("Labels", [])]

    def classify(self, error: BaseException) -> Decision:
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(error, ClientError):
            code = error.response.get("Error", {}).get("Code", "")
            meta = error.response.get("ResponseMetadata", {})
            status = meta.get("HTTPStatusCode", 0)
            after = ratelimit.parse_retry_after((meta.get("HTTPHeaders") or {}).get("retry-after"))
            message = f"Rekognition {code or status}"
            if code in self.THROTTLES or status == 429:
                return Decision(THROTTLE, message, after)
            return Decision(TRANSIENT if code in self.TRANSIENTS or status >= 500 else FATAL, message, after)
        if isinstance(error, BotoCoreError):
            return Decision(TRANSIENT, f"Rekognition unreachable ({type(error).__name__})")
        return Decision(FATAL, f"Rekognition client error ({type(error).__name__})")


# -- Google Cloud Vision ----------------------------------------------------------------


class GoogleClient:
    provider = "google"
    THROTTLE_CODES = {8}  # RESOURCE_EXHAUSTED
    TRANSIENT_CODES = {2, 4, 10, 13, 14}  # UNKNOWN, DEADLINE_EXCEEDED, ABORTED, INTERNAL, UNAVAILABLE

    def __init__(self, endpoint: str | None, env: Mapping[str, str]):
        from google.cloud import vision_v1

        self.vision = vision_v1
        if endpoint is None:
            self.client = vision_v1.ImageAnnotatorClient()
        else:
            import grpc
            from google.cloud.vision_v1.services.image_annotator.transports import ImageAnnotatorGrpcTransport

            channel = grpc.insecure_channel(host_port(endpoint))
            self.client = vision_v1.ImageAnnotatorClient(transport=ImageAnnotatorGrpcTransport(channel=channel))

    def detect(self, image: bytes) -> dict:
        # retry=None: no SDK retries (dsq's limiter retries RESOURCE_EXHAUSTED, which the SDK would not)
        response = self.client.label_detection(image=self.vision.Image(content=image), max_results=MAX_LABELS,
                                               retry=None, timeout=TIMEOUT_S)
        if response.error.code:
            raise ProviderStatus(response.error.code, response.error.message)
        return {"labelAnnotations": [{"mid": a.mid, "description": a.description, "score": float(a.score)}
                                     for a in response.label_annotations]}

    @staticmethod
    def labels(raw: dict) -> list[tuple[str, float]]:
        return [(a["description"], a["score"]) for a in raw.get("labelAnnotations", [])]

    def classify(self, error: BaseException) -> Decision:
        from google.api_core import exceptions

        if isinstance(error, ProviderStatus):
            code, message = error.code, f"Vision status {error.code}"
        elif isinstance(error, exceptions.GoogleAPICallError):
            code = error.grpc_status_code.value[0] if error.grpc_status_code is not None else 2
            message = f"Vision {type(error).__name__}"
        else:
            return Decision(TRANSIENT if _is_rpc_error(error) else FATAL, f"Vision {type(error).__name__}")
        if code in self.THROTTLE_CODES:
            return Decision(THROTTLE, message, _retry_info(error))
        return Decision(TRANSIENT if code in self.TRANSIENT_CODES else FATAL, message)


def _retry_info(error: BaseException) -> float | None:
    for detail in getattr(error, "details", None) or []:
        delay = getattr(detail, "retry_delay", None)
        if delay is not None:
            return delay.seconds + delay.nanos / 1e9
    return None


def _is_rpc_error(error: BaseException) -> bool:
    import grpc

    return isinstance(error, grpc.RpcError)


# -- Azure AI Vision ---------------------------------------------------------------------


class AzureClient:
    provider = "azure"

    def __init__(self, endpoint: str | None, env: Mapping[str, str]):
        from azure.ai.vision.imageanalysis import ImageAnalysisClient
        from azure.ai.vision.imageanalysis.models import VisualFeatures
        from azure.core.credentials import AzureKeyCredential

        url = f"http://{host_port(endpoint)}" if endpoint is not None else env["VISION_ENDPOINT"].rstrip("/")
        key = env.get("VISION_KEY") or PLACEHOLDER
        self.features = [VisualFeatures.TAGS]
        self.client = ImageAnalysisClient(endpoint=url, credential=AzureKeyCredential(key), retry_total=0,
                                          connection_timeout=10, read_timeout=TIMEOUT_S, logging_enable=False)

    def detect(self, image: bytes) -> dict:
        result = self.client.analyze(image_data=image, visual_features=self.features)
        tags = result.tags.list if result.tags is not None else []
        return {"modelVersion": result.model_version,
                "tagsResult": {"values": [{"name": t.name, "confidence": float(t.confidence)} for t in tags]}}

    @staticmethod
    def labels(raw: dict) -> list[tuple[str, float]]:
        return [(t["name"], t["confidence"]) for t in raw.get("tagsResult", {}).get("values", [])]

    def classify(self, error: BaseException) -> Decision:
        from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

        if isinstance(error, HttpResponseError) and error.status_code is not None:
            status = error.status_code
            after = ratelimit.parse_retry_after(error.response.headers.get("Retry-After") if error.response else None)
            message = f"Image Analysis HTTP {status}"
            if status == 429:
                return Decision(THROTTLE, message, after)
            return Decision(TRANSIENT if status >= 500 or status == 408 else FATAL, message, after)
        if isinstance(error, (ServiceRequestError, ServiceResponseError)):
            return Decision(TRANSIENT, f"Image Analysis unreachable ({type(error).__name__})")
        return Decision(FATAL, f"Image Analysis client error ({type(error).__name__})")


# -- Clarifai ----------------------------------------------------------------------------


class ClarifaiClient:
    provider = "clarifai"
    USER_ID, APP_ID, MODEL_ID = "clarifai", "main", "general-image-recognition"

    def __init__(self, endpoint: str | None, env: Mapping[str, str]):
        from clarifai_grpc.grpc.api import resources_pb2, service_pb2, service_pb2_grpc
        from clarifai_grpc.grpc.api.status import status_code_pb2

        from clarifai_grpc.channel.clarifai_channel import ClarifaiChannel

        if endpoint is None:
            channel = ClarifaiChannel.get_grpc_channel()
        else:
            host, port = host_port(endpoint).rsplit(":", 1)
            channel = ClarifaiChannel.get_insecure_grpc_channel(base=host, port=int(port))
        self.stub = service_pb2_grpc.V2Stub(channel)
        self.resources, self.service, self.codes = resources_pb2, service_pb2, status_code_pb2
        self._metadata = (("authorization", f"Key {env.get('CLARIFAI_PAT') or PLACEHOLDER}"),)

    def detect(self, image: bytes) -> dict:
        r = self.resources
        request = self.service.PostModelOutputsRequest(
            user_app_id=r.UserAppIDSet(user_id=self.USER_ID, app_id=self.APP_ID), model_id=self.MODEL_ID,
            inputs=[r.Input(data=r.Data(image=r.Image(base64=image)))])
        response = self.stub.PostModelOutputs(request, metadata=self._metadata, timeout=TIMEOUT_S)
        if response.status.code != self.codes.SUCCESS:
            raise ProviderStatus(response.status.code, response.status.description)
        output = response.outputs[0]
        if output.status.code not in (0, self.codes.SUCCESS):
            raise ProviderStatus(output.status.code, output.status.description)
        return {"model": self.MODEL_ID, "concepts": [{"id": c.id, "name": c.name, "value": float(c.value)}
                                                     for c in output.data.concepts]}

    @staticmethod
    def labels(raw: dict) -> list[tuple[str, float]]:
        return [(c["name"], c["value"]) for c in raw.get("concepts", [])]

    def classify(self, error: BaseException) -> Decision:
        import grpc

        if isinstance(error, ProviderStatus):
            message = f"Clarifai status {error.code}"
            if error.code == self.codes.CONN_THROTTLED:
                return Decision(THROTTLE, message)
            transient = error.code >= 98000 or error.code in (21354, 40031, 40032)  # internal, busy, rpc
            return Decision(TRANSIENT if transient else FATAL, message)
        if isinstance(error, grpc.RpcError):
            code = error.code() if callable(getattr(error, "code", None)) else None
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                return Decision(THROTTLE, "Clarifai RESOURCE_EXHAUSTED")
            transient = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                 grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
            return Decision(TRANSIENT if transient else FATAL, f"Clarifai {code.name if code else 'RPC error'}")
        return Decision(FATAL, f"Clarifai client error ({type(error).__name__})")


CLIENTS = {"aws": AwsClient, "google": GoogleClient, "azure": AzureClient, "clarifai": ClarifaiClient}


def environment() -> Mapping[str, str]:
    """The process environment, for the edges (actor start, submit checks) that hand it in."""
    return os.environ
