"""`python -m engine_service`: loads the model and serves the Engine gRPC API."""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from common.models import DEFAULT_MODEL, model_display_name, resolve_model
from common.security import TlsFiles
from common.server import run_service, run_until_signal, start_grpc_server
from engine_service.engine import Engine
from engine_service.model_runner import DTYPES, ModelRunner, pick_device, pick_dtype, pick_kv_cache_dtype
from engine_service.server import ROLES, EngineServicer
from splitserve.v1 import engine_pb2_grpc

log = logging.getLogger("splitserve.engine")

T = TypeVar("T")


@dataclass
class EngineConfig:
    model: str = field(default=DEFAULT_MODEL, metadata={"env": "MODEL", "help": "HF folder, hub id, .gguf or smollm2"})
    host: str = field(default="127.0.0.1", metadata={
        "env": "ENGINE_HOST", "help": "address to bind (0.0.0.0 for every interface: use with --tls-ca)"})
    port: int = field(default=50053, metadata={"env": "ENGINE_PORT"})
    metrics_port: int = field(default=9102, metadata={"env": "ENGINE_METRICS_PORT"})
    device: str = field(default="auto", metadata={"env": "DEVICE", "help": "auto, cpu or cuda"})
    dtype: str = field(default="auto", metadata={"env": "DTYPE", "help": "auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16"})
    kv_cache_gb: float = field(default=1.0, metadata={"help": "memory for the KV cache, GiB"})
    kv_cache_dtype: str = field(default="auto", metadata={
        "help": "auto (the model's dtype), float32, float16 or bfloat16. CPU: a 16-bit cache under the fp32 model "
                "holds twice the tokens and halves the bytes decode attention reads (long contexts decode faster); "
                "it rounds the keys and values, so greedy output may differ from transformers' fp32"})
    block_size: int = field(default=16, metadata={"help": "tokens per KV-cache block"})
    prefix_caching: bool = field(default=True, metadata={"help": "reuse the KV cache of shared prompt prefixes"})
    compact_decode_weights: bool = field(default=True, metadata={
        "deprecated_names": ("small_step_bf16",),
        "help": "CPU, fp32 models: decode steps of up to 64 sequences read compact weights, in one kernel call per "
                "step: a GGUF-sourced model's own Q4_1/Q8_0 blocks (its exact weights), a bf16 copy otherwise "
                "(fp32 activations and accumulation on AVX2; greedy output then matches fp32 up to near-ties)"})
    fast_path: bool = field(default=True, metadata={"help": "hand-written forward pass for Llama-family models"})
    cuda_graphs: bool = field(default=True, metadata={
        "help": "GPUs: plain decode steps replay CUDA graphs captured at start, one per batch size"})
    fused_gpu_ops: bool = field(default=True, metadata={
        "help": "GPUs: the layers' small ops as fused Triton kernels, one-row products through our GEMV"})
    draft_layers: int = field(default=-1, metadata={
        "help": "speculative=\"draft\" requests draft with the model's first N layers (self-speculative early "
                "exit); -1 = a quarter of the layers, 0 = no draft model"})
    max_model_len: int = field(default=0, metadata={"help": "cap on the context length; 0 = the model's"})
    max_num_seqs: int = field(default=64, metadata={"help": "sequences per step at most"})
    max_num_batched_tokens: int = field(default=2048, metadata={"help": "tokens per step at most (prefill chunking)"})
    max_waiting: int = field(default=1024, metadata={"help": "waiting sequences at most; beyond: RESOURCE_EXHAUSTED"})
    decode_lease_seconds: float = field(default=30.0, metadata={"help": "abort a sequence no Decode stream claims in time"})
    fault_token_id: int = field(default=-1, metadata={"help": "testing only: a step that computes this token id fails"})
    role: str = field(default="both", metadata={
        "help": "both: prefill and decode; prefill: compute prompts for decode engines (disaggregated serving); "
                "decode: take prompts' KV caches from prefill engines (and prefill locally when not given one)"})
    step_delay_seconds: float = field(default=0.0, metadata={"help": "testing only: every step sleeps this long"})
    shutdown_grace_seconds: float = field(default=30.0, metadata={
        "help": "on SIGTERM, running streams get this long to finish (longer than the gateway's 20 s)"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0 = torch's default"})
    tls_cert: str = field(default="", metadata={"help": "PEM certificate: serve TLS only"})
    tls_key: str = field(default="", metadata={"help": "PEM private key of --tls-cert"})
    tls_ca: str = field(default="", metadata={"help": "PEM CA: callers must show a certificate it signed (mutual TLS)"})
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if self.kv_cache_gb <= 0 or self.block_size < 1 or self.max_num_seqs < 1 or self.max_waiting < 1:
            raise ValueError("kv_cache_gb, block_size, max_num_seqs and max_waiting must be positive")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be positive")
        if self.kv_cache_dtype not in ("auto", *DTYPES):
            raise ValueError(f"kv_cache_dtype must be auto or one of {', '.join(DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")


def on_passing_thread(build: Callable[[], T]) -> T:
    """build() on a thread of its own that ends with it. libgomp keeps a team of OpenMP workers for every thread
    that ran a parallel region, for as long as that thread lives, and once its teams hold more threads than the
    machine has CPUs it spins only ~100 times at a barrier before sleeping on a futex. The model loaded on the main
    thread left such a team beside the step loop's: on 2 cores the step loop's worker slept and was woken ~31 times
    per served batch-1 token (0.01 since). Served throughput, interleaved A/B, 2026-11-28: 16 streams +5 % (4 rounds,
    1.00-1.075), 1 and 64 streams unchanged within their spread. So the only team that lives is the step loop's."""
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(build())
        except BaseException as exc:   # re-raised on the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="model-load")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


async def serve(config: EngineConfig) -> None:
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    device = pick_device(config.device)

    dtype = pick_dtype(config.dtype, device)
    kv_cache_dtype = pick_kv_cache_dtype(config.kv_cache_dtype, dtype, device)

    def build() -> Engine:
        runner = ModelRunner(
            resolve_model(config.model), model_display_name(config.model), device, dtype,
            kv_cache_bytes=int(config.kv_cache_gb * (1 << 30)), block_size=config.block_size,
            max_model_len=config.max_model_len, fast_path=config.fast_path, prefix_caching=config.prefix_caching,
            fault_token_id=config.fault_token_id, step_delay=config.step_delay_seconds,
            cuda_graphs=config.cuda_graphs, fused_gpu_ops=config.fused_gpu_ops,
            compact_decode_weights=config.compact_decode_weights and device.type == "cpu",
            kv_cache_dtype=kv_cache_dtype)
        return Engine(runner, config.max_num_seqs, config.max_num_batched_tokens, config.max_waiting,
                      draft_layers=config.draft_layers)

    engine = on_passing_thread(build)
    engine.start()
    # To prefill engines: mutual TLS with this engine's own pair when it has a CA, else plaintext.
    peer_tls = TlsFiles(config.tls_cert, config.tls_key, config.tls_ca) if config.tls_ca else None
    servicer = EngineServicer(engine, config.decode_lease_seconds, config.role, peer_tls)
    service = await start_grpc_server(
        lambda server: engine_pb2_grpc.add_EngineServicer_to_server(servicer, server),
        ["splitserve.v1.Engine"], config.host, config.port, config.metrics_port,
        tls=TlsFiles(config.tls_cert, config.tls_key, config.tls_ca))

    async def stop_engine() -> None:
        await asyncio.to_thread(engine.stop)

    await run_until_signal(service, "engine", on_stop=stop_engine, grace_seconds=config.shutdown_grace_seconds,
                           on_drain=servicer.drain)


def main() -> None:
    run_service(EngineConfig, "splitserve engine service", serve, "splitserve.engine")


if __name__ == "__main__":
    main()
