"""A character-level tokenizer for the toy task, built with the ``tokenizers`` library.

One token per character: ``<pad>`` (0), ``<eos>`` (1), ``<unk>`` (2), the digits, ``+ - =`` and
the space. There is no BOS token and no chat template: prompts are plain strings such as
``"12+7="`` and are encoded without special tokens, as TRL encodes plain-text prompts. The
tokenizer is a ``tokenizers`` ``WordLevel`` model behind a one-character ``Split``
pre-tokenizer, with a ``Fuse`` decoder so that ``decode(encode(s)) == s``; ``save_pretrained``
writes a standard ``tokenizer.json`` that ``AutoTokenizer.from_pretrained`` reads back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["CHARS", "EOS", "PAD", "SPECIAL", "UNK", "build_tokenizer"]

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIAL = (PAD, EOS, UNK)
CHARS = tuple("0123456789+-= ")
MODEL_MAX_LENGTH = 64


def build_tokenizer() -> PreTrainedTokenizerBase:
    """The toy's character-level fast tokenizer (vocabulary ``SPECIAL + CHARS``, 17 tokens).

    >>> tok = build_tokenizer()
    >>> ids = tok.encode("12+7=", add_special_tokens=False)
    >>> ids, tok.decode(ids)
    ([4, 5, 13, 10, 15], '12+7=')
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_MAX_LENGTH,
    )
