"""Tokenizers built locally (no download), following the special-token conventions of the real
checkpoints they stand in for:

- BLIP (and the BLIP-2 Q-Former): BERT WordPiece, lower-cased, [PAD]=0, [CLS] ... [SEP]; BLIP adds
  `[DEC]` as bos (the decoder's start token) and `[ENC]` as an extra special token.
- OPT (BLIP-2 OPT): GPT-2 byte-level BPE with <s>=0 <pad>=1 </s>=2 <unk>=3 and `</s>` prepended as bos.
- Flan-T5 (BLIP-2 T5): a Unigram (sentencepiece-style) model, <pad>=0 </s>=1 <unk>=2, `</s>` appended.
- Vicuna (InstructBLIP Vicuna): LLaMA's sentencepiece-style BPE with byte fallback, <unk>=0 <s>=1 </s>=2,
  then, as the InstructBLIP checkpoints were converted (transformers' convert_instructblip_original_to_pytorch:
  `LlamaTokenizerFast(..., bos_token="</s>", unk_token="</s>")` plus a `[PAD]` token), `</s>` as bos
  (prepended) and unk, `[PAD]` appended to the vocabulary; truncation from the left.
- The InstructBLIP Q-Former's own tokenizer (`qformer_tokenizer`): BERT WordPiece with `[DEC]` as bos
  (LAVIS `init_tokenizer`), truncation from the left, as in that conversion script.
- CLIP: byte-level BPE with the `</w>` end-of-word suffix, <|startoftext|> and <|endoftext|>.
"""

from __future__ import annotations

import json
import string

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import BertTokenizer, CLIPTokenizer, GPT2Tokenizer, LlamaTokenizer, T5Tokenizer

# Enough text for tokenizers that can spell the captions and questions tests and the demo use.
DEFAULT_CORPUS = [
    "a photo of a cat",
    "a photo of a dog",
    "two cats laying on a couch",
    "a man riding a bike down a street",
    "a child is flying a kite in a park",
    "a red car parked next to a tree",
    "a bowl of fruit on a table",
    "what is in the picture?",
    "how many dogs are there?",
    "what color is the car?",
    "what digit is this?",
    "question: what is this? answer: a cat",
    "yes",
    "no",
    "red",
    "blue",
    "green",
    "one",
    "two",
    "three",
    "a handwritten digit zero",
    "a handwritten digit one",
    "a handwritten digit two",
    "a handwritten digit three",
    "a handwritten digit four",
    "a handwritten digit five",
    "a handwritten digit six",
    "a handwritten digit seven",
    "a handwritten digit eight",
    "a handwritten digit nine",
    "a picture of",
    "an image of",
    "the quick brown fox jumps over the lazy dog",
]


def _words(corpus: list[str]) -> list[str]:
    seen: dict[str, None] = {}
    for line in corpus:
        for word in line.lower().replace("?", " ? ").replace(":", " : ").replace(",", " , ").split():
            seen.setdefault(word, None)
    return list(seen)


def wordpiece_tokenizer(corpus: list[str] | None = None, *, blip_decoder: bool = True):
    """A BERT WordPiece tokenizer whose vocabulary holds every word of `corpus` plus single
    characters (so any lower-case ASCII text tokenizes without [UNK])."""
    vocab_list = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab_list += list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab_list += ["##" + c for c in string.ascii_lowercase + string.digits]
    vocab_list += [w for w in _words(corpus or DEFAULT_CORPUS) if w not in vocab_list]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(vocab_list))}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True)
    if blip_decoder:
        # Salesforce/blip-*: bos_token [DEC] (decoder start), additional special token [ENC].
        tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def _train_bpe(corpus: list[str], vocab_size: int, special: list[str], *, suffix: str | None = None):
    bpe = Tokenizer(models.BPE(end_of_word_suffix=suffix) if suffix else models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        **({"end_of_word_suffix": suffix} if suffix else {}),
    )
    bpe.train_from_iterator(corpus, trainer)
    state = json.loads(bpe.to_str())
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" ")) for m in state["model"]["merges"]]
    return state["model"]["vocab"], merges


def opt_tokenizer(corpus: list[str] | None = None, vocab_size: int = 600, *, add_bos_token: bool = True):
    """GPT-2 style byte-level BPE with OPT's special tokens (bos = eos = </s>, prepended unless
    `add_bos_token=False`, as some other decoder-only tokenizers do)."""
    vocab, merges = _train_bpe(corpus or DEFAULT_CORPUS, vocab_size, ["<s>", "<pad>", "</s>", "<unk>"])
    return GPT2Tokenizer(
        vocab=vocab,
        merges=merges,
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=add_bos_token,
    )


def t5_tokenizer(corpus: list[str] | None = None, vocab_size: int = 300, **kwargs):
    """A Unigram tokenizer with T5's conventions (<pad>=0, </s>=1, <unk>=2; </s> appended). `kwargs`
    go to the tokenizer (InstructBLIP's Flan-T5 truncates from the left)."""
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    # Single letters are seeded so any lower-case text can be spelled.
    text = (corpus or DEFAULT_CORPUS) + list(string.ascii_lowercase + string.digits + string.punctuation)
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
        initial_alphabet=list(string.ascii_lowercase + string.digits + string.punctuation),
    )
    unigram.train_from_iterator(text, trainer)
    pieces = [tuple(p) for p in json.loads(unigram.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=pieces, extra_ids=0, **kwargs)


def clip_tokenizer(corpus: list[str] | None = None, vocab_size: int = 600):
    """CLIP-style byte-level BPE (`</w>` suffix), <|startoftext|> ... <|endoftext|>."""
    special = ["<|startoftext|>", "<|endoftext|>"]
    vocab, merges = _train_bpe(
        [c.lower() for c in (corpus or DEFAULT_CORPUS)], vocab_size, special, suffix="</w>"
    )
    return CLIPTokenizer(vocab=vocab, merges=merges)


def qformer_tokenizer(corpus: list[str] | None = None):
    """InstructBLIP's Q-Former tokenizer: BERT WordPiece (uncased) with `[DEC]` as bos, truncating
    from the left (the instruction's end is kept)."""
    tokenizer = wordpiece_tokenizer(corpus, blip_decoder=False)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.truncation_side = "left"
    tokenizer.init_kwargs["truncation_side"] = "left"
    return tokenizer


def vicuna_tokenizer(corpus: list[str] | None = None, vocab_size: int = 600):
    """LLaMA-style BPE (sentencepiece conventions: `\u2581` for spaces, byte fallback `<0x00>`..`<0xFF>`)
    with <unk>=0 <s>=1 </s>=2, and InstructBLIP Vicuna's changes: `</s>` is bos (prepended) and unk,
    `[PAD]` is added last, truncation from the left."""
    metaspace = Tokenizer(models.BPE())
    # Trained word by word (sentencepiece never merges across a space); LlamaTokenizer reads it unsplit.
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first", split=True
    )
    alphabet = list(string.ascii_letters + string.digits + string.punctuation)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[], initial_alphabet=alphabet + ["\u2581"], show_progress=False
    )
    metaspace.train_from_iterator((corpus or DEFAULT_CORPUS) + alphabet, trainer)
    state = json.loads(metaspace.to_str())
    learned = sorted(state["model"]["vocab"], key=state["model"]["vocab"].get)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + learned
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" ")) for m in state["model"]["merges"]]
    tokenizer = LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token="</s>",
        eos_token="</s>",
        unk_token="</s>",
        truncation_side="left",
        add_bos_token=True,
    )
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    return tokenizer
