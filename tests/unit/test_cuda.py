"""The GPU path: the paged decode kernel (Triton) and the CUDA-graph decode steps. Skipped without CUDA (the CPU
CI); `make bench DEVICE=cuda` (bench/cuda.py) runs these on a GPU machine beside its own checks."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine_service.model import paged_decode
from engine_service.model.attention import _decode_attention
from tests.unit.test_engine import Collector

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not paged_decode.available(torch.device("cuda")),
                                reason="needs CUDA and Triton")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (32, 8, 64), (4, 4, 128), (8, 2, 48)])
def test_paged_kernel_equals_the_gathered_batched_matmuls(dtype, heads, kv_heads, head_dim):
    """Rows of 1 to 700 context tokens whose blocks are scattered over the cache: the kernel reading them through
    the block tables computes what gathering them and two batched matmuls compute."""
    generator = torch.Generator().manual_seed(heads + head_dim)
    block_size, num_blocks = 16, 200
    k = torch.randn(kv_heads, num_blocks * block_size + 8, head_dim, generator=generator).to(dtype)
    v = torch.randn(k.shape, generator=generator).to(dtype)
    lengths = [1, 15, 16, 17, 64, 129, 700]
    tables = [torch.randperm(num_blocks, generator=generator)[: -(-n // block_size)].tolist() for n in lengths]
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    q = torch.randn(len(lengths), heads, head_dim, generator=generator).to(dtype)
    out = paged_decode.paged_decode_attention(q.to(CUDA), k.to(CUDA), v.to(CUDA), padded.to(CUDA),
                                              torch.tensor(lengths, dtype=torch.int32, device=CUDA), block_size,
                                              head_dim ** -0.5).cpu()
    longest = max(lengths)
    slots = torch.tensor([[tables[r][min(j, n - 1) // block_size] * block_size + min(j, n - 1) % block_size
                           for j in range(longest)] for r, n in enumerate(lengths)])
    mask = (torch.arange(longest)[None] < torch.tensor(lengths)[:, None]).view(1, len(lengths), 1, longest)
    gathered = [cache.index_select(1, slots.view(-1)).view(kv_heads, len(lengths), longest, head_dim)
                for cache in (k, v)]
    expected = _decode_attention(heads // kv_heads, q, *gathered, mask, head_dim ** -0.5, None)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), expected.float(), atol=tolerance, rtol=tolerance)


@pytest.fixture(scope="module")
def cuda_model_dir(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=1,
                         eos_token_id=2, pad_token_id=2, tie_word_embeddings=True, initializer_range=0.3)
    folder = tmp_path_factory.mktemp("cuda-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _greedy(engine, prompts: list[list[int]], max_tokens: int, tag: str) -> list[list[int]]:
    from engine_service.sampling import SamplingParams
    collector = Collector()
    for index, ids in enumerate(prompts):
        engine.add_request(f"{tag}{index}", ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                           collector.callback(f"{tag}{index}"))
    collector.wait(len(prompts), timeout=300)
    return [collector.tokens[f"{tag}{index}"] for index in range(len(prompts))]


@pytest.mark.parametrize("ops", ["eager", "fused", "fused+gemv"])
def test_graph_replayed_decode_steps_equal_eager_steps_and_generate(cuda_model_dir, ops):
    """fp32 on the GPU: 5 requests at once (a graph of 8 rows, 3 of them padding), then each alone (the 1-row
    graph): the tokens are generate's, and the same with the graphs off (every step eager); with and without the
    fused ops, and with gpu_gemv's one-row products turned on in fp32 too (bf16 models only use them; here they
    are checked token for token)."""
    from engine_service.engine import Engine
    from engine_service.model.llama import LINEAR_NAMES
    from engine_service.model_runner import ModelRunner

    fused = ops != "eager"
    runner = ModelRunner(str(cuda_model_dir), "cuda-tiny", CUDA, torch.float32, kv_cache_bytes=1 << 26,
                         block_size=16, max_model_len=0, fused_gpu_ops=fused)
    assert runner.fast.fused == fused
    if ops == "fused+gemv":
        fast = runner.fast
        for linear in [fast.lm_head] + [getattr(w, name) for w in fast.layers for name in LINEAR_NAMES]:
            linear.gpu_gemv = True
    engine = Engine(runner, max_num_seqs=8, max_num_batched_tokens=512, max_waiting=64)
    assert runner.graphs is not None and runner.graphs.sizes == [1, 2, 4, 8]
    engine.start()
    try:
        prompts = [[(31 * i + 7 * j) % 4000 + 5 for j in range(3 + 9 * i)] for i in range(5)]
        together = _greedy(engine, prompts, 40, "together")
        alone = [_greedy(engine, [ids], 40, f"alone{i}-")[0] for i, ids in enumerate(prompts)]
        graphs, runner.graphs = runner.graphs, None
        eager = _greedy(engine, prompts, 40, "eager")
        runner.graphs = graphs
    finally:
        engine.stop()
    model = LlamaForCausalLM.from_pretrained(cuda_model_dir, dtype=torch.float32).to(CUDA).eval()
    for ids, a, b, c in zip(prompts, together, alone, eager):
        with torch.inference_mode():
            expected = model.generate(torch.tensor([ids], device=CUDA), max_new_tokens=40, min_new_tokens=40,
                                      do_sample=False, attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                                                                                 device=CUDA))[0, len(ids):].tolist()
        assert a == b == c == expected
    assert engine.stats().kv_blocks_used == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_ops_round_as_the_eager_operations(dtype):
    """The fused kernels against the eager torch operations they replace, on the GPU: the residual add, rotary
    embedding, cache writes and SiLU * up bit for bit; the RMSNorm up to the order of its fp32 sum (at most one
    step of the dtype apart, in a few places)."""
    import torch.nn.functional as F

    from engine_service.model import fused_ops
    generator = torch.Generator().manual_seed(5)
    tokens, width, heads, kv_heads, head_dim = 37, 576, 9, 3, 64
    x = (torch.randn(tokens, width, generator=generator) * 3).to(dtype).to(CUDA)
    delta = torch.randn(tokens, width, generator=generator).to(dtype).to(CUDA)
    weight = torch.randn(width, generator=generator).to(dtype).to(CUDA)

    def norm(t: torch.Tensor) -> torch.Tensor:   # transformers' LlamaRMSNorm
        t32 = t.float()
        return weight * (t32 * torch.rsqrt(t32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(t.dtype)

    step = 2 ** -7 if dtype == torch.bfloat16 else 1e-6       # one step of the dtype, relative
    total, normed = fused_ops.add_rms_norm(x, delta, weight, 1e-5)
    assert torch.equal(total, x + delta)
    reference = norm(x + delta)
    torch.testing.assert_close(normed.float(), reference.float(), atol=1e-6, rtol=step)
    if dtype == torch.bfloat16:   # the same roundings: only values at a rounding boundary may differ
        assert (normed != reference).float().mean() < 0.05
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=generator).to(dtype).to(CUDA)
    angles = torch.arange(tokens, device=CUDA)[:, None].float() * 0.37 ** torch.arange(head_dim // 2, device=CUDA)
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    k_cache = torch.zeros(kv_heads, 200, head_dim, dtype=dtype, device=CUDA)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(200, generator=generator)[:tokens].to(CUDA)
    q, k = fused_ops.rotary_and_cache(qkv, cos, sin, slots, k_cache, v_cache, heads, kv_heads, head_dim)
    heads_in = qkv[:, : (heads + kv_heads) * head_dim].view(tokens, heads + kv_heads, head_dim)
    half = head_dim // 2
    rotated = heads_in * cos[:, None] + torch.cat((-heads_in[..., half:], heads_in[..., :half]), -1) * sin[:, None]
    assert torch.equal(q, rotated[:, :heads]) and torch.equal(k, rotated[:, heads:])
    assert torch.equal(k_cache[:, slots], rotated[:, heads:].transpose(0, 1))
    assert torch.equal(v_cache[:, slots], qkv[:, (heads + kv_heads) * head_dim:].view(tokens, kv_heads, head_dim)
                       .transpose(0, 1))
    gate_up = torch.randn(tokens, 2 * 1536, generator=generator).to(dtype).to(CUDA)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(fused_ops.silu_and_mul(gate_up), F.silu(gate) * up, atol=1e-6, rtol=step)


@pytest.mark.parametrize("n,k,bias", [(3072, 2048, False), (2048, 8192, False), (1000, 576, True), (37, 300, False)])
def test_gemv_is_the_bf16_product_up_to_its_sum_order(n, k, bias):
    """gpu_gemv at one row: fp32 sums rounded once to bf16, so within one bf16 step of the exact product (float64
    here), and near cuBLAS's bf16 product; K not a multiple of the tile, a bias."""
    from engine_service.model import gpu_gemv
    generator = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=generator).to(torch.bfloat16).to(CUDA)
    x = torch.randn(1, k, generator=generator).to(torch.bfloat16).to(CUDA)
    b = torch.randn(n, generator=generator).to(torch.bfloat16).to(CUDA) if bias else None
    ours, theirs = gpu_gemv.gemv(x, w, b).float(), torch.nn.functional.linear(x, w, b).float()
    exact = x.double() @ w.double().T + (b.double() if bias else 0)
    step = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp_min(1e-3))) - 7)      # one bf16 step at each value
    assert ((ours.double() - exact).abs() <= step).all()
    # cuBLAS's split-K kernels round partial sums to bf16 (seen on an H200: some results over a step off): it is
    # the looser one, so it bounds the comparison only loosely.
    assert ((ours - theirs).abs() <= 8 * step).all()
