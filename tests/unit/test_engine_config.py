"""The engine's flags: a renamed flag keeps working under its old name for a release, with a deprecation warning;
--kv-cache-dtype takes what it can serve and refuses the rest."""
from __future__ import annotations

import logging

import pytest
import torch

from common.config import load_config
from engine_service.__main__ import EngineConfig
from engine_service.model_runner import pick_kv_cache_dtype


def test_the_old_compact_weights_flag_still_works_and_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="splitserve.config"):
        config = load_config(EngineConfig, ["--small-step-bf16", "false"])
    assert config.compact_decode_weights is False
    assert "--small-step-bf16 / SMALL_STEP_BF16 is deprecated" in caplog.text
    assert "--compact-decode-weights" in caplog.text


def test_the_old_environment_variable_still_works_and_the_new_name_wins(monkeypatch, caplog):
    monkeypatch.setenv("SMALL_STEP_BF16", "false")
    assert load_config(EngineConfig, []).compact_decode_weights is False
    assert load_config(EngineConfig, ["--compact-decode-weights", "true"]).compact_decode_weights is True
    monkeypatch.delenv("SMALL_STEP_BF16")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="splitserve.config"):
        assert load_config(EngineConfig, []).compact_decode_weights is True
    assert "deprecated" not in caplog.text


def test_kv_cache_dtype_flag_takes_auto_or_a_float_type_and_refuses_others(capsys):
    assert load_config(EngineConfig, []).kv_cache_dtype == "auto"
    assert load_config(EngineConfig, ["--kv-cache-dtype", "float16"]).kv_cache_dtype == "float16"
    with pytest.raises(SystemExit):
        load_config(EngineConfig, ["--kv-cache-dtype", "int8"])
    assert "kv_cache_dtype must be auto or one of" in capsys.readouterr().err


def test_a_16_bit_cache_under_an_fp32_model_is_for_cpus_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert pick_kv_cache_dtype("auto", torch.float32, cpu) == torch.float32
    assert pick_kv_cache_dtype("auto", torch.bfloat16, cuda) == torch.bfloat16
    assert pick_kv_cache_dtype("float16", torch.float32, cpu) == torch.float16
    assert pick_kv_cache_dtype("bf16", torch.float32, cpu) == torch.bfloat16
    assert pick_kv_cache_dtype("bfloat16", torch.bfloat16, cuda) == torch.bfloat16   # the model's own: allowed
    with pytest.raises(ValueError, match="on CPUs only"):
        pick_kv_cache_dtype("float16", torch.bfloat16, cuda)
    with pytest.raises(ValueError, match="unknown KV-cache dtype"):
        pick_kv_cache_dtype("fp8", torch.float32, cpu)
