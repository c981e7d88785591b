"""What the engine keeps resident after load: transformers maps the checkpoint file and loads each weight as a view
of that mapping. On a CPU every matrix then lives in a copy of ours (oneDNN's packed fp32, GGUF blocks), and the
weights left (embedding, norms) must not be views of the file, or the whole file stays resident for them."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from engine_service.model_runner import ModelRunner


def _mappings_of(folder: Path) -> list[tuple[int, int]]:
    """The address ranges this process maps from files in folder (Linux's /proc/self/maps)."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip().startswith(str(folder)):
                start, end = (int(address, 16) for address in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def _views_of_file(tensors: list[torch.Tensor], ranges: list[tuple[int, int]]) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in tensors
            if any(start <= t.untyped_storage().data_ptr() < end for start, end in ranges)]


def test_weights_kept_after_load_are_not_views_of_the_checkpoint_file(tiny_model_dir: Path):
    runner = ModelRunner(str(tiny_model_dir), "tiny", torch.device("cpu"), torch.float32, kv_cache_bytes=1 << 24,
                         block_size=16, max_model_len=0)
    # The same file loaded by transformers alone: its weights are views of the mapping, which the check sees.
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ranges = _mappings_of(tiny_model_dir.resolve())
    assert _views_of_file(list(plain.parameters()), ranges)
    fast = runner.fast
    kept = list(runner.model.parameters()) + [fast.embed, fast.final_norm] + [
        norm for w in fast.layers for norm in (w.input_norm, w.post_norm)]
    assert fast.embed.numel() > 0 and _views_of_file(kept, ranges) == []
    assert all(getattr(w, name).weight is None for w in fast.layers for name in ("qkv", "o", "gate_up", "down"))
