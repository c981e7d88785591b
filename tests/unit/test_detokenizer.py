"""IncrementalDetokenizer: deltas concatenate to transformers' tokenizer.decode(ids, skip_special_tokens=True),
exactly, whatever the chunking, and never hold a broken character — on SmolLM2's byte-level BPE (through the
tokenizers library's DecodeStream) and on a small SentencePiece-style (Metaspace + byte fallback) vocabulary built
here (through our own window)."""
from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from common.models import resolve_model
from tokenizer_service.detokenizer import DecodeTraits, IncrementalDetokenizer

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3:45 p.m.; isn't it?  Double  spaces.",
    "chinese": "你好，世界！这是一个测试：分词器把汉字拆成多个字节。",
    "emoji": "Emoji 🙂🎉🚀 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 skin 👍🏽 done",
    "code": "def f(x: int) -> int:\n\treturn x ** 2  # square\n\nprint({'a': [1, 2]})\n",
    "mixed": "Ελληνικά, русский, العربية, हिन्दी, 日本語のテキスト and 한국어 — naïve café.",
}
SENTENCES = [
    "Hello world, this is a tiny SentencePiece vocabulary.",
    "The quick brown fox jumps over the lazy dog.",
    "Spaces matter: leading, trailing and  double.",
    "It's not what you'd think, isn't it? I've seen they're here !",
]
# Punctuation that transformers' clean_up_tokenization_spaces rewrites (" ." -> ".", " n't" -> "n't", ...).
CLEANUP_TEXTS = ["Hello world , it is n't here . I 've seen ' s they 're ! ok ?", "a ' b n ' t 'r 'v .  . , !"]


@pytest.fixture(scope="module")
def smollm2():
    return AutoTokenizer.from_pretrained(resolve_model("smollm2"))


