"""Session fixtures: the real tokenizer, a tiny random Llama built from it, and the real servers started once."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from common.models import resolve_model
from common.stack import Ports, Stack
from splitserve.v1 import engine_pb2_grpc, gateway_pb2_grpc

TINY_CONTEXT = 2048


def build_tiny_llama(folder: Path) -> Path:
    """A 2-layer, hidden-64 Llama with random weights and the real SmolLM2 tokenizer (same ids, same template)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TINY_CONTEXT,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
        initializer_range=0.3,  # spread-out logits: greedy choices are not near-ties
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return Path(resolve_model("smollm2"))


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir: Path):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def start_stack(model: Path | str, log_dir: Path, engine_args: list[str] | None = None) -> Stack:
    stack = Stack(model=str(model), ports=Ports.free(), log_dir=log_dir, engine_args=engine_args or [])
    stack.start()
    return stack


@pytest.fixture(scope="session")
def tiny_stack(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # A small step budget so that prompts of the tests are also prefilled in several chunks.
    # fp32 throughout (no compact decode weights): greedy output must be token-identical to transformers.
    stack = start_stack(tiny_model_dir, tmp_path_factory.mktemp("tiny-stack-logs"),
                        ["--max-num-batched-tokens", "64", "--decode-lease-seconds", "5", "--compact-decode-weights", "false"])
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def gateway(tiny_stack: Stack) -> Iterator[gateway_pb2_grpc.GatewayStub]:
    with grpc.insecure_channel(tiny_stack.address("gateway")) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


@pytest.fixture(scope="session")
def engine(tiny_stack: Stack) -> Iterator[engine_pb2_grpc.EngineStub]:
    with grpc.insecure_channel(tiny_stack.address("engine")) as channel:
        yield engine_pb2_grpc.EngineStub(channel)
