"""The limit beside each figure: what this CPU allows the served model, measured in the same run as the figures.

Two rates of the machine: memory bandwidth (a large copy: bytes read + written per second) and the fp32
multiply-add rate (a layer's decode matrices through the engine's own `Linear`: 64 rows on its oneDNN path, 16 rows
on its bf16 kernel; the best of the two). Two costs of the model, computed from it, not typed in: the bytes of
weights a batch-1 decode step reads (the served weights: GGUF blocks where the model came from a GGUF file, as the
engine's `Linear.bytes_read` says) and the FLOPs per token (from its config). A decode step of `rows` streams
cannot take less than max(weight bytes ÷ bandwidth, rows × FLOPs per token ÷ FMA rate): at 1 row that is the
bandwidth floor, at 16 and 64 rows the compute one. Each figure is reported as that floor ÷ the measured time
(1.0 = at the limit); a prefill as its FLOPs ÷ the FMA rate ÷ its measured time.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from transformers import AutoConfig

from engine_service.model.linear import COMPACT_ROWS, Linear, onednn_available
from engine_service.model_runner import ModelRunner


@dataclass
class ModelCost:
    weight_bytes: int            # weights a batch-1 decode step reads (the served format)
    layer_params: int            # multiply-adds per token in the layers' matrices
    head_params: int             # multiply-adds per token in the LM head
    attention_width: int         # layers × heads × head_dim: multiply-adds per context position, in QK and in PV

    def decode_flops(self, context: int) -> float:
        """FLOPs to decode one token at this context length."""
        return 2.0 * (self.layer_params + self.head_params) + 4.0 * self.attention_width * context

    def prefill_flops(self, tokens: int) -> float:
        """FLOPs to prefill a prompt: every token through the layers, the LM head once, causal attention."""
        return 2.0 * self.layer_params * tokens + 2.0 * self.head_params + 2.0 * self.attention_width * tokens ** 2


@dataclass
class Limits:
    bandwidth_gb_s: float
    fma_gflops: dict[str, float]        # per kernel that measured it
    cost: ModelCost
    notes: list[str] = field(default_factory=list)

    @property
    def best_gflops(self) -> float:
        return max(self.fma_gflops.values())

    def decode_fraction(self, rows: int, tokens_per_s: float | None, context: int) -> float | None:
        """Floor ÷ measured time of a decode step of `rows` streams delivering `tokens_per_s` in all."""
        if not tokens_per_s:
            return None
        memory_s = self.cost.weight_bytes / (self.bandwidth_gb_s * 1e9)
        compute_s = rows * self.cost.decode_flops(context) / (self.best_gflops * 1e9)
        return round(max(memory_s, compute_s) * tokens_per_s / rows, 3)

    def decode_roofline(self, systems: dict[str, dict | None], rows: int, context: int,
                        key: str = "tokens_per_s") -> dict[str, dict[str, float | None]]:
        """Each system's fraction for its decode figure `key`: "tokens_per_s" (in all) or "tpot_s" (per stream)."""
        out = {}
        for name, figures in systems.items():
            if figures and figures.get(key):
                rate = rows / figures[key] if key == "tpot_s" else figures[key]
                out[name] = {key: self.decode_fraction(rows, rate, context)}
        return out

    def prefill_fraction(self, tokens: int, seconds: float | None) -> float | None:
        if not seconds:
            return None
        return round(self.cost.prefill_flops(tokens) / (self.best_gflops * 1e9) / seconds, 3)

    def summary(self) -> dict:
        """What latest.json records: the rates, the costs and the floors they give."""
        cost = asdict(self.cost)
        cost["decode_flops_per_token_at_context_64"] = self.cost.decode_flops(64)
        return {"memory_bandwidth_gb_s": round(self.bandwidth_gb_s, 2),
                "fma_gflops": {k: round(v, 1) for k, v in self.fma_gflops.items()},
                "model": cost,
                "batch1_floor_ms": round(1e3 * self.cost.weight_bytes / (self.bandwidth_gb_s * 1e9), 2),
                "compute_ceiling_tokens_per_s": round(self.best_gflops * 1e9 / self.cost.decode_flops(64), 1),
                "notes": self.notes}


