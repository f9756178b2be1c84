"""HTTP emulators: AWS Rekognition (JSON 1.1 protocol) and Azure AI Vision Image Analysis 4.0 (REST)."""

from __future__ import annotations

import base64
import binascii
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from dsq.apis.emulators.service import FAILED, THROTTLED, BadImage, Service

AWS_TARGET = "RekognitionService.DetectLabels"
AZURE_PATH = "/computervision/imageanalysis:analyze"
AZURE_MODEL = "2023-10-01"


class _Handler(BaseHTTPRequestHandler):
    service: Service
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - never log requests (they carry credentials)
        pass

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload: dict, content_type: str, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


class AwsHandler(_Handler):
    """``POST /`` with ``X-Amz-Target: RekognitionService.DetectLabels``."""

    def do_POST(self):  # noqa: N802
        body = self._body()
        if self.headers.get("X-Amz-Target") != AWS_TARGET:
            return self._error(400, "UnknownOperationException", "only DetectLabels is emulated")
        try:
            image = base64.b64decode(json.loads(body)["Image"]["Bytes"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error):
            return self._error(400, "InvalidParameterException", "Request has invalid parameters")
        gate = self.service.gate(_access_key_id(self.headers.get("Authorization") or ""))
        if gate == THROTTLED:
            return self._error(400, "ThrottlingException", "Rate exceeded")
        if gate == FAILED:
            return self._error(500, "InternalServerError", "Internal server error")
        try:
            labels = self.service.label(image)
        except BadImage:
            return self._error(400, "InvalidImageFormatException", "Request has invalid image format")
        answer = {"Labels": [{"Name": name, "Confidence": 100.0 * conf, "Instances": [], "Parents": [],
                              "Aliases": [], "Categories": []} for name, conf in labels],
                  "LabelModelVersion": "3.0"}
        self._send(200, answer, "application/x-amz-json-1.1", {"x-amzn-RequestId": str(uuid.uuid4())})

    def _error(self, status: int, code: str, message: str) -> None:
        self._send(status, {"__type": code, "message": message}, "application/x-amz-json-1.1",
                   {"x-amzn-RequestId": str(uuid.uuid4()), "x-amzn-ErrorType": code})


class AzureHandler(_Handler):
    """``POST /computervision/imageanalysis:analyze?features=tags&api-version=...`` with the image bytes."""

    def do_POST(self):  # noqa: N802
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        image = self._body()
        if url.path != AZURE_PATH or "api-version" not in query:
            return self._error(404, "404", "Resource not found")
        if "tags" not in ",".join(query.get("features", [])).lower().split(","):
            return self._error(400, "InvalidRequest", "only the tags feature is emulated")
        if not self.headers.get("Ocp-Apim-Subscription-Key"):
            return self._error(401, "401", "Access denied due to missing subscription key.")
        gate = self.service.gate(self.headers.get("Ocp-Apim-Subscription-Key"))
        if gate == THROTTLED:
            after = self.service.config.retry_after
            headers = {"Retry-After": f"{after:g}"} if after is not None else {}
            return self._error(429, "429", "Rate limit is exceeded. Try again later.", headers)
        if gate == FAILED:
            return self._error(500, "InternalServerError", "An unexpected error occurred.")
        try:
            labels = self.service.label(image)
        except BadImage:
            return self._error(400, "InvalidRequest", "Image format is not valid.")
        answer = {"modelVersion": AZURE_MODEL, "metadata": {"width": 0, "height": 0},
                  "tagsResult": {"values": [{"name": name, "confidence": conf} for name, conf in labels]}}
        self._send(200, answer, "application/json", {"apim-request-id": str(uuid.uuid4())})

    def _error(self, status: int, code: str, message: str, headers: dict | None = None) -> None:
        self._send(status, {"error": {"code": code, "message": message}}, "application/json", headers)


def _access_key_id(authorization: str) -> str | None:
    """The access key id of a SigV4 ``Authorization`` header (the secret key itself is never sent)."""
    _, found, rest = authorization.partition("Credential=")
    return rest.split("/", 1)[0] if found else None


HANDLERS = {"aws": AwsHandler, "azure": AzureHandler}


def serve(provider: str, service: Service, host: str, port: int):
    """Serve in a daemon thread; return (HOST:PORT, stop)."""
    handler = type(f"{provider.title()}Emulator", (HANDLERS[provider],), {"service": service})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name=f"dsq-emulator-{provider}", daemon=True)
    thread.start()

    def stop():
        server.shutdown()
        server.server_close()

    return f"{host}:{server.server_address[1]}", stop
