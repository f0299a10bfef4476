"""An OTLP/HTTP receiver of traces on loopback: what a collector is to the gateway's tracing."""

from __future__ import annotations

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span


class OtlpReceiver:
    """Accepts POST /v1/traces (protobuf) on 127.0.0.1:`port` and keeps the spans."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.spans: list[Span] = []
        # The process.pid of each span's resource, by span id: which worker made it.
        self.pids: dict[bytes, int] = {}
        self.requests = 0
        app = web.Application()
        app.router.add_post("/v1/traces", self._receive)
        self._runner = web.AppRunner(app, access_log=None)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    async def start(self) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _receive(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        self.requests += 1
        for resource in export.resource_spans:
            pid = next(
                (a.value.int_value for a in resource.resource.attributes if a.key == "process.pid"),
                0,
            )
            for scope in resource.scope_spans:
                self.spans.extend(scope.spans)
                self.pids.update((span.span_id, pid) for span in scope.spans)
        body = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")
