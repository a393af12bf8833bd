"""Word-level tokenizers saved as a Hugging Face ``tokenizer.json`` (+ ``tokenizer_config.json``).

Four kinds (``TOKENIZER_KINDS``, ``probattn train --tokenizer KIND``; ``kind_of`` tells which
one a file is, ``custom`` for anything else):

* ``portable`` (the default, below);
* ``wordlevel``: the recipe of earlier probattn versions (``NFKC``, ``Lowercase``, the
  ``Whitespace`` pre-tokenizer ``\\w+|[^\\w\\s]+``, ``[PAD]``/``[UNK]`` as added tokens);
* ``regex`` / ``regex-start``: exactly the regex tokenizer of MediaPipe's
  ``TextClassifier`` (``RegexTokenizer`` metadata), so a bundle can run there with the same
  ids. No normalisation and no lowercasing (lookups are case-sensitive); the text is split
  on ``REGEX_DELIMITER`` and the delimiters dropped; ``<PAD>`` = 0, ``<UNKNOWN>`` = 1, and
  with ``regex-start`` a ``<START>`` id put at position 0 of every text. The delimiter is
  an explicit ASCII class because RE2 (MediaPipe) reads ``\\w`` as ASCII while Python's
  ``re`` and the Oniguruma engine of ``tokenizers`` read it as Unicode: this class means
  the same in all three. The special tokens are plain vocabulary entries, not added
  tokens, so a text containing ``<PAD>`` is split like any other text, as MediaPipe does.

The portable recipe gives the same ids in Python/Rust ``tokenizers``,
tokenizers.js (``@huggingface/tokenizers``), transformers.js and ``probattn.models.text.fast``
(a pure-Python twin): checked on real texts, a battery of hard inputs and every Unicode
code point (``scripts/tokenizer_codepoints.py``).

* normalizer: ``Replace(OUTSIDE -> U+FFFD)``, ``NFKC``, ``Lowercase``, ``Replace(ς -> σ)``.
  OUTSIDE is every code point the builder's Python does not know (unassigned in its
  ``unicodedata``), the surrogates, and the few code points whose NFKC or lowercase in the
  installed Rust ``tokenizers`` differs from Python's. Every engine then classifies only
  characters all of them know, whatever Unicode version each one ships. The set is written
  into ``tokenizer.json`` (the Replace pattern), so it travels with the file. Rust
  lowercases char by char while JavaScript and Python apply the final-sigma rule; mapping
  every final sigma to σ afterwards makes them agree.
* pre-tokenizer: ``Split(SPLIT_PATTERN, behavior="removed", invert=True)``: keeps the
  matches. The pattern uses General_Category classes only, never ``\\w``, ``\\s``, ``\\d``
  or ``\\b`` (which mean different things in Oniguruma, Rust, JavaScript and Python): a
  word starts with a letter, digit or connector (``_``) and goes on with those or marks; a
  punctuation run starts with punctuation or a symbol and goes on with those or marks; a
  mark with nothing to attach to is its own token; everything else (spaces, controls,
  format characters, private use) separates tokens.
* model: WordLevel, ``[PAD]`` = 0, ``[UNK]`` = 1, and no ``added_tokens``: a literal
  ``[PAD]`` in a text is split like any text (``[``, ``pad``, ``]``) instead of becoming
  the pad id.
* truncation at the training max length is stored in ``tokenizer.json``. JavaScript
  ignores it: clients cut ids at ``model_max_length`` from ``tokenizer_config.json``, the
  file tokenizers.js reads ``unk_token`` from and transformers.js needs to load at all.

Bundles and runs made before this recipe (kind ``wordlevel``) and any other
``tokenizer.json`` load and are used as they are. ``probattn.models.text.fast`` reproduces
``portable`` and ``regex``/``regex-start`` exactly, ``wordlevel`` on ASCII texts, and
refuses the rest (``tokenizers`` is used then).
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import numpy as np

from ..errors import UsageError, one_line

PAD_TOKEN, UNK_TOKEN = "[PAD]", "[UNK]"
PAD_ID, UNK_ID = 0, 1
TOKENIZER_FILE = "tokenizer.json"
#: read by tokenizers.js (``unk_token``) and required by transformers.js
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
#: the input name clients put in ``model_input_names``
MODEL_INPUT_NAME = "token_ids"

# ------------------------------------------------------------------ the portable recipe
#: a word: a letter, digit or connector punctuation, then those or combining marks
WORD_START = r"\p{L}\p{N}\p{Pc}"
#: punctuation other than connectors, and symbols
PUNCT_START = r"\p{Pd}\p{Ps}\p{Pe}\p{Pi}\p{Pf}\p{Po}\p{S}"
#: the Split pre-tokenizer's pattern (behavior removed, invert: the matches are the tokens)
SPLIT_PATTERN = (rf"[{WORD_START}][{WORD_START}\p{{M}}]*"
                 rf"|[{PUNCT_START}][{PUNCT_START}\p{{M}}]*"
                 r"|\p{M}+")
#: what every code point outside the repertoire becomes before anything else
REPLACEMENT_CHAR = "\ufffd"
FINAL_SIGMA, SIGMA = "\u03c2", "\u03c3"
#: the normalizer steps after the repertoire Replace, as ``tokenizer.json`` spells them
NORMALIZER_TAIL = [{"type": "NFKC"}, {"type": "Lowercase"},
                   {"type": "Replace", "pattern": {"String": FINAL_SIGMA}, "content": SIGMA}]
PRE_TOKENIZER = {"type": "Split", "pattern": {"Regex": SPLIT_PATTERN}, "behavior": "Removed",
                 "invert": True}
#: the repertoire Replace pattern: one character class of ``\x{HEX}`` / ``\x{HEX}-\x{HEX}``
OUTSIDE_CLASS = re.compile(r"\[(?:\\x\{[0-9A-F]{1,6}\}(?:-\\x\{[0-9A-F]{1,6}\})?)+\]")
_OUTSIDE_ITEM = re.compile(r"\\x\{([0-9A-F]{1,6})\}(?:-\\x\{([0-9A-F]{1,6})\})?")

# ------------------------------------------------------------------ kinds
KIND_PORTABLE = "portable"
#: the recipe of probattn before the portable one: NFKC + Lowercase, Whitespace split
KIND_WORDLEVEL = "wordlevel"
KIND_REGEX, KIND_REGEX_START = "regex", "regex-start"
#: what ``train --tokenizer`` can make; the first is the default
TOKENIZER_KINDS = (KIND_PORTABLE, KIND_WORDLEVEL, KIND_REGEX, KIND_REGEX_START)
DEFAULT_TOKENIZER_KIND = KIND_PORTABLE
#: any other tokenizer.json (a user's own)
KIND_CUSTOM = "custom"
#: the earlier recipe's normalizer and pre-tokenizer, as ``tokenizer.json`` spells them
WORDLEVEL_NORMALIZER = {"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Lowercase"}]}
WORDLEVEL_PRE_TOKENIZER = {"type": "Whitespace"}

#: the longest ``max_length`` anywhere (training, a manifest, a tokenizer's truncation):
#: 32,768 tokens is 128 times the longest default and keeps one training batch of 32 texts
#: at 8.4 M ids
MAX_LENGTH_LIMIT = 32_768

#: MediaPipe Model Maker splits on ``[^\w\']+`` and RE2 reads ``\w`` as ASCII: this class
REGEX_DELIMITER = r"[^0-9A-Za-z_']+"
REGEX_PAD, REGEX_UNK, REGEX_START = "<PAD>", "<UNKNOWN>", "<START>"
#: every word the regex tokenizer can produce is made of these characters only
REGEX_WORD_CHARS = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_'")
#: (pad, unknown) token pairs a bundle's vocabulary may hold at ids 0 and 1
SPECIAL_TOKENS = ((PAD_TOKEN, UNK_TOKEN), (REGEX_PAD, REGEX_UNK))
#: regexes of the project's own tokenizers (``Split`` / ``Replace`` patterns): the only ones
#: a tokenizer.json may use, besides a single character class (see ``tokenizer_guard``)
SPLIT_PATTERNS = frozenset({REGEX_DELIMITER, SPLIT_PATTERN})


def _merge(cps) -> list:
    """Sorted code points -> ``[(first, last)]`` runs."""
    out = []
    for cp in cps:
        if out and out[-1][1] == cp - 1:
            out[-1][1] = cp
        else:
            out.append([cp, cp])
    return [tuple(r) for r in out]


@functools.lru_cache(maxsize=1)
def outside_ranges() -> tuple:
    """The code points every engine must see as U+FFFD, for this Python and this Rust
    ``tokenizers``: unassigned (``Cn``) here, surrogates (``Cs``), and those whose NFKC or
    lowercase in Rust differs from Python's (Rust's NFKC tables are older: 72 code points
    with tokenizers 0.23). About 1 s: once per process."""
    import unicodedata

    from tokenizers import normalizers

    rust = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    category, normalize = unicodedata.category, unicodedata.normalize
    out = []
    for cp, cat in enumerate(map(category, map(chr, range(0x110000)))):
        if cat == "Cn" or cat == "Cs":
            out.append(cp)
            continue
        c = chr(cp)
        py = normalize("NFKC", c)
        if (py != c or c.lower() != c) and rust.normalize_str(c) != py.lower():
            out.append(cp)
    return tuple(_merge(out))


def outside_pattern(ranges) -> str:
    """The Oniguruma character class of ``ranges`` (what the Replace step matches)."""
    body = "".join(f"\\x{{{a:X}}}" if a == b else f"\\x{{{a:X}}}-\\x{{{b:X}}}" for a, b in ranges)
    return f"[{body}]"


def parse_outside_pattern(regex: str) -> list:
    """``[(first, last)]`` from a repertoire Replace pattern; ValueError when ``regex`` is
    not exactly a class of ``\\x{HEX}`` items (so nothing else can hide in it)."""
    if not isinstance(regex, str) or not OUTSIDE_CLASS.fullmatch(regex):
        raise ValueError("the Replace pattern is not a class of \\x{HEX} code points")
    return list(_parse_outside(regex))


@functools.lru_cache(maxsize=4)
def _parse_outside(regex: str) -> tuple:
    """``parse_outside_pattern`` once per pattern (a bundle's is read three times at load)."""
    ranges = []
    for m in _OUTSIDE_ITEM.finditer(regex):
        a = int(m.group(1), 16)
        b = int(m.group(2) or m.group(1), 16)
        if not a <= b <= 0x10FFFF:
            raise ValueError(f"bad code point range \\x{{{m.group(1)}}}-\\x{{{m.group(2)}}}")
        ranges.append((a, b))
    return tuple(ranges)


def portable_normalizer(ranges=None):
    from tokenizers import Regex, normalizers

    return normalizers.Sequence([
        normalizers.Replace(Regex(outside_pattern(outside_ranges() if ranges is None else ranges)),
                            REPLACEMENT_CHAR),
        normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(FINAL_SIGMA, SIGMA)])


def portable_pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True)


