"""The API's metrics, `GET /metrics` in Prometheus text format: requests by route and status, and how long a
creation takes to be admitted (the POST createFromBoxTemplate's whole answer time).

No token, like every Prometheus endpoint: it tells counts and timings, never a user or a task. Not counted
against the rate limit (it has no caller) and not in the OpenAPI document. Each app has its own registry, so
that apps built side by side (the tests) count apart."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.routes.vm_manage import create_from_box_template

# Admission is bounded by ADMISSION_TIMEOUT_SECONDS (20 s by default); ?wait answers can take a whole clone.
ADMISSION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 300.0, 1800.0)
# Paths no route matched: one label value, not one per path a scanner tries.
UNMATCHED = "unmatched"


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pveboxes_api_requests",
            "API requests answered, by method, route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.admission = Histogram(
            "pveboxes_api_admission_seconds",
            "Answer time of POST createFromBoxTemplate, by status",
            ["status"],
            buckets=ADMISSION_BUCKETS,
            registry=self.registry,
        )


class RequestMetrics:
    """Pure ASGI, outermost: it sees every answer, a 413 of the body limit included."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def watching_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        finally:
            route: Any = scope.get("route")
            path = getattr(route, "path", UNMATCHED)
            self.metrics.requests.labels(scope["method"], path, str(status)).inc()
            if getattr(route, "endpoint", None) is create_from_box_template and scope["method"] == "POST":
                self.metrics.admission.labels(str(status)).observe(time.perf_counter() - started)


router = APIRouter()


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
