"""gRPC emulators: Google Cloud Vision (ImageAnnotator) and Clarifai (V2 PostModelOutputs)."""

from __future__ import annotations

from concurrent import futures

import grpc

from dsq.apis.emulators.service import FAILED, THROTTLED, BadImage, Service

WORKERS = 32  # server threads: above an API actor's default concurrency, so the emulator never throttles by itself


def _google_handler(service: Service):
    from google.cloud import vision_v1
    from google.rpc import status_pb2

    def batch_annotate(request, context):
        gate = service.gate(None)  # an insecure channel carries no Google credentials
        if gate == THROTTLED:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "Quota exceeded for quota metric 'Requests'")
        if gate == FAILED:
            context.abort(grpc.StatusCode.UNAVAILABLE, "The service is currently unavailable.")
        responses = []
        for one in request.requests:
            try:
                labels = service.label(one.image.content)
            except BadImage:
                bad = status_pb2.Status(code=3, message="Bad image data.")  # INVALID_ARGUMENT, inside the reply
                responses.append(vision_v1.AnnotateImageResponse(error=bad))
                continue
            limit = one.features[0].max_results if one.features and one.features[0].max_results else len(labels)
            responses.append(vision_v1.AnnotateImageResponse(label_annotations=[
                vision_v1.EntityAnnotation(mid=f"/m/{name}", description=name, score=conf, topicality=conf)
                for name, conf in labels[:limit]]))
        return vision_v1.BatchAnnotateImagesResponse(responses=responses)

    method = grpc.unary_unary_rpc_method_handler(
        batch_annotate, request_deserializer=vision_v1.BatchAnnotateImagesRequest.deserialize,
        response_serializer=vision_v1.BatchAnnotateImagesResponse.serialize)
    return grpc.method_handlers_generic_handler("google.cloud.vision.v1.ImageAnnotator",
                                                {"BatchAnnotateImages": method})


def _clarifai_servicer(service: Service):
    from clarifai_grpc.grpc.api import resources_pb2, service_pb2, service_pb2_grpc
    from clarifai_grpc.grpc.api.status import status_code_pb2 as codes
    from clarifai_grpc.grpc.api.status import status_pb2

    def status(code, description):
        return status_pb2.Status(code=code, description=description)

    class ClarifaiEmulator(service_pb2_grpc.V2Servicer):
        def PostModelOutputs(self, request, context):  # noqa: N802
            authorization = dict(context.invocation_metadata()).get("authorization", "")
            if not authorization.startswith("Key "):
                return service_pb2.MultiOutputResponse(status=status(codes.CONN_KEY_INVALID, "API key not found"))
            gate = service.gate(authorization[len("Key "):])
            if gate == THROTTLED:
                return service_pb2.MultiOutputResponse(status=status(codes.CONN_THROTTLED, "Making too many requests"))
            if gate == FAILED:
                return service_pb2.MultiOutputResponse(status=status(codes.INTERNAL_SERVER_ISSUE, "Internal error"))
            outputs, ok = [], True
            for one in request.inputs:
                try:
                    labels = service.label(one.data.image.base64)
                except BadImage:
                    ok = False
                    outputs.append(resources_pb2.Output(status=status(codes.INPUT_DOWNLOAD_FAILED, "Bad image")))
                    continue
                concepts = [resources_pb2.Concept(id=f"ai_{name}", name=name, value=conf, app_id="main")
                            for name, conf in labels]
                outputs.append(resources_pb2.Output(status=status(codes.SUCCESS, "Ok"),
                                                    data=resources_pb2.Data(concepts=concepts)))
            overall = status(codes.SUCCESS, "Ok") if ok else status(codes.FAILURE, "Failure")
            return service_pb2.MultiOutputResponse(status=overall, outputs=outputs)

    return ClarifaiEmulator()


def serve(provider: str, service: Service, host: str, port: int):
    """Serve on a thread pool; return (HOST:PORT, stop)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix=f"dsq-{provider}"))
    if provider == "google":
        server.add_generic_rpc_handlers((_google_handler(service),))
    else:
        from clarifai_grpc.grpc.api import service_pb2_grpc

        service_pb2_grpc.add_V2Servicer_to_server(_clarifai_servicer(service), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    return f"{host}:{bound}", lambda: server.stop(grace=None)
