"""grpc.health.v1.Health/Watch through the server's front door (metrics, auth, drain,
decode guard): the current status first, then NOT_SERVING once SIGTERM starts the drain.
The health service's Watch is a coroutine writing with context.write, not an async
generator; the front door must take either shape."""

from __future__ import annotations

import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from q8kv.client import health

SERVICE = "q8kv.v1.KVCacheService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize(
    ("flags", "env"),
    [
        ((), None),
        (("--metrics-port", "-1"), None),
        ((), {"Q8KV_AUTH_TOKENS": "health-token-123456 alpha"}),
    ],
    ids=["metrics", "no-metrics", "auth"],
)
@pytest.mark.parametrize("service", ["", SERVICE])
def test_watch_says_serving_then_not_serving_on_drain(start_server, flags, env, service):
    srv = start_server("--grace-seconds", "5", *flags, env=env)
    with grpc.insecure_channel(srv.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        call = stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=30)
        assert next(call).status == SERVING
        srv.signal(signal.SIGTERM)
        assert next(call).status == NOT_SERVING
        call.cancel()
    assert srv.proc.wait(30) == 0, srv.logs()
    assert "Unexpected" not in srv.logs() and "Traceback" not in srv.logs()


def test_watch_of_an_unknown_service_says_service_unknown(server):
    with grpc.insecure_channel(server.address) as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=30
        )
        assert next(call).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        call.cancel()


def test_client_watch_follows_the_status(start_server):
    srv = start_server("--grace-seconds", "5")
    statuses = health.watch(srv.address, timeout=30)
    assert next(statuses) == "SERVING"
    srv.signal(signal.SIGTERM)
    assert next(statuses) == "NOT_SERVING"
    statuses.close()
    assert srv.proc.wait(30) == 0


def _front(name: str):
    """The front door configured with one of its concerns switched on."""
    from q8kv.server.app import build_engine
    from q8kv.server.config import Config
    from q8kv.server.observability.metrics import Metrics
    from q8kv.server.rpc.auth import TokenTable
    from q8kv.server.rpc.drain import Drain
    from q8kv.server.rpc.front import Front

    if name == "auth":
        return Front(Drain(), tokens=TokenTable(None, "writer-token-1234 alpha"))
    if name == "metrics":
        engine = build_engine(Config(backend="numpy", memory_budget=1 << 20))
        return Front(Drain(), metrics=Metrics(engine.store, engine.backend))
    return Front(Drain())  # drain and decode guard are always on


async def _writer_call(front, kind: str):
    """A response-streaming method whose behavior is a coroutine writing three responses
    with context.write and returning, served through ``front`` on loopback."""
    request_type, response_type = health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse

    async def unary_stream(request, context):
        for _ in range(3):
            await context.write(response_type(status=SERVING))

    async def stream_stream(requests, context):
        async for _ in requests:
            await context.write(response_type(status=SERVING))

    build = (grpc.unary_stream_rpc_method_handler if kind == "unary_stream"
             else grpc.stream_stream_rpc_method_handler)
    handler = build(unary_stream if kind == "unary_stream" else stream_stream,
                    request_deserializer=request_type.FromString,
                    response_serializer=response_type.SerializeToString)
    server = grpc.aio.server()
    front.register(
        server, lambda s: s.add_registered_method_handlers("test.Writer", {"Write": handler})
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            factory = (channel.unary_stream if kind == "unary_stream"
                       else channel.stream_stream)
            method = factory("/test.Writer/Write",
                             request_serializer=request_type.SerializeToString,
                             response_deserializer=response_type.FromString)
            argument = request_type() if kind == "unary_stream" else iter([request_type()] * 3)
            call = method(argument, metadata=(("authorization", "Bearer writer-token-1234"),),
                          timeout=30)
            replies = [reply.status async for reply in call]
            return replies, await call.code()
    finally:
        await server.stop(None)


@pytest.mark.parametrize("kind", ["unary_stream", "stream_stream"])
@pytest.mark.parametrize("name", ["plain", "auth", "metrics"])
def test_the_front_door_takes_a_coroutine_streaming_behavior(name, kind):
    import asyncio

    replies, code = asyncio.run(_writer_call(_front(name), kind))
    assert (replies, code) == ([SERVING] * 3, grpc.StatusCode.OK)
