"""An untrusted ``tokenizer.json`` made safe before ``tokenizers`` loads it (TensorFlow-free).

A tokenizer file decides the ids every runtime sees, and ``tokenizers`` does what the file
says: a ``padding`` block with ``pad_id`` 18 pads short texts with a real word (accuracy
drops and nothing fails); a fixed padding of 2,000,000 makes every text two million ids
(8.7 s and 1.5 GB for 8 texts); a ``truncation.max_length`` of 10**9 turns truncation off;
a ``stride`` at least ``max_length`` makes encoding panic; a backtracking regex makes one
text take seconds to minutes (Oniguruma), or panic when it hits its retry limit; an added
token missing from the vocabulary gets the id one past the model's embedding table.

``sanitize(data, max_length=..., vocab_size=...)`` parses the file itself (size-capped,
duplicate keys refused) and returns canonical JSON plus notes, after it:

* allows only a ``WordLevel`` model whose ids are exactly 0..n-1, with one of the project's
  special-token pairs at 0 (pad) and 1 (unknown) (``SPECIAL_TOKENS`` in ``tokenizer.py``),
  and at most ``vocab_size`` entries (the model's embedding rows);
* allows added tokens only when the vocabulary holds them with the same id;
* allows normalizer and pre-tokenizer steps from a fixed list; a regex (``Split``,
  ``Replace``) must be one of the project's own patterns (``SPLIT_PATTERNS``) or a single
  character class of code points and ranges (no alternation, no repetition: linear time);
* allows a post-processor only when it prepends special tokens the vocabulary holds with
  the same ids (nothing else); drops the decoder (never used);
* forces padding off (texts are padded by probattn) and truncation to ``max_length``,
  stride 0, longest first, right side.

``encode`` (in ``tokenizer.py``) turns a Rust panic into a one-line error: pyo3's
``PanicException`` derives from ``BaseException``, not ``Exception``, and lives in a module
(``pyo3_runtime``) that cannot be imported, so ``is_panic`` tells it by name.
"""
from __future__ import annotations

import json
import re

from ..errors import UsageError

#: tokenizer.json files above this are refused (a 500,000-word vocabulary is about 15 MB)
MAX_TOKENIZER_BYTES = 64 << 20
#: vocabulary entries at most (also bounded by the model's embedding rows)
MAX_VOCAB = 2_000_000
#: added tokens at most
MAX_ADDED_TOKENS = 1000
#: longest regex of the single-character-class form (a Unicode repertoire class is ~15 KB)
MAX_CLASS_REGEX_CHARS = 1 << 16

_NORMALIZERS = {"Sequence", "NFKC", "NFC", "NFD", "NFKD", "Lowercase", "Strip", "StripAccents", "Replace",
                "Prepend"}
