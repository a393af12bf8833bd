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
#: the longest ``max_length`` anywhere (training, a manifest, a tokenizer's truncation):
#: 32,768 tokens is 128 times the longest default and keeps one training batch of 32 texts
#: at 8.4 M ids
MAX_LENGTH_LIMIT = 32_768

TOKENIZER_KINDS = ("wordlevel", "regex", "regex-start")
#: MediaPipe Model Maker splits on ``[^\w\']+`` and RE2 reads ``\w`` as ASCII: this class
REGEX_DELIMITER = r"[^0-9A-Za-z_']+"
REGEX_PAD, REGEX_UNK, REGEX_START = "<PAD>", "<UNKNOWN>", "<START>"
#: every word the regex tokenizer can produce is made of these characters only
REGEX_WORD_CHARS = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_'")
#: (pad, unknown) token pairs a bundle's vocabulary may hold at ids 0 and 1
SPECIAL_TOKENS = ((PAD_TOKEN, UNK_TOKEN), (REGEX_PAD, REGEX_UNK))
#: regexes of the project's own tokenizers (``Split`` / ``Replace`` patterns): the only ones
#: a tokenizer.json may use, besides a single character class (see ``tokenizer_guard``)
SPLIT_PATTERNS = frozenset({REGEX_DELIMITER})


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


def load_tokenizer(path, max_length: int | None = None, vocab_size: int | None = None, notes: list | None = None):
    """A tokenizer from a ``tokenizer.json`` path (or its bytes), made safe first
    (``tokenizer_guard.sanitize``): padding off, truncation at ``max_length`` (default: the
    file's own), a WordLevel vocabulary of at most ``vocab_size`` ids, no regex but the
    project's. ``notes`` collects what was changed."""
    from .tokenizer_guard import MAX_TOKENIZER_BYTES, from_sanitized, sanitize

    if isinstance(path, (bytes, bytearray)):
        data, what = bytes(path), "tokenizer.json"
    else:
        from ..fsutil import read_regular

        path = Path(path)
        if not path.exists() and not path.is_symlink():
            raise UsageError(f"tokenizer file not found: {path}")
        data, what = read_regular(path, MAX_TOKENIZER_BYTES, what="tokenizer file"), str(path)
    text, changed = sanitize(data, max_length=max_length, vocab_size=vocab_size, what=what)
    if notes is not None:
        notes.extend(changed)
    return from_sanitized(text, what)


def encode(tokenizer, texts, max_length=None) -> np.ndarray:
    """Token ids ``int32 [batch, longest]``, right-padded with 0. Empty texts give one pad.
    Texts longer than ``MAX_TEXT_CHARS`` are refused; a tokenizer panic is a one-line error."""
    from .data import MAX_TEXT_CHARS
    from .tokenizer_guard import is_panic

    texts = list(texts)
    for i, t in enumerate(texts):
        if type(t) is not str:
            raise UsageError(f"text {i} is {type(t).__name__}; texts must be str")
        if len(t) > MAX_TEXT_CHARS:
            raise UsageError(f"text {i} has {len(t):,} characters; at most {MAX_TEXT_CHARS:,} allowed")
    try:
        enc = tokenizer.encode_batch(texts)
    except Exception as e:
        raise UsageError(f"the tokenizer failed: {one_line(e, 200)}") from None
    except BaseException as e:  # pyo3's PanicException is a BaseException
        if is_panic(e):
            raise UsageError(f"the tokenizer panicked: {one_line(e, 200)}") from None
        raise
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
