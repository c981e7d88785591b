"""Our own CPU kernels (cpu_kernels.cpp), compiled on first use with the system's C++ compiler and cached by
torch.utils.cpp_extension (~/.cache/torch_extensions, or TORCH_EXTENSIONS_DIR). Without a compiler (the container
image: its build stage compiled them) the module in TORCH_EXTENSIONS_DIR is imported as it is, if it was built from
this same source. None where they cannot run."""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path
from types import ModuleType

import torch

from common.logs import kv

log = logging.getLogger("splitserve.engine.kernels")
_NAME = "splitserve_cpu_kernels"
_SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
_SOURCE_HASH = "source.sha256"   # written next to the built module: the source it was built from
_loaded: ModuleType | None = None
_tried = False


def load() -> ModuleType | None:
    """The compiled module on AVX2 (or better) CPUs, built here with a C++ compiler or built earlier, else None
    (callers fall back)."""
    global _loaded, _tried
    if _tried:
        return _loaded
    _tried = True
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    _loaded = _build() if shutil.which("c++") is not None else _prebuilt()
    if _loaded is not None:
        log.info("CPU kernels loaded %s", kv(module=_loaded.__file__))
    return _loaded


def _source_hash() -> str:
    return hashlib.sha256(_SOURCE.read_bytes()).hexdigest()


def _build() -> ModuleType | None:
    try:
        from torch.utils.cpp_extension import load as build
        module = build(name=_NAME, sources=[str(_SOURCE)],
                       extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"], extra_ldflags=["-fopenmp"],
                       verbose=False)
        (Path(module.__file__).parent / _SOURCE_HASH).write_text(_source_hash())
    except Exception as exc:  # a missing compiler or headers: the engine runs without them
        log.warning("CPU kernels unavailable (%s); using torch's", exc)
        return None
    return module


def _prebuilt() -> ModuleType | None:
    folder = Path(os.environ.get("TORCH_EXTENSIONS_DIR", "/nonexistent")) / _NAME
    built_from = folder / _SOURCE_HASH
    if not built_from.exists() or built_from.read_text() != _source_hash():
        log.info("CPU kernels unavailable (no C++ compiler, none built from this source); using torch's")
        return None
    spec = importlib.util.spec_from_file_location(_NAME, folder / f"{_NAME}.so")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