_PRE_TOKENIZERS = {"Sequence", "Whitespace", "WhitespaceSplit", "Punctuation", "Digits", "Split"}
_SPLIT_BEHAVIOURS = {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"}
#: a regex made of one bracketed class of code points (``\x{HEX}``) and ranges, e.g. the
#: repertoire class of a normalizer that maps unassigned code points to U+FFFD
_CLASS_ONLY = re.compile(r"\[\^?(?:\\x\{[0-9A-Fa-f]{1,6}\}(?:-\\x\{[0-9A-Fa-f]{1,6}\})?)+\]")


def _project():
    """The project's own special tokens and regexes (one home: ``tokenizer.py``)."""
    from . import tokenizer as T

    specials = getattr(T, "SPECIAL_TOKENS", ((T.PAD_TOKEN, T.UNK_TOKEN),))
    patterns = frozenset(getattr(T, "SPLIT_PATTERNS", ()))
    return specials, patterns


def is_panic(e: BaseException) -> bool:
    """True for a Rust panic surfaced by pyo3 (``pyo3_runtime.PanicException``)."""
    t = type(e)
    return t.__name__ == "PanicException" and t.__module__ == "pyo3_runtime"


def _no_duplicates(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        keys = [k for k, _ in pairs]
        dup = next(k for k in keys if keys.count(k) > 1)
        raise UsageError(f"tokenizer.json names {dup[:40]!r} twice in one object; each key must appear once")
    return d


def _regex_allowed(value: str, patterns) -> bool:
    if value in patterns:
        return True
    return len(value) <= MAX_CLASS_REGEX_CHARS and _CLASS_ONLY.fullmatch(value) is not None


def _walk(node, allowed, kind, patterns, depth=0):
    if node is None:
        return
    if depth > 8:
        raise UsageError(f"tokenizer {kind} nests deeper than 8 levels")
    if not isinstance(node, dict):
        raise UsageError(f"tokenizer {kind} must be an object or null")
    t = node.get("type")
    if t not in allowed:
        raise UsageError(f"tokenizer {kind} type {t!r} is not allowed; allowed: {', '.join(sorted(allowed))}")
    if t == "Sequence":
        children = node.get("normalizers" if kind == "normalizer" else "pretokenizers")
        if not isinstance(children, list) or len(children) > 16:
            raise UsageError(f"tokenizer {kind} Sequence must list at most 16 steps")
        for c in children:
            _walk(c, allowed, kind, patterns, depth + 1)
    if "pattern" in node or t in ("Split", "Replace"):
        pat = node.get("pattern")
        if not isinstance(pat, dict) or len(pat) != 1:
            raise UsageError(f"tokenizer {kind} {t}: pattern must be {{'String': ...}} or {{'Regex': ...}}")
        (ptype, value), = pat.items()
        if ptype not in ("String", "Regex") or not isinstance(value, str):
            raise UsageError(f"tokenizer {kind} {t}: pattern kind {ptype!r} is not allowed")
        if ptype == "String" and len(value) > 256:
            raise UsageError(f"tokenizer {kind} {t}: a string pattern of {len(value)} characters; at most 256")
        if ptype == "Regex" and not _regex_allowed(value, patterns):
            raise UsageError(f"tokenizer {kind} {t}: regex {value[:60]!r} is not one of probattn's patterns "
                             "(an arbitrary regex can backtrack for minutes or panic); allowed: the project's "
                             "split patterns or a single character class")
    if t == "Split" and node.get("behavior") not in _SPLIT_BEHAVIOURS:
        raise UsageError(f"tokenizer Split behavior {node.get('behavior')!r} is not allowed")
    if t in ("Replace", "Prepend"):
        content = node.get("content", node.get("prepend", ""))
        if not isinstance(content, str) or len(content) > 16:
            raise UsageError(f"tokenizer {kind} {t}: content must be a string of at most 16 characters")


def _post_processor(post, vocab):
    """None, or a TemplateProcessing that puts vocabulary tokens (same ids) before the text."""
    if post is None:
        return None
    if not isinstance(post, dict) or post.get("type") != "TemplateProcessing":
        what = post.get("type") if isinstance(post, dict) else type(post).__name__
        raise UsageError(f"tokenizer post_processor {what!r} is not allowed; allowed: none, or a template that "
                         "prepends special tokens of the vocabulary")
    single = post.get("single")
    specials = post.get("special_tokens") or {}
    if not isinstance(single, list) or not isinstance(specials, dict) or not single:
        raise UsageError("tokenizer post_processor template is malformed")
    for i, piece in enumerate(single):
        if not isinstance(piece, dict) or len(piece) != 1:
            raise UsageError("tokenizer post_processor template is malformed")
        (kind, val), = piece.items()
        last = i == len(single) - 1
        if kind == "Sequence" and last and isinstance(val, dict) and val.get("id") == "A":
            continue
        if kind == "SpecialToken" and not last and isinstance(val, dict) and val.get("id") in specials:
            spec = specials[val["id"]]
            ids = spec.get("ids") if isinstance(spec, dict) else None
            tokens = spec.get("tokens") if isinstance(spec, dict) else None
            if isinstance(ids, list) and isinstance(tokens, list) and len(ids) == len(tokens) and ids and \
                    all(vocab.get(t) == j for t, j in zip(tokens, ids)):
                continue
        raise UsageError("tokenizer post_processor may only put special tokens of the vocabulary (same ids) "
                         "before the text")
    return post


def sanitize(data, *, max_length: int | None, vocab_size: int | None = None, what: str = "tokenizer.json"):
    """``(canonical JSON str, notes)`` for tokenizer bytes ``data``; UsageError if refused.
    ``max_length``: force truncation to it (None: keep the file's, if it is sane)."""
    spec, notes = sanitize_spec(data, max_length=max_length, vocab_size=vocab_size, what=what)
    return canonical_json(spec), notes


def canonical_json(spec: dict) -> str:
    """The text ``tokenizers`` loads for a spec of ``sanitize_spec``."""
    return json.dumps(spec, ensure_ascii=False)


def sanitize_spec(data, *, max_length: int | None, vocab_size: int | None = None, what: str = "tokenizer.json"):
    """``(spec dict, notes)``: ``sanitize`` without the JSON text (the fast text path reads
    the dict; ``tokenizers`` is loaded from ``canonical_json(spec)`` only when needed)."""
    from .tokenizer import MAX_LENGTH_LIMIT

    if isinstance(data, str):
        data = data.encode("utf-8")
    if len(data) > MAX_TOKENIZER_BYTES:
        raise UsageError(f"{what} is {len(data):,} bytes; at most {MAX_TOKENIZER_BYTES:,} allowed")
    try:
        cfg = json.loads(data, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:
        raise UsageError(f"{what} is not a valid tokenizer.json (not JSON: {type(e).__name__})") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"{what} is not a valid tokenizer.json (expected a JSON object)")
    notes = []
    specials, patterns = _project()

    model = cfg.get("model")
    if not isinstance(model, dict) or model.get("type") != "WordLevel":
        got = model.get("type") if isinstance(model, dict) else model
        raise UsageError(f"{what}: tokenizer model {got!r} is not allowed; allowed: WordLevel")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise UsageError(f"{what}: the WordLevel vocab must be a non-empty object")
    limit = min(MAX_VOCAB, vocab_size) if vocab_size else MAX_VOCAB
    if len(vocab) > limit:
        why = "the model's embedding has" if vocab_size and vocab_size < MAX_VOCAB else "at most"
        raise UsageError(f"{what}: the vocabulary holds {len(vocab):,} tokens; {why} {limit:,} allowed")
    ids = list(vocab.values())
    if set(map(type, ids)) != {int} or sorted(ids) != list(range(len(ids))):
        raise UsageError(f"{what}: vocabulary ids must be exactly 0..{len(ids) - 1}, each once")
    tokens = list(vocab)
    pair = (tokens[ids.index(0)], tokens[ids.index(1)] if len(ids) > 1 else None)
    if pair not in [tuple(p) for p in specials]:
        allowed = " or ".join(f"{p}=0 and {u}=1" for p, u in specials)
        raise UsageError(f"{what}: expected {allowed}; found {pair[0]!r}=0 and {pair[1]!r}=1")
    if model.get("unk_token") != pair[1]:
        raise UsageError(f"{what}: unk_token must be {pair[1]!r}; found {model.get('unk_token')!r}")

    added = cfg.get("added_tokens") or []
    if not isinstance(added, list) or len(added) > MAX_ADDED_TOKENS:
        raise UsageError(f"{what}: added_tokens must be a list of at most {MAX_ADDED_TOKENS} entries")
    for a in added:
        if not isinstance(a, dict) or not isinstance(a.get("content"), str) or vocab.get(a["content"]) != a.get("id"):
            c = a.get("content") if isinstance(a, dict) else a
            raise UsageError(f"{what}: added token {str(c)[:40]!r} is not in the vocabulary with the same id "
                             f"(tokenizers would give it id {len(vocab)}, past the vocabulary)")

    _walk(cfg.get("normalizer"), _NORMALIZERS, "normalizer", patterns)
    _walk(cfg.get("pre_tokenizer"), _PRE_TOKENIZERS, "pre_tokenizer", patterns)
    post = _post_processor(cfg.get("post_processor"), vocab)

    if cfg.get("padding") is not None:
        notes.append(f"padding in {what} was turned off (it was {json.dumps(cfg['padding'])[:100]}); "
                     "probattn pads texts itself")
    trunc = cfg.get("truncation")
    if max_length is None:  # keep the file's own, if it is a plain one
        file_max = trunc.get("max_length") if isinstance(trunc, dict) else None
        if trunc is not None and not (type(file_max) is int and 1 <= file_max <= MAX_LENGTH_LIMIT):
            raise UsageError(f"{what}: truncation max_length {file_max!r} is out of range; allowed: 1 to "
                             f"{MAX_LENGTH_LIMIT:,}")
        max_length = file_max
    elif not (type(max_length) is int and 1 <= max_length <= MAX_LENGTH_LIMIT):
        raise UsageError(f"max length {max_length!r} is out of range; allowed: 1 to {MAX_LENGTH_LIMIT:,}")
    wanted = None if max_length is None else {"direction": "Right", "max_length": max_length,
                                              "strategy": "LongestFirst", "stride": 0}
    if trunc != wanted:
        notes.append(f"truncation in {what} set to {max_length} tokens (it was {json.dumps(trunc)[:100]})")
    out = {
        "version": "1.0",
        "truncation": wanted,
        "padding": None,
        "added_tokens": added,
        "normalizer": cfg.get("normalizer"),
        "pre_tokenizer": cfg.get("pre_tokenizer"),
        "post_processor": post,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": pair[1]},
    }
    return out, notes


def from_sanitized(text: str, what: str = "tokenizer.json"):
    """A ``tokenizers.Tokenizer`` from ``sanitize``'s output; a panic or an error is one line."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(text)
    except Exception as e:  # the Rust side reports parse errors as plain Exception
        raise UsageError(f"{what} is not a valid tokenizer.json ({' '.join(str(e).split())[:160]})") from None
    except BaseException as e:
        if is_panic(e):
            raise UsageError(f"{what}: tokenizers panicked loading it ({' '.join(str(e).split())[:160]})") from None
        raise
