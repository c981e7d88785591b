"""`python -m common.healthcheck HOST:PORT [--service NAME]`: exit 0 when the gRPC server there says SERVING.

What the containers' health checks run (docker-compose); Kubernetes uses its native gRPC probes on the same service. With TLS, the TLS_CA / TLS_CERT / TLS_KEY environment
variables the service itself reads (or the flags) make it check over (mutual) TLS.
"""
from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.security import TlsFiles, sync_channel


def check(address: str, service: str = "", timeout: float = 3.0, tls: TlsFiles | None = None) -> str:
    """The server's status name (SERVING, NOT_SERVING, ...) or the gRPC error code's name."""
    with sync_channel(address, tls) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                             timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", help="host:port of a splitserve gRPC server")
    parser.add_argument("--service", default="", help="service name to check; empty = the whole server")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    parser.add_argument("--tls-ca", default=os.environ.get("TLS_CA", ""), help="PEM CA: check over TLS")
    parser.add_argument("--tls-cert", default=os.environ.get("TLS_CERT", ""),
                        help="PEM client certificate (a server with mutual TLS asks for one)")
    parser.add_argument("--tls-key", default=os.environ.get("TLS_KEY", ""), help="PEM key of --tls-cert")
    args = parser.parse_args(argv)
    status = check(args.address, args.service, args.timeout, TlsFiles(args.tls_cert, args.tls_key, args.tls_ca))
    print(f"{args.address} {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