def build_sentencepiece_like(style: str, cleanup: bool) -> PreTrainedTokenizerFast:
    """A tiny Unigram vocabulary with byte fallback: `metaspace` (Metaspace pre-tokenizer and decoder, as
    recent Llama/Mistral conversions) or `llama` (normalizer prepends ▁; decoder Replace/ByteFallback/Fuse/Strip)."""
    tokenizer = Tokenizer(models.Unigram())
    if style == "metaspace":
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tokenizer.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first")])
    else:
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tokenizer.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.UnigramTrainer(vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>")
    tokenizer.train_from_iterator(SENTENCES, trainer)
    # Byte fallback needs the 256 <0xNN> pieces in the model's vocabulary (not as added tokens).
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    spec["model"]["vocab"] = vocab[:3] + [[f"<0x{byte:02X}>", 0.0] for byte in range(256)] + vocab[3:]
    spec["model"]["byte_fallback"] = True
    pieces = [piece for piece, _ in spec["model"]["vocab"]]
    for added in spec["added_tokens"]:
        added["id"] = pieces.index(added["content"])
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", clean_up_tokenization_spaces=cleanup)


SENTENCEPIECE_LIKE = {(style, cleanup): build_sentencepiece_like(style, cleanup)
                      for style in ("metaspace", "llama") for cleanup in (False, True)}


def detokenizer_of(tokenizer: PreTrainedTokenizerFast) -> IncrementalDetokenizer:
    """The service's detokenizer over this transformers tokenizer's backend (none of them is a BPE model asking
    for cleanup, which transformers would ignore)."""
    return IncrementalDetokenizer(tokenizer.backend_tokenizer, cleanup=tokenizer.clean_up_tokenization_spaces)


def stream(tokenizer, ids: list[int], sizes: list[int] | None = None, seed: int = 0) -> list[str]:
    """Feeds ids in chunks (sizes cycle; default: random 1-5), the last one final; returns the deltas."""
    detokenizer = detokenizer_of(tokenizer)
    rng = random.Random(seed)
    deltas, start, step = [], 0, 0
    while start < len(ids):
        size = sizes[step % len(sizes)] if sizes else rng.randint(1, 5)
        chunk, start, step = ids[start:start + size], start + size, step + 1
        deltas.append(detokenizer.add(chunk, final=start >= len(ids)))
    return deltas


def expected(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("sizes", [[1], [3], [2, 7, 1], None], ids=["one", "three", "mixed", "random"])
@pytest.mark.parametrize("name", list(TEXTS))
def test_deltas_concatenate_to_the_full_decode_without_broken_characters(smollm2, name: str, sizes) -> None:
    ids = smollm2(TEXTS[name]).input_ids
    deltas = stream(smollm2, ids, sizes)
    assert "".join(deltas) == expected(smollm2, ids) == TEXTS[name]
    assert not any("\ufffd" in delta for delta in deltas)


def test_a_character_split_across_tokens_is_held_back_until_complete(smollm2) -> None:
    ids = smollm2("你好🙂").input_ids
    assert len(ids) > 3  # byte-level BPE splits these characters over several tokens
    detokenizer = detokenizer_of(smollm2)
    deltas = [detokenizer.add([token_id]) for token_id in ids]
    assert "" in deltas  # some tokens completed nothing yet
    assert "".join(deltas) == "你好🙂"
    assert detokenizer.add([], final=True) == ""


def test_final_flushes_an_incomplete_character_as_the_full_decode_has_it(smollm2) -> None:
    ids = smollm2("ok 𝄞").input_ids[:-1]  # the rare character's last byte(s) are missing
    full = expected(smollm2, ids)
    assert full.endswith("\ufffd")
    deltas = stream(smollm2, ids, [1])
    assert "".join(deltas) == full
    assert "\ufffd" not in "".join(deltas[:-1])  # held back until final


def test_special_tokens_in_the_stream_are_skipped(smollm2) -> None:
    text = "<|im_start|>assistant\nSure! 你好 🙂<|im_end|>\n<|im_start|>user\nmore<|endoftext|>"
    ids = smollm2(text).input_ids
    assert set(ids) & set(smollm2.all_special_ids)
    for sizes in ([1], [4], None):
        assert "".join(stream(smollm2, ids, sizes)) == expected(smollm2, ids) == "assistant\nSure! 你好 🙂\nuser\nmore"


def test_random_ids_keep_the_invariant_even_for_invalid_utf8(smollm2) -> None:
    rng = random.Random(7)
    special = list(smollm2.all_special_ids)
    for trial in range(1000):
        ids = [rng.choice(special) if rng.random() < 0.1 else rng.randrange(len(smollm2))
               for _ in range(rng.randint(1, 40))]
        assert "".join(stream(smollm2, ids, seed=trial)) == expected(smollm2, ids)


def test_byte_level_bpe_streams_through_decode_stream_and_byte_fallback_or_cleanup_through_our_window(smollm2):
    assert DecodeTraits.of(smollm2.backend_tokenizer, False).streamable
    for (style, cleanup), tokenizer in SENTENCEPIECE_LIKE.items():
        assert not DecodeTraits.of(tokenizer.backend_tokenizer, cleanup).streamable, (style, cleanup)


def test_the_decode_window_stays_short_on_long_outputs() -> None:
    tokenizer = SENTENCEPIECE_LIKE[("metaspace", True)]
    ids = tokenizer(" ".join(SENTENCES + CLEANUP_TEXTS) * 20).input_ids
    detokenizer = detokenizer_of(tokenizer)
    longest = 0
    for token_id in ids:
        detokenizer.add([token_id])
        longest = max(longest, len(detokenizer.ids) - detokenizer.prefix_offset)
    assert len(ids) > 1000 and longest <= 12
    assert detokenizer.text + detokenizer.add([], final=True) == expected(tokenizer, ids)


def test_ids_after_final_and_out_of_vocabulary_ids_are_rejected(smollm2) -> None:
    detokenizer = detokenizer_of(smollm2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        detokenizer.add([len(smollm2)])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        detokenizer.add([-1])
    detokenizer.add([42], final=True)
    with pytest.raises(ValueError, match="already finished"):
        detokenizer.add([42])


@pytest.mark.parametrize("config", list(SENTENCEPIECE_LIKE), ids=lambda c: f"{c[0]}-cleanup{c[1]}")
def test_sentencepiece_like_vocabulary_keeps_spaces_and_the_invariant(config) -> None:
    tokenizer = SENTENCEPIECE_LIKE[config]
    byte_pieces = tokenizer.convert_ids_to_tokens(tokenizer(TEXTS["chinese"] + TEXTS["emoji"]).input_ids)
    assert {"<0xE4>", "<0xF0>"} <= set(byte_pieces)  # 你 and 🙂 go through byte fallback
    for text in [*SENTENCES, *TEXTS.values(), *CLEANUP_TEXTS, "  leading and trailing spaces  "]:
        ids = tokenizer(text).input_ids
        for sizes in ([1], [2], None):
            deltas = stream(tokenizer, ids, sizes)
            assert "".join(deltas) == expected(tokenizer, ids)
            assert not any("\ufffd" in delta for delta in deltas)
    # Metaspace decoding drops the first space only; the spaces between words stay.
    ids = tokenizer("Hello world, quick fox").input_ids
    assert "".join(stream(tokenizer, ids, [1])) == "Hello world, quick fox"


@pytest.mark.parametrize("config", list(SENTENCEPIECE_LIKE), ids=lambda c: f"{c[0]}-cleanup{c[1]}")
def test_sentencepiece_like_random_ids_keep_the_invariant(config) -> None:
    tokenizer = SENTENCEPIECE_LIKE[config]
    rng = random.Random(3)
    pieces = [tokenizer.convert_tokens_to_ids(token) for token in ("▁", "'", "n", ".", ",", "?", "▁is", "t")]
    for trial in range(1000):
        # Mostly real pieces and punctuation (cleanup cases), some byte-fallback runs, valid or not.
        ids = [rng.choice(pieces) if rng.random() < 0.5 else rng.randrange(len(tokenizer))
               for _ in range(rng.randint(1, 30))]
        assert "".join(stream(tokenizer, ids, seed=trial)) == expected(tokenizer, ids)


def test_cleanup_of_tokenization_spaces_is_applied_as_decode_does() -> None:
    tokenizer = SENTENCEPIECE_LIKE[("metaspace", True)]
    ids = tokenizer("it is n't here . ok ?").input_ids
    deltas = stream(tokenizer, ids, [1])
    assert "".join(deltas) == "it isn't here. ok?" == expected(tokenizer, ids)


def test_a_byte_fallback_run_is_held_until_it_ends() -> None:
    tokenizer = SENTENCEPIECE_LIKE[("metaspace", False)]
    ids = tokenizer("ab 中文 cd").input_ids
    detokenizer = detokenizer_of(tokenizer)
    deltas = [detokenizer.add([token_id]) for token_id in ids]
    byte_positions = [i for i, token in enumerate(tokenizer.convert_ids_to_tokens(ids)) if token.startswith("<0x")]
    assert len(byte_positions) == 6 and all(deltas[i] == "" for i in byte_positions)
    assert "".join(deltas) + detokenizer.add([], final=True) == "ab 中文 cd"
