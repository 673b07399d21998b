"""The gRPC server: grpc.aio with every offsite.v1 service, health checking and reflection.

``OffsiteServer(config)`` builds the state, ``await start()`` binds (port 0 picks a free
port), ``await stop()`` shuts down gracefully: health turns NOT_SERVING, new operations are
refused, running ones get ``grace_s`` to finish and are then cancelled, and in-flight RPCs
get a few seconds to complete. :func:`run_in_thread` runs a server beside other code
(tests, benchmarks) on its own event loop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .auth import AuthInterceptor
from .metrics import Metrics
from .services import add_services
from .state import ServerConfig, ServerState
from .tls import server_credentials

log = logging.getLogger(__name__)


class OffsiteServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.state = ServerState(config)
        self.metrics = Metrics(self.state.registry)
        self.metrics_port: int | None = None
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self.stuck_operations: list[str] = []  # work that ignored cancellation at the last stop

    async def start(self) -> int:
        cfg, st = self.config, self.state
        st.ops.bind_loop(asyncio.get_running_loop())
        recovered = st.ops.recover(st.work_dir)
        if recovered:
            log.warning("%d operation(s) were left running by the previous process; marked failed", recovered)
        swept = st.store.sweep_tmp()
        if swept:
            log.warning("removed %d temporary upload file(s) left by a killed server", swept)
        for job in st.registry.list_jobs(state="running"):
            if job.operation_id and not st.ops.leases.orphaned(f"op:{job.operation_id}"):
                continue  # another live server sharing this registry runs it
            st.registry.update_job(
                job.id, state="failed", error="the server stopped while this job ran; start it again"
            )
        st.bootstrap_admin_token()
        self._server = grpc.aio.server(
            # Metrics outermost: they time and count refused calls too, and set the request id.
            interceptors=[self.metrics.interceptor(), AuthInterceptor(st.auth, st.registry, st.data_dir)],
            options=[
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes),
                ("grpc.max_concurrent_streams", 1000),
                ("grpc.so_reuseport", 0),
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.http2.max_pings_without_data", 0),
            ],
        )
        names = add_services(self._server, st)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        for name in ["", *names]:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], self._server
        )
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert or cfg.tls_key:
            if not (cfg.tls_cert and cfg.tls_key):
                raise ValueError("pass both --tls-cert and --tls-key")
            creds = server_credentials(cfg.tls_cert, cfg.tls_key, cfg.client_ca)
            self.port = self._server.add_secure_port(address, creds)
        else:
            if cfg.client_ca:
                raise ValueError("--client-ca (mutual TLS) needs --tls-cert and --tls-key")
            self.port = self._server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"could not bind {address}; is another server running there?")
        await self._server.start()
        if cfg.extra.get("metrics_address"):  # HOST:PORT for Prometheus (offsite-admin serve --metrics-address)
            host, _, mport = str(cfg.extra["metrics_address"]).rpartition(":")
            self.metrics_port = self.metrics.serve(host or "127.0.0.1", int(mport))
        self._start_background_tasks()
        return self.port

    def _start_background_tasks(self) -> None:
        from .hooks import HookUnavailable, load_hook

        self._tasks: list[asyncio.Task] = []
        for spec in self.config.background_tasks:
            try:
                fn = load_hook(spec)
            except HookUnavailable as e:
                log.info("background task not started: %s", e)
                continue
            task = asyncio.get_running_loop().create_task(fn(self.state), name=str(spec))
            task.add_done_callback(_log_task_end)
            self._tasks.append(task)

    @property
    def tls(self) -> bool:
        return bool(self.config.tls_cert)

    async def stop(self, grace_s: float | None = None) -> None:
        if self._server is None:
            return
        grace = self.config.grace_s if grace_s is None else grace_s
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        for task in getattr(self, "_tasks", []):
            task.cancel()
        # Operations get `grace` to finish, then are cancelled (their child processes terminated);
        # in-flight RPCs get one more second, so the whole stop takes about grace + 3 s.
        self.stuck_operations = await self.state.ops.shutdown(grace)
        await self._server.stop(min(grace, 1.0))
        self._server = None
        self.metrics.stop()
        self.state.close()

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def serve_until_signal(self) -> None:
        """Run until SIGINT/SIGTERM, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down (finishing or cancelling operations)")
        await self.stop()


def _log_task_end(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s stopped: %r", task.get_name(), task.exception())


class ServerThread:
    """A server on its own event loop in a background thread (tests, benchmarks)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.server: OffsiteServer | None = None
        self.port: int | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="offsite-server", daemon=True)
        self._thread.start()

    def start(self) -> ServerThread:
        async def _start():
            self.server = OffsiteServer(self.config)
            return await self.server.start()

        self.port = asyncio.run_coroutine_threadsafe(_start(), self._loop).result(60)
        return self

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    @property
    def admin_token(self) -> str:
        return (Path(self.server.state.data_dir) / "admin.token").read_text().strip()

    def stop(self, grace_s: float = 2.0) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(grace_s), self._loop).result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_in_thread(config: ServerConfig) -> ServerThread:
    return ServerThread(config).start()
