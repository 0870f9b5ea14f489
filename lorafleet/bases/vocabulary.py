"""A word-level CLIP tokenizer written by the project (no hub download).

CLIP's tokenizer is byte-level BPE. We give it every single byte symbol (so any text still
tokenizes, letter by letter) plus one merge chain per known word, so each known word becomes
exactly one token.
"""

from __future__ import annotations

# Imports inside functions: transformers only when a tokenizer is built.
from functools import lru_cache

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"


@lru_cache(maxsize=1)
def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2's table)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def _word_merges(word: str) -> list[tuple[str, str]]:
    """Merges that join ``word`` left to right into the single symbol ``word</w>``."""
    pieces = list(word[:-1]) + [word[-1] + END_OF_WORD]
    merges, joined = [], pieces[0]
    for piece in pieces[1:]:
        merges.append((joined, piece))
        joined += piece
    return merges


def build_vocabulary(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) for a CLIP tokenizer where every word in ``words`` is one token."""
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for token in (BOS, EOS):
        add(token)
    for symbol in _byte_symbols():
        add(symbol)
        add(symbol + END_OF_WORD)
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in sorted({w.lower() for w in words if w}):
        for left, right in _word_merges(word):
            if (left, right) not in seen:
                seen.add((left, right))
                merges.append((left, right))
                add(left + right)
    return vocab, merges


def build_tokenizer(words: list[str], model_max_length: int):
    """A transformers CLIPTokenizer over ``words``."""
    from transformers import CLIPTokenizer

    vocab, merges = build_vocabulary(words)
    tokenizer = CLIPTokenizer(
        vocab=vocab, merges=merges, unk_token=EOS, bos_token=BOS, eos_token=EOS, pad_token=EOS
    )
    tokenizer.model_max_length = model_max_length
    return tokenizer


T5_SPECIAL = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5's own vocabulary
WORD_BOUNDARY = "\u2581"  # SentencePiece's word-start mark


def build_t5_tokenizer(words: list[str], model_max_length: int):
    """A transformers T5 tokenizer (a SentencePiece-style Unigram model built with ``tokenizers``)
    where every word in ``words`` is one piece and any other text falls back to characters."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [(token, 0.0) for token in T5_SPECIAL]
    pieces += [(WORD_BOUNDARY + word, -1.0) for word in sorted({w.lower() for w in words if w})]
    pieces += [(WORD_BOUNDARY, -2.0)] + [(chr(c), -5.0) for c in range(32, 127)]
    model = Tokenizer(models.Unigram(pieces, unk_id=T5_SPECIAL.index("<unk>"), byte_fallback=False))
    model.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(" {2,}", " ")])
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement=WORD_BOUNDARY, prepend_scheme="always")
    model.decoder = decoders.Metaspace(replacement=WORD_BOUNDARY, prepend_scheme="always")
    model.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                         special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=model, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                extra_ids=0)
    tokenizer.model_max_length = model_max_length
    return tokenizer
