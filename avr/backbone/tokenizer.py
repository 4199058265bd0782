"""The text tokenizer: a real `tokenizers` byte-level BPE, wrapped as a transformers fast tokenizer.

`train_tokenizer(corpus)` trains it deterministically from a text corpus (ShapeWorld's prompts and
critiques by default; see `avr.world.prompts.corpus`); `add_special_tokens` gives any tokenizer,
a pretrained one included, the structural tokens the sequence format needs. Byte-level BPE never
produces an unknown token, so a word outside the corpus still encodes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
IMAGE_START, IMAGE_END = "<img>", "</img>"
STRUCTURE_TOKENS: tuple[str, ...] = (
    IMAGE_START,
    IMAGE_END,
    "<ins>",
    "</ins>",
    "<des>",
    "</des>",
    "<refine>",
    "</refine>",
)
DEFAULT_MODES: tuple[str, ...] = ("direct", "reflect", "plan")


def mode_token(mode: str) -> str:
    """The token the adaptive policy emits to choose `mode`, e.g. ``<mode:plan>``."""
    return f"<mode:{mode}>"


def special_tokens(modes: Sequence[str] = DEFAULT_MODES) -> list[str]:
    """Structural tokens plus one token per mode, in a fixed order."""
    return [*STRUCTURE_TOKENS, *(mode_token(m) for m in modes)]


def train_tokenizer(
    corpus: Iterable[str], vocab_size: int = 512, modes: Sequence[str] = DEFAULT_MODES
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `corpus` (same corpus, same tokenizer) with every special token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, *special_tokens(modes)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, bos_token=BOS, eos_token=EOS
    )


def add_special_tokens(
    tokenizer: PreTrainedTokenizerBase, modes: Sequence[str] = DEFAULT_MODES
) -> int:
    """Give a (pretrained) tokenizer the missing structural and mode tokens, and a pad/bos/eos
    where it has none. Returns how many tokens were added (resize the embeddings by as many)."""
    added = 0
    for name, token in (("pad_token", PAD), ("bos_token", BOS), ("eos_token", EOS)):
        if getattr(tokenizer, name) is None:
            added += tokenizer.add_special_tokens({name: token})
    missing = [t for t in special_tokens(modes) if t not in tokenizer.get_vocab()]
    if missing:
        added += tokenizer.add_special_tokens(
            {"additional_special_tokens": missing}, replace_extra_special_tokens=False
        )
    return added
