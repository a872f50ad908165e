"""Health probe: ``python -m q8kv.client.health [ADDR]`` exits 0 when the server's gRPC
health service answers SERVING, else 1 with a one-line reason on stderr.

Meant for a Docker HEALTHCHECK or a Kubernetes exec probe, so it starts fast (no numpy
work), never waits for a connection longer than ``--timeout`` and prints nothing on
success unless ``--verbose``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .channel import make_sync_channel


def check(
    target: str, service: str = "", timeout: float = 3.0, tls: bool | str | None = None
) -> str:
    """The serving status name for ``service`` ("" = the whole server)."""
    with make_sync_channel(target, tls, []) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def watch(
    target: str, service: str = "", timeout: float | None = None,
    tls: bool | str | None = None,
) -> Iterator[str]:
    """Status names of ``service`` as they change (Health/Watch): the current one first,
    then one per change, until the server ends the stream (it raises grpc.RpcError) or
    ``timeout`` seconds pass."""
    with make_sync_channel(target, tls, []) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        call = stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        try:
            for response in call:
                yield health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        finally:
            call.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m q8kv.client.health", description="Exit 0 if a q8kv server is SERVING."
    )
    parser.add_argument("address", nargs="?", default="127.0.0.1:50051", help="host:port")
    parser.add_argument("--service", default="", help='health service name ("" = server)')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    parser.add_argument("--tls", action="store_true", help="TLS with the system roots")
    parser.add_argument("--ca", default=None, help="TLS with this CA bundle")
    parser.add_argument("--verbose", "-v", action="store_true", help="print the status")
    args = parser.parse_args(argv)
    tls = args.ca or args.tls or None
    try:
        status = check(args.address, args.service, args.timeout, tls)
    except grpc.RpcError as exc:
        print(f"q8kv health: {args.address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except OSError as exc:  # an unreadable --ca file
        print(f"q8kv health: {exc}", file=sys.stderr)
        return 1
    if status != "SERVING":
        print(f"q8kv health: {args.address}: {status}", file=sys.stderr)
        return 1
    if args.verbose:
        print(status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
