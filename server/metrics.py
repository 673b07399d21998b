"""Prometheus metrics for the server (prometheus-client), served at HOST:PORT/metrics.

Counted as they happen, by an interceptor in front of every RPC:

- ``offsite_rpc_total{method, code}`` and ``offsite_rpc_seconds{method}`` (a latency histogram);
- ``offsite_artifact_bytes_served_total``: bytes that Download streams sent.

Read from the registry at each scrape (so several servers sharing one database agree, and a
restart loses nothing): operations by kind and state, jobs by state, rounds, releases by
status, eval reports by verdict.

Each server has its own CollectorRegistry (tests run several servers in one process).
The interceptor also gives every RPC a request id (the caller's ``x-request-id`` metadata,
or a new one) that log records carry (offsite.server.logs).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy import func, select

from .logs import REQUEST_ID

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
DOWNLOAD = "/offsite.v1.Artifacts/Download"


class RegistryCollector:
    """Gauges and counters computed from the registry's rows when Prometheus scrapes."""

    def __init__(self, registry) -> None:
        self.registry = registry

    def _grouped(self, column, *by) -> list[tuple]:
        with self.registry.session() as s:
            return list(s.execute(select(*by, func.count(column)).group_by(*by)))

    def collect(self):
        from .registry import EvalReportRow, JobRow, OperationRow, ReleaseRow, RoundRow

        try:
            ops = GaugeMetricFamily(
                "offsite_operations", "Operations in the registry by kind and state", labels=["kind", "state"]
            )
            for kind, state, n in self._grouped(OperationRow.id, OperationRow.kind, OperationRow.state):
                ops.add_metric([kind, state], n)
            jobs = GaugeMetricFamily("offsite_jobs", "Federated jobs by state", labels=["state"])
            for state, n in self._grouped(JobRow.id, JobRow.state):
                jobs.add_metric([state], n)
            releases = GaugeMetricFamily("offsite_releases", "Releases by status", labels=["status"])
            for status, n in self._grouped(ReleaseRow.id, ReleaseRow.status):
                releases.add_metric([status], n)
            verdicts = CounterMetricFamily(
                "offsite_eval_reports", "Safety eval runs by gate verdict", labels=["verdict"]
            )
            for verdict, n in self._grouped(EvalReportRow.id, EvalReportRow.verdict):
                verdicts.add_metric([verdict or "none"], n)
            with self.registry.session() as s:
                rounds = s.scalar(select(func.count(RoundRow.id))) or 0
            rounds_metric = CounterMetricFamily("offsite_rounds", "Federated rounds completed (all jobs)")
            rounds_metric.add_metric([], rounds)
        except Exception:  # noqa: BLE001 - a scrape during a database outage shows the RPC metrics only
            log.warning("metrics: the registry could not be read", exc_info=True)
            return
        yield from (ops, jobs, releases, verdicts, rounds_metric)


class Metrics:
    def __init__(self, registry=None) -> None:
        self.prometheus = CollectorRegistry()
        self.rpcs = Counter(
            "offsite_rpc", "RPCs handled, by method and status code", ["method", "code"], registry=self.prometheus
        )
        self.latency = Histogram(
            "offsite_rpc_seconds",
            "RPC latency by method",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.prometheus,
        )
        self.bytes_served = Counter(
            "offsite_artifact_bytes_served", "Artifact bytes sent by Download", registry=self.prometheus
        )
        if registry is not None:
            self.prometheus.register(RegistryCollector(registry))
        self._http = None

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        return _MetricsInterceptor(self)

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint on its own thread; returns the bound port."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.prometheus)
        return self._http.server_port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def _observe(self, method: str, context, started: float, error: BaseException | None) -> None:
        code = _code_of(context, error)
        seconds = time.perf_counter() - started
        self.rpcs.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)
        # The access log (DEBUG): one line per RPC, with its request id (see offsite.server.logs).
        log.debug("rpc %s %s %.1f ms", method, code, seconds * 1000)


def _code_of(context, error: BaseException | None) -> str:
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - older grpc.aio contexts
        code = None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
    if error is None:
        return "OK"
    return "CANCELLED" if isinstance(error, BaseException) and type(error).__name__ == "CancelledError" else "UNKNOWN"


def _request_id(context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and 0 < len(value) <= 64 and value.isprintable():
            return value
    return uuid.uuid4().hex[:16]


class _MetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        key = (details.method, id(handler))
        cached = self._wrapped.get(key)
        if cached is None:
            cached = self._wrapped[key] = self._wrap(handler, details.method)
        return cached

    def _wrap(self, handler, method: str):
        m = self.m
        if handler.unary_unary is not None or handler.stream_unary is not None:
            # One response either way: observe the call around the awaited handler.
            inner = handler.unary_unary or handler.stream_unary

            async def one_response(request_or_iterator, context):
                token, started, error = REQUEST_ID.set(_request_id(context)), time.perf_counter(), None
                try:
                    return await inner(request_or_iterator, context)
                except BaseException as e:
                    error = e
                    raise
                finally:
                    m._observe(method, context, started, error)
                    REQUEST_ID.reset(token)

            make = (
                grpc.unary_unary_rpc_method_handler
                if handler.unary_unary is not None
                else grpc.stream_unary_rpc_method_handler
            )
            return make(
                one_response,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def unary_stream(request, context):
                token, started, error = REQUEST_ID.set(_request_id(context)), time.perf_counter(), None
                try:
                    async for item in inner_stream(request, context):
                        if method == DOWNLOAD:
                            m.bytes_served.inc(len(item.data))
                        yield item
                except BaseException as e:
                    error = e
                    raise
                finally:
                    m._observe(method, context, started, error)
                    try:
                        REQUEST_ID.reset(token)
                    except ValueError:  # a cancelled stream closed from another context
                        pass

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # stream-stream: none in offsite.v1 (reflection's is left as it is)