def _best_seconds(fn: Callable[[], object], repeats: int = 5, min_seconds: float = 0.05) -> float:
    """The fastest of `repeats` timings of fn (calls batched to at least min_seconds): the machine's limit is its
    best, and a loaded machine only ever makes a run slower."""
    fn()
    calls = 1
    while True:
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        if time.perf_counter() - started >= min_seconds:
            break
        calls *= 2
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - started) / calls)
    return best


def bandwidth_gb_s(mib: int = 512) -> float:
    source = torch.ones(mib * 2 ** 20 // 4)
    target = torch.empty_like(source)
    return 2 * source.nbytes / _best_seconds(lambda: target.copy_(source), min_seconds=0) / 1e9


def _gflops(linears: list[Callable[[torch.Tensor], torch.Tensor]], in_features: list[int], rows: int) -> float:
    """Matrices each called on `rows` rows, as one rate."""
    calls = [(linear, torch.randn(rows, k)) for linear, k in zip(linears, in_features)]
    flops = sum(2.0 * rows * x.shape[1] * linear(x).shape[1] for linear, x in calls)
    return flops / _best_seconds(lambda: [linear(x) for linear, x in calls]) / 1e9


def cost_of(runner: ModelRunner) -> ModelCost:
    config = AutoConfig.from_pretrained(runner.model_path).get_text_config()
    heads, hidden = config.num_attention_heads, config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    layers = config.num_hidden_layers
    layer_params = layers * (hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden
                             + 3 * hidden * config.intermediate_size)
    head_params = config.vocab_size * hidden
    fast = runner.fast
    if fast is None:   # transformers' forward: every weight in the model's own dtype
        weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    else:
        weight_bytes = fast.lm_head.bytes_read(1) + sum(
            w.qkv.bytes_read(1) + w.o.bytes_read(1) + w.gate_up.bytes_read(1) + w.down.bytes_read(1)
            + w.input_norm.nbytes + w.post_norm.nbytes for w in fast.layers) + fast.final_norm.nbytes
    return ModelCost(weight_bytes=int(weight_bytes), layer_params=layer_params, head_params=head_params,
                     attention_width=layers * heads * head_dim)


def measure(model_path: str) -> Limits:
    """Loads the model as the engine serves it on CPU (fp32, compact decode weights) and measures the limits."""
    runner = ModelRunner(model_path, "roofline", torch.device("cpu"), torch.float32, kv_cache_bytes=1 << 24,
                         block_size=16, max_model_len=256, compact_decode_weights=True)   # no step runs: no cache
    notes = []
    with torch.inference_mode():
        rates = {}
        if runner.fast is not None:
            w = runner.fast.layers[0]
            linears = [w.qkv, w.o, w.gate_up, w.down]
            sizes = [linear.in_features for linear in linears]
            if onednn_available(runner.fast.final_norm):   # oneDNN's fp32 product over packed weights of these shapes
                # (random values: they do not change the rate; a GGUF-sourced model keeps no fp32 copy to pack)
                fp32_linears = [Linear(torch.randn(linear.out_features, linear.in_features)) for linear in linears]
                rates["onednn_fp32_64_rows"] = _gflops([linear.fp32 for linear in fp32_linears], sizes, 64)
            if w.gate_up.kernels is not None:   # a decode step's: our kernel over the compact weights
                rates[f"engine_compact_kernel_{COMPACT_ROWS}_rows"] = _gflops(linears, sizes, COMPACT_ROWS)
        else:   # transformers' forward: its first layer's MLP through torch's fp32 matmul
            mlp = runner.model.model.layers[0].mlp
            linears = [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
            rates["torch_fp32_mlp_64_rows"] = _gflops(linears, [m.in_features for m in linears], 64)
            notes.append("no fast path: the FMA rate is torch's fp32 matmul alone")
        limits = Limits(bandwidth_gb_s=bandwidth_gb_s(), fma_gflops=rates, cost=cost_of(runner), notes=notes)
    del runner
    return limits