def train_tokenizer(texts, vocab_size: int = 20000, max_length: int = 64):
    """The portable word-level tokenizer: the ``vocab_size`` most frequent tokens of
    ``texts`` after ``[PAD]`` = 0 and ``[UNK]`` = 1, truncating at ``max_length``."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.trainers import WordLevelTrainer

    tok = Tokenizer(WordLevel(unk_token=UNK_TOKEN))
    tok.normalizer = portable_normalizer()
    tok.pre_tokenizer = portable_pre_tokenizer()
    trainer = WordLevelTrainer(vocab_size=vocab_size, special_tokens=[PAD_TOKEN, UNK_TOKEN],
                               show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    spec = json.loads(tok.to_str())
    # The trainer registers [PAD]/[UNK] as added tokens, which every engine matches in the
    # raw text before normalising ("[PAD]" typed by a user would become id 0). Their ids
    # stay in the vocabulary; dropping the added tokens makes them plain words.
    spec["added_tokens"] = []
    tok = Tokenizer.from_str(json.dumps(spec))
    assert tok.token_to_id(PAD_TOKEN) == PAD_ID and tok.token_to_id(UNK_TOKEN) == UNK_ID
    tok.enable_truncation(max_length=max_length)
    tok.no_padding()
    return tok


def train_wordlevel_tokenizer(texts, vocab_size: int = 20000, max_length: int = 64):
    """The earlier default (kind ``wordlevel``): NFKC, Lowercase, ``Whitespace``, with
    ``[PAD]`` and ``[UNK]`` as added tokens (matched in the raw text)."""
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
    if kind == KIND_PORTABLE:
        return train_tokenizer(texts, vocab_size, max_length)
    if kind == KIND_WORDLEVEL:
        return train_wordlevel_tokenizer(texts, vocab_size, max_length)
    return train_regex_tokenizer(texts, vocab_size, max_length, start=kind == KIND_REGEX_START)


# ------------------------------------------------------------------ kinds
def spec_of(tokenizer) -> dict:
    """The ``tokenizer.json`` content of a ``tokenizers.Tokenizer`` (or a dict as is)."""
    return tokenizer if isinstance(tokenizer, dict) else json.loads(tokenizer.to_str())


def _post_problem(spec: dict) -> str | None:
    """What every kind the fast path reproduces needs after the model: no post-processor,
    no padding, right truncation without stride."""
    if spec.get("post_processor") is not None:
        return "it has a post-processor"
    if spec.get("padding") is not None:
        return "padding is enabled in the file"
    trunc = spec.get("truncation")
    if trunc is not None and (trunc.get("direction") != "Right" or trunc.get("stride", 0) != 0
                              or not isinstance(trunc.get("max_length"), int)):
        return "truncation is not right truncation without stride"
    return None


def portable_problem(spec: dict) -> str | None:
    """None when ``spec`` (a parsed ``tokenizer.json``) is exactly the portable recipe;
    otherwise what differs. Exactly: ``probattn.models.text.fast`` and the JavaScript
    libraries reproduce only this."""
    norm = spec.get("normalizer") or {}
    parts = norm.get("normalizers") if norm.get("type") == "Sequence" else None
    if not parts or len(parts) != 4 or parts[1:] != NORMALIZER_TAIL:
        return "the normalizer is not Replace(repertoire), NFKC, Lowercase, Replace(ς, σ)"
    first = parts[0]
    if first.get("type") != "Replace" or first.get("content") != REPLACEMENT_CHAR \
            or set(first.get("pattern") or {}) != {"Regex"}:
        return "the normalizer's first step is not the repertoire Replace"
    try:
        parse_outside_pattern(first["pattern"]["Regex"])
    except ValueError as e:
        return str(e)
    if spec.get("pre_tokenizer") != PRE_TOKENIZER:
        return "the pre-tokenizer is not the portable Split"
    model = spec.get("model") or {}
    vocab = model.get("vocab")
    if model.get("type") != "WordLevel" or not isinstance(vocab, dict) or model.get("unk_token") != UNK_TOKEN:
        return f"the model is not WordLevel with unk_token {UNK_TOKEN}"
    if vocab.get(PAD_TOKEN) != PAD_ID or vocab.get(UNK_TOKEN) != UNK_ID:
        return f"{PAD_TOKEN} and {UNK_TOKEN} are not ids {PAD_ID} and {UNK_ID}"
    if spec.get("added_tokens"):
        return "it has added tokens (matched in the raw text before normalising)"
    return _post_problem(spec)


def regex_spec(tokenizer) -> dict | None:
    """``{"delimiter", "start"}`` when ``tokenizer`` (a ``tokenizers.Tokenizer`` or its
    parsed ``tokenizer.json``) is exactly MediaPipe's regex tokenizer (no normaliser, the
    ASCII delimiter split, a word-level vocabulary of words made of ``REGEX_WORD_CHARS``
    plus ``<PAD>`` = 0 and ``<UNKNOWN>`` = 1, and at most a ``<START>`` prefix), otherwise
    None: then MediaPipe would give other ids."""
    doc = spec_of(tokenizer)
    pre, model, post = doc.get("pre_tokenizer") or {}, doc.get("model") or {}, doc.get("post_processor")
    if doc.get("normalizer") is not None or doc.get("added_tokens") or model.get("type") != "WordLevel":
        return None
    if doc.get("padding") is not None:
        return None
    trunc = doc.get("truncation")
    if trunc is not None and (trunc.get("direction") != "Right" or trunc.get("stride", 0) != 0
                              or not isinstance(trunc.get("max_length"), int)):
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
            and [next(iter(x.values()))["id"] for x in post.get("single", [])] == [REGEX_START, "A"] \
            and (post.get("special_tokens") or {}).get(REGEX_START, {}).get("ids") == [vocab[REGEX_START]]:
        return {"delimiter": REGEX_DELIMITER, "start": True}
    return None


def wordlevel_problem(spec: dict) -> str | None:
    """None when ``spec`` is exactly the earlier recipe (kind ``wordlevel``) as
    ``train_wordlevel_tokenizer`` writes it; otherwise what differs."""
    model = spec.get("model") or {}
    vocab = model.get("vocab")
    if spec.get("normalizer") != WORDLEVEL_NORMALIZER or spec.get("pre_tokenizer") != WORDLEVEL_PRE_TOKENIZER:
        return "the normalizer and pre-tokenizer are not NFKC, Lowercase and Whitespace"
    if model.get("type") != "WordLevel" or not isinstance(vocab, dict) or model.get("unk_token") != UNK_TOKEN:
        return f"the model is not WordLevel with unk_token {UNK_TOKEN}"
    if vocab.get(PAD_TOKEN) != PAD_ID or vocab.get(UNK_TOKEN) != UNK_ID:
        return f"{PAD_TOKEN} and {UNK_TOKEN} are not ids {PAD_ID} and {UNK_ID}"
    for a in spec.get("added_tokens") or []:
        if a.get("content") not in (PAD_TOKEN, UNK_TOKEN) or vocab.get(a.get("content")) != a.get("id") \
                or a.get("normalized") or a.get("lstrip") or a.get("rstrip") or a.get("single_word"):
            return "it has added tokens other than the plain [PAD] and [UNK]"
    return _post_problem(spec)


def kind_of(tokenizer) -> str:
    """``portable``, ``wordlevel`` (the earlier default), ``regex``, ``regex-start`` or
    ``custom``: which of ``TOKENIZER_KINDS`` a tokenizer is, exactly."""
    spec = spec_of(tokenizer)
    if portable_problem(spec) is None:
        return KIND_PORTABLE
    regex = regex_spec(spec)
    if regex is not None:
        return KIND_REGEX_START if regex["start"] else KIND_REGEX
    if wordlevel_problem(spec) is None:
        return KIND_WORDLEVEL
    return KIND_CUSTOM


def vocabulary(tokenizer) -> list:
    """Every token in id order (ids must be 0..n-1, each used once); ``tokenizer``: a
    ``tokenizers.Tokenizer`` or a sanitized spec dict."""
    if isinstance(tokenizer, dict):
        return spec_vocabulary(tokenizer)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise UsageError("the tokenizer's ids are not 0..n-1 without gaps; cannot list its vocabulary")
    return [t for t, _ in by_id]


def tokenizer_config(max_length: int) -> dict:
    """``tokenizer_config.json``: tokenizers.js takes ``unk_token`` from here (not from
    ``tokenizer.json``) for a word-level model, transformers.js does not load a tokenizer
    without it, and ``model_max_length`` is where JavaScript clients truncate (neither
    library applies the truncation stored in ``tokenizer.json``)."""
    import unicodedata

    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": UNK_TOKEN,
        "pad_token": PAD_TOKEN,
        "model_max_length": int(max_length),
        "padding_side": "right",
        "truncation_side": "right",
        "clean_up_tokenization_spaces": False,
        "model_input_names": [MODEL_INPUT_NAME],
        "probattn_tokenizer_kind": KIND_PORTABLE,
        "probattn_unicode_version": unicodedata.unidata_version,
    }


def write_tokenizer_config(folder, max_length: int) -> Path:
    path = Path(folder) / TOKENIZER_CONFIG_FILE
    path.write_text(json.dumps(tokenizer_config(max_length), indent=1) + "\n", encoding="utf-8")
    return path


def save_tokenizer(tokenizer, folder, max_length: int) -> list:
    """Write ``tokenizer.json``, and ``tokenizer_config.json`` when the tokenizer is the
    portable kind (for another kind JavaScript gives other ids: no config is written,
    so JavaScript clients refuse it instead). Returns the file names written."""
    folder = Path(folder)
    tokenizer.save(str(folder / TOKENIZER_FILE))
    if kind_of(tokenizer) != KIND_PORTABLE:
        return [TOKENIZER_FILE]
    write_tokenizer_config(folder, max_length)
    return [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE]


# ------------------------------------------------------------------ loading and encoding
def load_tokenizer(path, max_length: int | None = None, vocab_size: int | None = None, notes: list | None = None):
    """A tokenizer from a ``tokenizer.json`` path (or its bytes), made safe first
    (``tokenizer_guard.sanitize``): padding off, truncation at ``max_length`` (default: the
    file's own), a WordLevel vocabulary of at most ``vocab_size`` ids, no regex but the
    project's. ``notes`` collects what was changed."""
    what = "tokenizer.json" if isinstance(path, (bytes, bytearray)) else str(path)
    return tokenizer_from_spec(load_tokenizer_spec(path, max_length, vocab_size, notes), what)


def load_tokenizer_spec(path, max_length: int | None = None, vocab_size: int | None = None,
                        notes: list | None = None) -> dict:
    """The sanitized ``tokenizer.json`` as a dict (what ``load_tokenizer`` loads), without
    importing ``tokenizers``."""
    from .tokenizer_guard import MAX_TOKENIZER_BYTES, sanitize_spec

    if isinstance(path, (bytes, bytearray)):
        data, what = bytes(path), "tokenizer.json"
    else:
        from ..fsutil import read_regular

        path = Path(path)
        if not path.exists() and not path.is_symlink():
            raise UsageError(f"tokenizer file not found: {path}")
        data, what = read_regular(path, MAX_TOKENIZER_BYTES, what="tokenizer file"), str(path)
    spec, changed = sanitize_spec(data, max_length=max_length, vocab_size=vocab_size, what=what)
    if notes is not None:
        notes.extend(changed)
    return spec


def tokenizer_from_spec(spec: dict, what: str = "tokenizer.json"):
    """The ``tokenizers.Tokenizer`` of a spec from ``load_tokenizer_spec``."""
    from .tokenizer_guard import canonical_json, from_sanitized

    return from_sanitized(canonical_json(spec), what)


def spec_vocabulary(spec: dict) -> list:
    """Every token of a sanitized spec in id order (its ids are 0..n-1, checked there)."""
    tokens = [None] * len(spec["model"]["vocab"])
    for token, i in spec["model"]["vocab"].items():
        tokens[i] = token
    return tokens


def pad_rows(rows, max_length=None) -> np.ndarray:
    """Id lists -> ``int32 [batch, longest]``, cut at ``max_length``, right-padded with 0.
    Empty rows give one pad."""
    rows = [r if max_length is None else r[:max_length] for r in rows]
    width = max(1, max((len(r) for r in rows), default=1))
    out = np.zeros((len(rows), width), dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def encode(tokenizer, texts, max_length=None) -> np.ndarray:
    """Token ids ``int32 [batch, longest]``, right-padded with 0. Empty texts give one pad.
    Texts longer than ``MAX_TEXT_CHARS`` are refused; a tokenizer panic is a one-line error."""
    from ..bounds import MAX_TEXT_CHARS
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
    return pad_rows([e.ids for e in enc], max_length)
def encode_fixed(tokenizer, texts, length: int) -> np.ndarray:
    """Token ids padded or truncated to exactly ``length`` steps (for training batches)."""
    ids = encode(tokenizer, texts, max_length=length)
    if ids.shape[1] < length:
        ids = np.pad(ids, ((0, 0), (0, length - ids.shape[1])))
    return ids
