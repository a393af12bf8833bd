"""Word-level tokenizers saved as a Hugging Face ``tokenizer.json``.

Any ``tokenizers`` binding (Python, Rust, Node) loads the file. Pad id 0, unknown id 1.
Padding is done here, to the longest text of each batch, so every runtime sees the same ids.

Two kinds (``TOKENIZER_KINDS``):

* ``wordlevel`` (the default): NFKC, lowercase, split on whitespace and punctuation
  (Unicode-aware), special tokens ``[PAD]`` and ``[UNK]``.
* ``regex``: exactly the regex tokenizer of MediaPipe's ``TextClassifier``
  (``RegexTokenizer`` metadata), so a bundle can run there with the same ids. No
  normalisation and no lowercasing (lookups are case-sensitive); the text is split on
  ``REGEX_DELIMITER`` and the delimiters dropped; ``<PAD>`` = 0, ``<UNKNOWN>`` = 1, and
  with ``regex-start`` a ``<START>`` id put at position 0 of every text. The delimiter is
  an explicit ASCII class because RE2 (MediaPipe) reads ``\\w`` as ASCII while Python's
  ``re`` and the Oniguruma engine of ``tokenizers`` read it as Unicode: this class means
  the same in all three. The special tokens are plain vocabulary entries, not added
  tokens, so a text containing ``<PAD>`` is split like any other text, as MediaPipe does.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UsageError, one_line

PAD_TOKEN, UNK_TOKEN = "[PAD]", "[UNK]"
PAD_ID, UNK_ID = 0, 1

TOKENIZER_KINDS = ("wordlevel", "regex", "regex-start")
#: MediaPipe Model Maker splits on ``[^\w\']+`` and RE2 reads ``\w`` as ASCII: this class
REGEX_DELIMITER = r"[^0-9A-Za-z_']+"
REGEX_PAD, REGEX_UNK, REGEX_START = "<PAD>", "<UNKNOWN>", "<START>"
#: every word the regex tokenizer can produce is made of these characters only
REGEX_WORD_CHARS = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_'")


def train_tokenizer(texts, vocab_size: int = 20000, max_length: int = 64):
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.trainers import WordLevelTrainer

    tok = Tokenizer(WordLevel(unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = WordLevelTrainer(vocab_size=vocab_size, special_tokens=[PAD_TOKEN, UNK_TOKEN],
                               show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.token_to_id(PAD_TOKEN) == PAD_ID and tok.token_to_id(UNK_TOKEN) == UNK_ID
    tok.enable_truncation(max_length=max_length)
    tok.no_padding()
    return tok


def train_regex_tokenizer(texts, vocab_size: int = 20000, max_length: int = 64, start: bool = False):
    """MediaPipe's regex tokenizer with the ``vocab_size`` most frequent words of ``texts``
    (case-sensitive; ties broken by first occurrence)."""
    import collections
    import re

    from tokenizers import Regex, Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    specials = [REGEX_PAD, REGEX_UNK] + ([REGEX_START] if start else [])
    if vocab_size <= len(specials):
        raise UsageError(f"--vocab-size must be above {len(specials)} for the regex tokenizer; received {vocab_size}")
    split = re.compile(REGEX_DELIMITER)
    counts = collections.Counter(w for t in texts for w in split.split(t) if w)
    words = [w for w, _ in counts.most_common(vocab_size - len(specials))]
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(WordLevel(vocab, unk_token=REGEX_UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(REGEX_DELIMITER), behavior="removed")
    if start:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{REGEX_START} $A", special_tokens=[(REGEX_START, vocab[REGEX_START])])
    tok.enable_truncation(max_length=max_length)
    tok.no_padding()
    return tok


def train_tokenizer_of_kind(kind: str, texts, vocab_size: int = 20000, max_length: int = 64):
    if kind not in TOKENIZER_KINDS:
        raise UsageError(f"unknown tokenizer '{kind}'; allowed: {', '.join(TOKENIZER_KINDS)}")
    if kind == "wordlevel":
        return train_tokenizer(texts, vocab_size, max_length)
    return train_regex_tokenizer(texts, vocab_size, max_length, start=kind == "regex-start")


def regex_spec(tokenizer) -> dict | None:
    """``{"delimiter", "start"}`` when ``tokenizer`` is exactly MediaPipe's regex tokenizer
    (no normaliser, the ASCII delimiter split, a word-level vocabulary of words made of
    ``REGEX_WORD_CHARS`` plus ``<PAD>`` = 0 and ``<UNKNOWN>`` = 1, and at most a
    ``<START>`` prefix), otherwise None: then MediaPipe would give other ids."""
    import json

    doc = json.loads(tokenizer.to_str())
    pre, model, post = doc.get("pre_tokenizer") or {}, doc.get("model") or {}, doc.get("post_processor")
    if doc.get("normalizer") is not None or doc.get("added_tokens") or model.get("type") != "WordLevel":
        return None
    if pre.get("type") != "Split" or pre.get("pattern") != {"Regex": REGEX_DELIMITER} \
            or pre.get("behavior") != "Removed" or pre.get("invert"):
        return None
    vocab = model.get("vocab") or {}
    if vocab.get(REGEX_PAD) != PAD_ID or vocab.get(REGEX_UNK) != UNK_ID or model.get("unk_token") != REGEX_UNK:
        return None
    start = REGEX_START in vocab
    words = [w for w in vocab if w not in (REGEX_PAD, REGEX_UNK, REGEX_START)]
    if not all(w and set(w) <= REGEX_WORD_CHARS for w in words):
        return None
    if post is None and not start:
        return {"delimiter": REGEX_DELIMITER, "start": False}
    if start and post and post.get("type") == "TemplateProcessing" \
            and [next(iter(x.values()))["id"] for x in post.get("single", [])] == [REGEX_START, "A"]:
        return {"delimiter": REGEX_DELIMITER, "start": True}
    return None


def vocabulary(tokenizer) -> list:
    """Every token in id order (ids must be 0..n-1, each used once)."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise UsageError("the tokenizer's ids are not 0..n-1 without gaps; cannot list its vocabulary")
    return [t for t, _ in by_id]


