"""Our CPU kernels (engine_service/model/cpu_kernels.cpp) against plain references: the GGUF block kernels against the
dequantised matrix product, the one-call decode step against the eager forward pass, and a GGUF-sourced model
served from its blocks against transformers."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from bench import roofline
from engine_service.model import cpu_kernels, gguf_weights
from engine_service.model.linear import COMPACT_ROWS
from engine_service.model.llama import LINEAR_NAMES
from engine_service.engine import Engine
from engine_service.model_runner import ModelRunner
from engine_service.sampling import SamplingParams
from tests.helpers import reference_greedy

# The CI machine is AVX2 with a compiler: there the kernels must load (a failed build is a failure, not a skip).
needs_kernels = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                                   reason="our kernels are AVX2")
KINDS = {"Q4_1": GGMLQuantizationType.Q4_1, "Q8_0": GGMLQuantizationType.Q8_0}


@pytest.fixture(scope="module")
def kernels():
    module = cpu_kernels.load()
    assert module is not None, "the CPU kernels did not build"
    return module


@needs_kernels
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 12, 13, 16, 41, 64])
def test_block_kernel_equals_dequantized_product(kernels, kind, rows):
    rng = np.random.default_rng(rows)
    weight = rng.standard_normal((37, 96)).astype(np.float32)   # N not a multiple of the kernels' 16-row pairs
    blocks = quants.quantize(weight, KINDS[kind])
    dense = torch.from_numpy(quants.dequantize(blocks, KINDS[kind]).astype(np.float64))
    x = torch.randn(rows, 96)
    bias = torch.randn(37)
    kernel = getattr(kernels, gguf_weights.KERNELS[kind])
    blocks = gguf_weights.repack(kind, blocks)
    got = kernel(x, torch.from_numpy(blocks), 96, 37, bias)
    expected = x.double() @ dense.T + bias.double()
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(kernel(x, torch.from_numpy(blocks), 96, 37, None).double(), x.double() @ dense.T,
                               atol=1e-4, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("kind", KINDS)
def test_embedding_rows_from_blocks_are_the_dequantised_rows_bit_for_bit(kernels, kind):
    """A GGUF-sourced model's embedding is looked up from its blocks: each row must be exactly the row of the fp32
    model (its dequantisation), the zero rows after the last included, and an id past them refused."""
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((37, 96)).astype(np.float32) * 3
    blocks = quants.quantize(weight, KINDS[kind])
    dense = torch.from_numpy(quants.dequantize(blocks, KINDS[kind]))
    groups = torch.from_numpy(gguf_weights.repack(kind, blocks))
    ids = torch.tensor([36, 0, 5, 5, 17, 8, 9, 31])
    assert torch.equal(kernels.embed_rows(ids, groups, 96), dense[ids])
    assert torch.equal(kernels.embed_rows(torch.arange(37), groups, 96), dense)
    assert torch.equal(kernels.embed_rows(torch.tensor([47]), groups, 96), torch.zeros(1, 96))   # padding
    assert torch.equal(kernels.embed_rows(ids, dense, 96), dense[ids])   # an fp32 table too
    for bad in (-1, 48):
        with pytest.raises(RuntimeError, match="outside the vocabulary"):
            kernels.embed_rows(torch.tensor([bad]), groups, 96)


def _decode_ready_engine(runner: ModelRunner, prompts: list[list[int]]) -> Engine:
    """An engine (loop not started) whose sequences have all been prefilled: its next step is a plain decode."""
    engine = Engine(runner, max_num_seqs=64, max_num_batched_tokens=4096, max_waiting=64)
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=32, ignore_eos=True), lambda *args: None)
    engine._drain_inbox(False)
    for _ in range(3):   # prefill, then decodes: contexts of different lengths (the kernel's padded rows)
        engine.step()
    return engine


def _decode_logits_both_ways(runner: ModelRunner, engine: Engine) -> tuple[torch.Tensor, torch.Tensor]:
    chunks = engine.scheduler.schedule()
    assert chunks and all(c.is_decode for c in chunks)
    kernel_logits = runner.forward(chunks).logits
    kernels, runner.fast.decode_kernels = runner.fast.decode_kernels, None
    try:
        eager_logits = runner.forward(chunks).logits   # writes the same keys/values again: harmless
    finally:
        runner.fast.decode_kernels = kernels
    return kernel_logits, eager_logits


@pytest.fixture(scope="module")
def tiny_qwen2_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer Qwen2 (q/k/v projections with biases) with random weights and the real tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, initializer_range=0.3, bos_token_id=1, eos_token_id=2)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:   # non-zero biases, so that a dropped bias shows
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                projection.bias.normal_(0, 0.3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@needs_kernels
@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
@pytest.mark.parametrize("batch", [1, 3, 16, 40])
def test_decode_kernel_equals_eager_forward(kernels, request, architecture, batch):
    folder = request.getfixturevalue("tiny_model_dir" if architecture == "llama" else "tiny_qwen2_dir")
    runner = ModelRunner(str(folder), "tiny", torch.device("cpu"), torch.float32, kv_cache_bytes=1 << 24,
                         block_size=16, max_model_len=0, compact_decode_weights=True)
    assert runner.fast.decode_kernels is not None
    rng = np.random.default_rng(batch)
    prompts = [[int(t) for t in rng.integers(3, 49152, size=5 + 7 * i)] for i in range(batch)]
    engine = _decode_ready_engine(runner, prompts)
    kernel_logits, eager_logits = _decode_logits_both_ways(runner, engine)
    assert kernel_logits.shape == (batch, runner.model_spec.vocab_size)
    torch.testing.assert_close(kernel_logits, eager_logits, atol=2e-4, rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 16])
def test_decode_kernel_reads_and_writes_a_16_bit_cache_as_the_eager_path_does(kernels, tiny_model_dir, cache_dtype,
                                                                              batch):
    """--kv-cache-dtype float16 / bfloat16 under the fp32 model: the one-call kernel serves the decode step, reading
    the 16-bit keys and values widened to fp32, and stores its new ones rounded as torch's .to(dtype) rounds (the
    eager path and the prefill write the cache with torch). The cache holds twice the tokens of an fp32 one."""
    def runner_with(dtype: torch.dtype | None) -> ModelRunner:
        return ModelRunner(str(tiny_model_dir), "tiny", torch.device("cpu"), torch.float32, kv_cache_bytes=1 << 24,
                           block_size=16, max_model_len=0, compact_decode_weights=True, kv_cache_dtype=dtype)

    runner = runner_with(cache_dtype)
    assert runner.cache.k[0].dtype == cache_dtype
    assert runner.blocks.num_blocks == 2 * runner_with(None).blocks.num_blocks
    rng = np.random.default_rng(100 + batch)
    prompts = [[int(t) for t in rng.integers(3, 49152, size=5 + 7 * i)] for i in range(batch)]
    engine = _decode_ready_engine(runner, prompts)
    calls = []

    class Spy:   # the kernel module, counting the one-call steps
        def decode_layers(self, *args):
            calls.append(args[8][0].dtype)
            return kernels.decode_layers(*args)

    runner.fast.decode_kernels = Spy()
    try:
        chunks = engine.scheduler.schedule()
        before = [t.clone() for t in runner.cache.k + runner.cache.v]
        kernel_logits = runner.forward(chunks).logits
        kernel_cache = [t.clone() for t in runner.cache.k + runner.cache.v]
        runner.fast.decode_kernels = None
        eager_logits = runner.forward(chunks).logits   # writes the same keys/values again, with torch
    finally:
        runner.fast.decode_kernels = kernels
    assert calls == [cache_dtype], "the decode step did not go through the kernel"
    written = torch.cat([(k != b).flatten() for k, b in zip(kernel_cache, before)])
    kernel_values = torch.cat([t.flatten() for t in kernel_cache])[written]
    eager_values = torch.cat([t.flatten() for t in runner.cache.k + runner.cache.v])[written]
    assert written.sum() > 0.9 * batch * 2 * 2 * 2 * 16   # layers x (k, v) x kv heads x head size, a few zeros aside
    # The fp32 values before rounding differ by the summation order of the norms and products (a few fp32 ulps), so a
    # few may round to neighbouring 16-bit values; another rounding (truncation) would move about half of them.
    assert (kernel_values == eager_values).float().mean() > 0.95
    torch.testing.assert_close(kernel_values.float(), eager_values.float(), atol=1e-5, rtol=2 ** -7)
    torch.testing.assert_close(kernel_logits, eager_logits, atol=2e-3, rtol=1e-3)


@needs_kernels
def test_rotary_table_rows_are_the_rotary_modules_values(kernels, tiny_model_dir):
    """The one-call kernel reads each row's cos/sin from a table the model's rotary module built: the same floats
    the module gives for that position in a step of its own."""
    runner = ModelRunner(str(tiny_model_dir), "tiny", torch.device("cpu"), torch.float32, kv_cache_bytes=1 << 24,
                         block_size=16, max_model_len=0, compact_decode_weights=True)
    fast = runner.fast
    assert fast.decode_kernels is not None and fast.rotary_table is not None
    last = fast.rotary_table[0].shape[0] - 1
    for positions in ([0], [1, 7, 100], [last, 3, last - 1]):
        index = torch.tensor(positions)
        cos, sin = fast.rotary(fast.embed[:1].unsqueeze(0), index.unsqueeze(0))
        assert torch.equal(fast.rotary_table[0][index], cos[0]) and torch.equal(fast.rotary_table[1][index], sin[0])


@needs_kernels
def test_decode_kernel_refuses_ids_and_positions_out_of_range(kernels):
    """The kernel reads the embedding and rotary rows by index: an index outside them is an error, not a read
    past the tensor. With no layers, a row is its embedding through the final norm."""
    embed, table, norm = torch.randn(10, 16), torch.randn(4, 8), torch.rand(16)

    def run(ids: list[int], positions: list[int]) -> torch.Tensor:
        return kernels.decode_layers(torch.tensor(ids), embed, torch.tensor(positions), table, table,
                                     torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long),
                                     torch.ones(1, dtype=torch.long), [], [], [], norm, 2, 1, 8, 0, 1e-5, 0.35)

    row = embed[3:4]
    torch.testing.assert_close(run([3], [2]), norm * (row * torch.rsqrt(row.pow(2).mean(-1, keepdim=True) + 1e-5)))
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        run([10], [2])
    with pytest.raises(RuntimeError, match="beyond the rotary table"):
        run([3], [4])


def test_qwen2_fast_path_equals_generate(tiny_qwen2_dir, tokenizer):
    """The fast path with q/k/v biases (fp32 throughout) gives transformers' greedy tokens."""
    runner = ModelRunner(str(tiny_qwen2_dir), "tiny-qwen2", torch.device("cpu"), torch.float32,
                         kv_cache_bytes=1 << 24, block_size=16, max_model_len=0)
    assert runner.fast is not None and runner.fast.layers[0].qkv.bias is not None
    reference = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir).eval()
    engine = Engine(runner, max_num_seqs=4, max_num_batched_tokens=2048, max_waiting=16)
    engine.start()
    try:
        for text in ("The capital of France is", "def add(a, b):"):
            ids = tokenizer(text).input_ids
            assert _generate(engine, text, ids, 16) == reference_greedy(reference, ids, 16)
    finally:
        engine.stop()


