"""The engine's flags: a renamed flag keeps working under its old name for a release, with a deprecation warning."""
from __future__ import annotations

import logging

from common.config import load_config
from engine_service.__main__ import EngineConfig


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
