"""Streams an answer to stdout: `python -m gateway.client "prompt"` or `--chat "message"`; `-v` adds usage and timings."""
from __future__ import annotations

import argparse
import os
import sys
import time

import grpc

from common.security import TlsFiles, sync_channel
from splitserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


def build_request(args: argparse.Namespace) -> gateway_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(temperature=args.temperature, top_k=args.top_k, stop=args.stop or [],
                                         ignore_eos=args.ignore_eos)
    if args.max_tokens is not None:
        sampling.max_tokens = args.max_tokens
    if args.top_p is not None:
        sampling.top_p = args.top_p
    if args.repetition_penalty is not None:
        sampling.repetition_penalty = args.repetition_penalty
    if args.seed is not None:
        sampling.seed = args.seed
    request = gateway_pb2.GenerateRequest(sampling=sampling)
    if args.chat:
        if args.system:
            request.messages.append(common_pb2.ChatMessage(role="system", content=args.system))
        request.messages.append(common_pb2.ChatMessage(role="user", content=args.text))
    else:
        request.prompt = args.text
    return request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Stream a completion from a splitserve gateway.")
    parser.add_argument("text", help="the prompt (or, with --chat, the user's message)")
    parser.add_argument("--chat", action="store_true", help="send TEXT as a chat message (uses the chat template)")
    parser.add_argument("--system", default="", help="a system message, with --chat")
    parser.add_argument("--address", default=os.environ.get("GATEWAY_ADDRESS", "127.0.0.1:50051"))
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", help="a stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    parser.add_argument("--api-key", default=os.environ.get("SPLITSERVE_API_KEY", ""),
                        help="the gateway's API key (env SPLITSERVE_API_KEY)")
    parser.add_argument("--tls-ca", default=os.environ.get("SPLITSERVE_TLS_CA", ""),
                        help="PEM CA of the gateway's certificate: connect over TLS (env SPLITSERVE_TLS_CA)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print usage and timings to stderr")
    args = parser.parse_args(argv)
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else None

    started = time.perf_counter()
    first = None
    last: gateway_pb2.GenerateResponse | None = None
    with sync_channel(args.address, TlsFiles(ca=args.tls_ca) if args.tls_ca else None) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        try:
            for chunk in stub.Generate(build_request(args), timeout=args.timeout, metadata=metadata):
                if first is None:
                    first = time.perf_counter()
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                last = chunk
        except grpc.RpcError as exc:
            print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    sys.stdout.write("\n")
    if args.verbose and last is not None:
        total = time.perf_counter() - started
        ttft = (first or started) - started
        tokens = last.usage.completion_tokens
        tpot = (total - ttft) / max(1, tokens - 1)
        print(f"finish_reason={last.finish_reason} prompt_tokens={last.usage.prompt_tokens} "
              f"completion_tokens={tokens} ttft={ttft * 1000:.1f}ms tpot={tpot * 1000:.1f}ms "
              f"total={total:.2f}s tokens_per_s={tokens / total:.1f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