def _generate(engine: Engine, request_id: str, ids: list[int], max_tokens: int, **params: object) -> list[int]:
    tokens: list[int] = []
    done = threading.Event()

    def collect(output):
        tokens.extend(output.token_ids)
        if output.finish_reason:
            done.set()
    engine.add_request(request_id, ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True, **params), collect)
    assert done.wait(60)
    return tokens


def _quantized_tiny_llama(source: Path, target: Path) -> Path:
    """The tiny Llama as a GGUF-sourced model: its layer matrices stored as Q4_1 blocks and its (tied)
    embedding as Q8_0 in a GGUF file, the fp32 folder holding exactly their dequantisation (as a GGUF converted
    by common.models does), with the marker that points the engine at the file."""
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    writer = GGUFWriter(str(target / "model.gguf"), "llama")
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    tensors: list[tuple[str, torch.nn.Parameter, GGMLQuantizationType]] = [
        ("token_embd.weight", model.model.embed_tokens.weight, GGMLQuantizationType.Q8_0)]
    for index, layer in enumerate(model.model.layers):
        for module_name, gguf_name in names.items():
            tensors.append((f"blk.{index}.{gguf_name}.weight", layer.get_submodule(module_name).weight,
                            GGMLQuantizationType.Q4_1))
    with torch.no_grad():
        for name, parameter, kind in tensors:
            blocks = quants.quantize(parameter.numpy(), kind)
            parameter.copy_(torch.from_numpy(quants.dequantize(blocks, kind)))
            writer.add_tensor(name, blocks, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    folder = target / "model"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    (folder / gguf_weights.SOURCE_FILE).write_text(str(target / "model.gguf") + "\n")
    return folder


@pytest.fixture(scope="module")
def quantized_tiny_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return _quantized_tiny_llama(tiny_model_dir, tmp_path_factory.mktemp("tiny-gguf"))


@needs_kernels
def test_gguf_sourced_model_decodes_from_its_blocks(kernels, quantized_tiny_dir, tokenizer):
    runner = ModelRunner(str(quantized_tiny_dir), "tiny-gguf", torch.device("cpu"), torch.float32,
                         kv_cache_bytes=1 << 24, block_size=16, max_model_len=0, compact_decode_weights=True)
    fast = runner.fast
    assert fast.lm_head.blocks is not None
    assert all(linear.blocks is not None for w in fast.layers for linear in (w.qkv, w.o, w.gate_up, w.down))
    # The bench's roofline: a decode step reads exactly the file's blocks (and the norms), at every size; so does a
    # prefill.
    gguf_file = gguf_weights.source_of(str(quantized_tiny_dir))
    norms = sum(w.input_norm.nbytes + w.post_norm.nbytes for w in fast.layers) + fast.final_norm.nbytes
    assert roofline.cost_of(runner).weight_bytes == sum(t.data.nbytes for t in GGUFReader(gguf_file).tensors) + norms
    down = fast.layers[0].down
    assert down.bf16 is None   # the blocks replace the bf16 copy
    # ... and the fp32 one: the blocks are the only copy of each matrix they serve.
    assert all(linear.packed is None and linear.weight is None
               for linear in [fast.lm_head] + [getattr(w, name) for w in fast.layers for name in LINEAR_NAMES])
    assert [down.bytes_read(rows) for rows in (1, 3, COMPACT_ROWS, COMPACT_ROWS + 1, 2048)] == [down.blocks[1].nbytes] * 5
    # The tied embedding is the head's blocks too: no fp32 table is kept, and its rows are the fp32 model's.
    reference = AutoModelForCausalLM.from_pretrained(quantized_tiny_dir).eval()
    table = reference.model.embed_tokens.weight.detach()
    assert fast.embed is None and fast.embed_blocks is fast.lm_head.blocks[1]
    assert runner.model.model.embed_tokens.weight is None
    assert torch.equal(kernels.embed_rows(torch.arange(table.shape[0]), fast.embed_blocks, table.shape[1]), table)
    # Steps of 1, 2, 5 (rows reading the blocks, up to 3 at a time) and 13 rows (dequantised panels) read the
    # blocks, in one kernel call and on the eager path alike.
    texts = ("The capital of France is", "def add(a, b):", "Once upon a time", "1, 2, 3,", "Bonjour")
    for batch in (1, 2, 5, 13):
        prompts = [tokenizer(texts[i % len(texts)]).input_ids + [i] for i in range(batch)]
        kernel_logits, eager_logits = _decode_logits_both_ways(runner, _decode_ready_engine(runner, prompts))
        torch.testing.assert_close(kernel_logits, eager_logits, atol=2e-4, rtol=1e-4)
    # The same weights as the fp32 model: greedy output equals transformers' on the dequantised model.
    engine = Engine(runner, max_num_seqs=4, max_num_batched_tokens=2048, max_waiting=16)
    engine.start()
    try:
        for text in ("Once upon a time", "def fib(n):", "你好"):
            ids = tokenizer(text).input_ids
            assert _generate(engine, text, ids, 24) == reference_greedy(reference, ids, 24)
    finally:
        engine.stop()


@needs_kernels
def test_blocks_that_do_not_match_the_weights_are_not_used(kernels, quantized_tiny_dir, tmp_path):
    """Another file's blocks (or a model changed after conversion) must never be read in place of the weights."""
    model = AutoModelForCausalLM.from_pretrained(quantized_tiny_dir).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[3, 5] += 0.25
    folder = tmp_path / "changed"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(quantized_tiny_dir).save_pretrained(folder)
    (folder / gguf_weights.SOURCE_FILE).write_text((quantized_tiny_dir / gguf_weights.SOURCE_FILE).read_text())
    runner = ModelRunner(str(folder), "changed", torch.device("cpu"), torch.float32, kv_cache_bytes=1 << 24,
                         block_size=16, max_model_len=0, compact_decode_weights=True)
    assert runner.fast.layers[0].down.blocks is None
    assert runner.fast.layers[0].gate_up.blocks is not None


class _CountingKernels:
    """The compiled module, recording the rows and the layers of every one-call decode step."""

    def __init__(self, module) -> None:
        self.module = module
        self.rows: list[int] = []
        self.layers: list[int] = []

    def decode_layers(self, ids, embed, positions, cos, sin, slots, context, lengths, k_cache, *args):
        self.rows.append(ids.shape[0])
        self.layers.append(len(k_cache))
        return self.module.decode_layers(ids, embed, positions, cos, sin, slots, context, lengths, k_cache, *args)


@needs_kernels
def test_speculative_chains_take_the_decode_kernel(kernels, tiny_model_dir, tokenizer):
    """A prompt-lookup step's chain of guesses is decode rows of one sequence: it runs in the one-call kernel,
    and (each row computed as a decode at its position would be) greedy output equals plain greedy."""
    runner = ModelRunner(str(tiny_model_dir), "tiny", torch.device("cpu"), torch.float32, kv_cache_bytes=1 << 24,
                         block_size=16, max_model_len=0, compact_decode_weights=True)
    counting = _CountingKernels(runner.fast.decode_kernels)
    runner.fast.decode_kernels = counting
    engine = Engine(runner, max_num_seqs=4, max_num_batched_tokens=2048, max_waiting=16)
    engine.start()
    try:
        prompts = [[5, 6, 7, 8] * 10, list(range(100, 140)) * 2, [9, 9, 9, 9, 9, 9],
                   tokenizer("the cat sat on the mat. the cat sat on the").input_ids]
        drafts, chains = engine.guesses_verified, 0
        for i, ids in enumerate(prompts):
            plain = _generate(engine, f"plain-{i}", ids, 24)
            counting.rows.clear()
            assert _generate(engine, f"lookup-{i}", ids, 24, speculative="prompt_lookup") == plain
            chains += sum(rows > 1 for rows in counting.rows)
        # Guesses were verified, and those steps went through the kernel with more rows than sequences.
        assert engine.guesses_verified > drafts and chains > 0
        assert engine.stats().kv_blocks_used == 0
    finally:
        engine.stop()


@needs_kernels
def test_early_exit_drafts_take_the_decode_kernel(kernels, tiny_model_dir, tokenizer):
    """The "draft" strategy guesses with the first layers of the model: those passes run in the one-call kernel
    with fewer layers, and greedy output (every guess verified by the full model) equals plain greedy."""
    runner = ModelRunner(str(tiny_model_dir), "tiny", torch.device("cpu"), torch.float32, kv_cache_bytes=1 << 24,
                         block_size=16, max_model_len=0, compact_decode_weights=True)
    counting = _CountingKernels(runner.fast.decode_kernels)
    runner.fast.decode_kernels = counting
    engine = Engine(runner, max_num_seqs=4, max_num_batched_tokens=2048, max_waiting=16, draft_layers=1)
    engine.start()
    try:
        for i, ids in enumerate([[5, 6, 7, 8] * 10, tokenizer("the cat sat on the mat.").input_ids]):
            plain = _generate(engine, f"plain-{i}", ids, 24)
            counting.layers.clear()
            assert _generate(engine, f"draft-{i}", ids, 24, speculative="draft") == plain
            assert 1 in counting.layers and len(runner.fast.layers) in counting.layers
        assert engine.stats().kv_blocks_used == 0
    finally:
        engine.stop()
