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
