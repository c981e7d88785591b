"""A lean forward pass for Llama-family models (Llama, Mistral without sliding window, Qwen2), written plainly.

Built from the loaded transformers model's own weights: q/k/v and gate/up projections fused into one matrix each,
RMSNorm and SiLU as single ops, rotary tables from the model's own rotary embedding (so every RoPE scaling type
is right), and the engine's paged attention. Fewer, larger ops than the generic path: less Python and dispatch
overhead per decode step, which is what dominates a small model on a CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine_service.model import attention, fused_ops, gguf_weights, paged_decode
from engine_service.model.attention import paged_attention_core
from engine_service.model.linear import COMPACT_ROWS, Linear, compact_kernels

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
LINEAR_NAMES = ("qkv", "o", "gate_up", "down")
ROTARY_TABLE_POSITIONS = 1 << 17   # fused_gpu_ops: cos/sin tables up to this many positions (64 MiB at fp32, D 64)
WEIGHTS_PER_LAYER = 7   # the one-call kernel's weights of one layer (decode_weights)
KERNEL_CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)   # KV caches the one-call kernel reads


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Linear
    o: Linear
    post_norm: torch.Tensor
    gate_up: Linear
    down: Linear


def supports(model: torch.nn.Module) -> bool:
    config = model.config
    if config.model_type not in SUPPORTED_TYPES or getattr(config, "hidden_act", "silu") != "silu":
        return False
    if config.model_type == "mistral" and getattr(config, "sliding_window", None):
        return False  # needs windowed attention: the generic path handles it
    if config.model_type == "qwen2" and getattr(config, "use_sliding_window", False):
        return False
    return model.model.layers[0].mlp.gate_proj.bias is None


class FastLlama:
    def __init__(self, model: torch.nn.Module, compact_decode_weights: bool = False,
                 gguf: gguf_weights.GGUFBlocks | None = None, fused_gpu_ops: bool = False) -> None:
        """compact_decode_weights: decode steps read compact weights (the GGUF's own blocks where the model came
        from one, else a bf16 copy); gguf: that file's blocks; fused_gpu_ops: see fused_ops."""
        config = model.config
        self.hf_model = model
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.groups = self.num_heads // self.num_kv_heads
        self.eps = config.rms_norm_eps
        self.scaling = self.head_dim ** -0.5
        self.embed: torch.Tensor | None = model.model.embed_tokens.weight   # None where embed_blocks serve
        self.final_norm = model.model.norm.weight
        head = model.lm_head.weight
        # Our kernels serve compact decode weights of an fp32 model on CPU; a GGUF-sourced model's matrices are
        # matched to their blocks before they are built, so no other copy of them is ever made.
        kernels = compact_kernels(head, compact_decode_weights)
        self.lm_head = Linear(head, compact=compact_decode_weights, blocks=gguf_weights.blocks_for(
            gguf, kernels, gguf_weights.head_tensor_names(gguf), head))
        self.embed_kernels, self.embed_blocks = kernels, self._embedding_blocks(model, gguf, kernels)
        if self.embed_blocks is not None:
            self.embed = None
        self.rotary = model.model.rotary_emb
        self.layers: list[LayerWeights] = []
        for index, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
            fused = {"qkv": torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                     "o": attn.o_proj.weight, "gate_up": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                     "down": mlp.down_proj.weight}
            bias = {"qkv": torch.cat(biases) if biases[0] is not None else None, "o": attn.o_proj.bias,
                    "gate_up": None, "down": None}
            linears = {name: Linear(fused[name], bias[name], compact_decode_weights,
                                    gguf_weights.blocks_for(gguf, kernels, names, fused[name]))
                       for name, names in gguf_weights.layer_tensor_names(index).items()}
            weights = LayerWeights(input_norm=layer.input_layernorm.weight,
                                   post_norm=layer.post_attention_layernorm.weight, **linears)
            self.layers.append(weights)
            # Our copies replace the originals: drop those so the weights are held once (the tied embedding stays).
            for module in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
                           mlp.down_proj):
                module.weight = None
        self._release_checkpoint(model)
        # GPUs, opt-in: the layers' small operations run as fused Triton kernels (fused_ops).
        self.fused = fused_gpu_ops and paged_decode.available(self.final_norm.device)
        if self.fused and self.final_norm.dtype in (torch.bfloat16, torch.float16):   # fp32 keeps cuBLAS (see gpu_gemv)
            for linear in self._linears():
                linear.gpu_gemv = linear.weight is not None
        # Plain decode steps of up to COMPACT_ROWS rows run every layer in one call of our kernel (cpu_kernels.cpp),
        # reading the compact weights (GGUF blocks where the model came from a GGUF file, else bf16).
        self.decode_kernels = kernels if self._fits_decode_kernel() else None
        # The fused GPU kernels and the one-call CPU kernel read each row's cos/sin from a table.
        use_table = self.fused or self.decode_kernels is not None
        self.rotary_table = self._rotary_table(config) if use_table else None
        self.decode_weights: list[torch.Tensor] = []
        if self.decode_kernels is not None:
            empty = torch.empty(0)
            self.decode_weights = [   # WEIGHTS_PER_LAYER tensors per layer, in the kernel's order
                tensor for w in self.layers for tensor in (
                    w.input_norm.contiguous(), w.qkv.compact(),
                    empty if w.qkv.bias is None else w.qkv.bias.float().contiguous(), w.o.compact(),
                    w.post_norm.contiguous(), w.gate_up.compact(), w.down.compact())]

    def _linears(self) -> list[Linear]:
        return [self.lm_head] + [getattr(w, name) for w in self.layers for name in LINEAR_NAMES]

    def _embedding_blocks(self, model: torch.nn.Module, gguf: gguf_weights.GGUFBlocks | None, kernels
                          ) -> torch.Tensor | None:
        """The GGUF's blocks of the token embedding where they are exactly it (a tied embedding's are the LM
        head's): rows are dequantised as they are looked up (embed_rows, the one-call kernel), and the fp32 table
        is dropped (SmolLM2: 108 MiB). None where there are none: the fp32 table stays."""
        if gguf is None or kernels is None:
            return None
        embedding = model.model.embed_tokens
        tied = model.lm_head.weight is embedding.weight
        if tied and self.lm_head.blocks is not None and gguf_weights.head_tensor_names(gguf) == ["token_embd.weight"]:
            blocks = self.lm_head.blocks[1]
        else:
            found = gguf_weights.blocks_for(gguf, kernels, ["token_embd.weight"], embedding.weight)
            if found is None:
                return None
            blocks = found[1]
        embedding.weight = None
        if tied:
            model.lm_head.weight = None
        return blocks

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.embed_blocks is None:
            return F.embedding(input_ids, self.embed)
        return self.embed_kernels.embed_rows(input_ids, self.embed_blocks, self.final_norm.numel())

    def _rotary_probe(self) -> torch.Tensor:
        """A row in the model's dtype and device: the rotary module takes its dtype and device from it."""
        return self.final_norm.new_zeros(1, self.final_norm.numel())

    def _release_checkpoint(self, model: torch.nn.Module) -> None:
        """transformers maps the checkpoint file, and each weight it loads on a CPU is a view of that mapping. Where
        every matrix now lives in a copy of ours (oneDNN's packed fp32, or GGUF blocks), the embedding and norms left
        would hold the whole file resident (SmolLM2: 513 MiB of it for 108 MiB of tensors); copies of them let the
        mapping go (a ModelRunner with 16 MiB of KV cache, resident after load: 1,214 -> 761 MiB). Elsewhere the
        matrices are still views of the file, so copies would only add memory."""
        if self.final_norm.device.type != "cpu" or any(linear.weight is not None for linear in self._linears()):
            return
        for parameter in model.parameters():
            parameter.data = parameter.data.clone()

    def _rotary_table(self, config) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos and sin of every position the model takes, from the model's own rotary module (the same values it
        computes per step: each position's angles are one product): a step reads its rows (one kernel) instead
        of computing them (several). None for RoPE types whose angles depend on the step's longest position."""
        positions = getattr(config, "max_position_embeddings", 0) or 0
        if getattr(self.rotary, "rope_type", None) not in ("default", "linear", "llama3", "yarn") \
                or not 0 < positions <= ROTARY_TABLE_POSITIONS:
            return None
        probe = self._rotary_probe()
        parts = [self.rotary(probe.unsqueeze(0), torch.arange(start, min(start + 8192, positions),
                                                               device=probe.device).unsqueeze(0))
                 for start in range(0, positions, 8192)]
        return torch.cat([c[0] for c, _ in parts]), torch.cat([s[0] for _, s in parts])

    def _fits_decode_kernel(self) -> bool:
        return (self.lm_head.kernels is not None and self.final_norm.dtype == torch.float32 and self.head_dim % 8 == 0
                and all(w.o.bias is None and (w.qkv.bf16 is not None or w.qkv.blocks is not None) for w in self.layers))

    def _fused_layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_layers: int | None
                      ) -> torch.Tensor:
        """The layers with fused_ops (GPUs): each residual add joined to the next RMSNorm, the rotary embedding to
        the KV-cache writes, SiLU to the product with up. Same roundings as _eager_layers."""
        step = attention.current_step()
        tokens = x.shape[0]
        layers = self.layers[:num_layers]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        cos, sin = cos.contiguous(), sin.contiguous()                         # [T, D], as the kernel reads them
        x, h = fused_ops.add_rms_norm(x, None, layers[0].input_norm, self.eps)
        for index, w in enumerate(layers):
            qkv = w.qkv(h)
            q, k = fused_ops.rotary_and_cache(qkv, cos, sin, step.slot_mapping, step.k_cache[index],
                                              step.v_cache[index], self.num_heads, self.num_kv_heads, self.head_dim)
            v = qkv[:, q_size + kv_size:].view(tokens, self.num_kv_heads, self.head_dim)
            attn = paged_attention_core(index, self.groups, q, k, v, self.scaling, cache_written=True)
            x, h = fused_ops.add_rms_norm(x, w.o(attn.reshape(tokens, q_size)), w.post_norm, self.eps)
            delta = w.down(fused_ops.silu_and_mul(w.gate_up(h)))
            if index + 1 < len(layers):
                x, h = fused_ops.add_rms_norm(x, delta, layers[index + 1].input_norm, self.eps)
            else:
                x = x + delta
        return x

    def _eager_layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_layers: int | None
                      ) -> torch.Tensor:
        """The layers as eager torch operations; cos/sin [T, D]."""
        tokens = x.shape[0]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)                        # [T, 1, D]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        for index, w in enumerate(self.layers[:num_layers]):
            h = self._rms_norm(x, w.input_norm)
            qkv = w.qkv(h)
            # q and k are adjacent in the fused projection: one rotation for both heads' worth of columns.
            qk = self._rotate(qkv[:, : q_size + kv_size].view(tokens, self.num_heads + self.num_kv_heads,
                                                               self.head_dim), cos, sin)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads:]
            v = qkv[:, q_size + kv_size:].view(tokens, self.num_kv_heads, self.head_dim)
            attn = paged_attention_core(index, self.groups, q, k, v, self.scaling)
            x = x + w.o(attn.reshape(tokens, q_size))
            h = self._rms_norm(x, w.post_norm)
            gate, up = w.gate_up(h).chunk(2, dim=-1)
            x = x + w.down(F.silu(gate) * up)
        return x

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # As transformers' LlamaRMSNorm: normalise in fp32, scale in the model's dtype.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x32.to(x.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor,
                 hidden_rows: torch.Tensor | None = None, num_layers: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """input_ids, positions: [T]; keep: rows whose logits are wanted -> (logits [len(keep), vocab], the
        final-normed hidden states of hidden_rows or None). num_layers < all: an early exit (the draft model of
        self-speculative decoding: the first layers, then the final norm and head)."""
        step = attention.current_step()
        tokens = input_ids.shape[0]
        if (self.decode_kernels is not None and hidden_rows is None and not step.prefills
                and step.decode_slots is not None
                and step.num_decode == tokens <= COMPACT_ROWS and step.k_cache[0].dtype in KERNEL_CACHE_DTYPES):
            return self.lm_head(self._decode_kernel_rows(input_ids, positions, keep, num_layers)), None
        x = self._embed(input_ids)
        if self.rotary_table is not None:
            cos, sin = (table.index_select(0, positions).unsqueeze(0) for table in self.rotary_table)
        else:
            cos, sin = self.rotary(x.unsqueeze(0), positions.unsqueeze(0))
        x = (self._fused_layers if self.fused else self._eager_layers)(x, cos[0], sin[0], num_layers)
        norm = self._fused_norm if self.fused else self._rms_norm
        hidden = None if hidden_rows is None else norm(x.index_select(0, hidden_rows), self.final_norm)
        return self.lm_head(norm(x.index_select(0, keep), self.final_norm)), hidden

    def _decode_kernel_rows(self, input_ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor,
                            num_layers: int | None) -> torch.Tensor:
        """A decode step's rows from their tokens to the final norm in one call of our CPU kernel (the embedding,
        every layer or the first num_layers (an early-exit draft), the final norm) -> the kept rows."""
        step = attention.current_step()
        if self.rotary_table is not None:
            cos, sin = self.rotary_table
        else:   # RoPE types whose angles depend on the step: this step's rows, in row order
            cos, sin = (part[0] for part in self.rotary(self._rotary_probe().unsqueeze(0), positions.unsqueeze(0)))
            positions = torch.arange(input_ids.shape[0])
        layers = len(self.layers) if num_layers is None else num_layers
        rows = self.decode_kernels.decode_layers(
            input_ids, self.embed if self.embed_blocks is None else self.embed_blocks, positions, cos, sin,
            step.slot_mapping, step.decode_slots, step.decode_lengths,
            step.k_cache[:layers], step.v_cache[:layers], self.decode_weights[:WEIGHTS_PER_LAYER * layers],
            self.final_norm, self.num_heads, self.num_kv_heads, self.head_dim,
            self.layers[0].down.in_features if self.layers else 0, self.eps, self.scaling)
        # keep lists rows in order: as many as the step has means every row (the usual case: no index_select).
        return rows if keep.shape[0] == rows.shape[0] else rows.index_select(0, keep)

    def _fused_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return fused_ops.add_rms_norm(x, None, weight, self.eps)[1]
