"""Tokenizers for training: characters, byte-level BPE, or an existing model's tokenizer.
All are HF `tokenizers` objects saved as tokenizer.json, so trained checkpoints load exactly
like converted ones."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

EOS, UNK, MASK = "<|endoftext|>", "<unk>", "<mask>"
SPECIALS = [EOS, UNK, MASK]


def char_tokenizer(texts: Iterable[str]) -> Tokenizer:
    """One token per character seen in `texts` (plus <|endoftext|>, <unk> and <mask>)."""
    chars = sorted(set().union(*(set(t) for t in texts)))
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    return tok


def bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style: no unknown tokens, any text round-trips)."""
    if vocab_size < 300:
        raise ValueError(f"--vocab-size must be at least 300 for byte-level BPE (256 bytes + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def tokenizer_meta(kind: str, tok: Tokenizer) -> dict:
    """The "tokenizer" block of a checkpoint's config.json for a tokenizer built here."""
    return {"bos_token": None, "eos_token": EOS, "add_bos_token": False, "stop_tokens": [EOS],
            "mask_token": MASK if tok.token_to_id(MASK) is not None else None, "kind": kind}