def load_tokenizer(path):
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"tokenizer file not found: {path}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side reports parse errors as plain Exception
        raise UsageError(f"{path} is not a valid tokenizer.json ({one_line(e, 160)})") from None
    if (tok.token_to_id(PAD_TOKEN), tok.token_to_id(UNK_TOKEN)) != (PAD_ID, UNK_ID) \
            and (tok.token_to_id(REGEX_PAD), tok.token_to_id(REGEX_UNK)) != (PAD_ID, UNK_ID):
        raise UsageError(
            f"{path}: expected {PAD_TOKEN}=0 and {UNK_TOKEN}=1 (or {REGEX_PAD}=0 and {REGEX_UNK}=1), found "
            f"{tok.token_to_id(PAD_TOKEN)} and {tok.token_to_id(UNK_TOKEN)}"
        )
    return tok


def encode(tokenizer, texts, max_length=None) -> np.ndarray:
    """Token ids ``int32 [batch, longest]``, right-padded with 0. Empty texts give one pad."""
    enc = tokenizer.encode_batch(list(texts))
    rows = [e.ids if max_length is None else e.ids[:max_length] for e in enc]
    width = max(1, max((len(r) for r in rows), default=1))
    out = np.zeros((len(rows), width), dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def encode_fixed(tokenizer, texts, length: int) -> np.ndarray:
    """Token ids padded or truncated to exactly ``length`` steps (for training batches)."""
    ids = encode(tokenizer, texts, max_length=length)
    if ids.shape[1] < length:
        ids = np.pad(ids, ((0, 0), (0, length - ids.shape[1])))
    return ids
