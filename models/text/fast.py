"""The fast text path: pure-Python twins of probattn's tokenizers (standard library only:
``re``, ``unicodedata``, a dict).

``FastTokenizer.from_spec`` gives the ids of Hugging Face ``tokenizers`` for a
``tokenizer.json`` that is exactly one of the kinds ``probattn train`` makes
(``probattn.models.text.tokenizer.kind_of``) and refuses any other file (``NotPortable``):
callers then use ``tokenizers``. Measured 3 to 10 times faster than ``tokenizers`` on real
texts (``scripts/bench_tokenizers.py``), because a word-level vocabulary needs no more
than one regex scan and one dict lookup per token.

* ``portable``: every text (below).
* ``regex`` / ``regex-start``: every text. No normaliser; words are the runs of
  ``[0-9A-Za-z_']`` (the complement of the delimiter class, the same in every engine),
  looked up case-sensitively; ``<START>`` first for ``regex-start``, and truncation keeps
  room for it, as ``tokenizers`` does.
* ``wordlevel`` (the earlier default): ASCII texts only. Its ``Whitespace`` pre-tokenizer
  is ``\\w+|[^\\w\\s]+`` in Oniguruma, whose ``\\w`` and ``\\s`` differ from Python's
  outside ASCII, and NFKC/lowercase differ between Rust's and Python's Unicode tables:
  there is no exact twin for non-ASCII text, so every non-ASCII text goes to the
  ``fallback`` (``tokenizers``), or ``NotPortable`` is raised without one. ``[PAD]`` and
  ``[UNK]`` are added tokens there, matched in the raw text first, as ``tokenizers`` does.

The portable kind in detail:

* normalize: code points outside the repertoire (read from the file's Replace pattern)
  -> U+FFFD, NFKC, ``str.lower()``, ς -> σ. ``str.lower()`` applies the final-sigma rule
  and Rust's ``Lowercase`` does not; both then map ς to σ, so they agree.
* pre-tokenize: the Split pattern's General_Category classes expanded into code-point
  ranges from this Python's ``unicodedata`` (Python's ``re`` has no ``\\p{..}``).
* ids: dict lookup, unknown -> ``[UNK]``; truncation: the first ``max_length`` ids.

ASCII texts need no Unicode table (ASCII is the same in every Unicode version). For the
first non-ASCII text the tables are built (about 0.3 s, once per process) and this Python
must know every code point the repertoire keeps: a ``tokenizer.json`` built on a Python
with a newer Unicode database keeps characters this one calls unassigned. Then non-ASCII
texts go to the ``fallback`` (``tokenizers``) instead, or ``NotPortable`` is raised.
Lone surrogates (possible in Python strings, refused by Rust) become U+FFFD, as in
JavaScript.
"""
from __future__ import annotations

import functools
import itertools
import json
import re
import unicodedata
from itertools import islice, repeat
from pathlib import Path

import numpy as np

from .tokenizer import (FINAL_SIGMA, KIND_PORTABLE, KIND_REGEX, KIND_REGEX_START, KIND_WORDLEVEL, REGEX_START,
                        REPLACEMENT_CHAR, SIGMA, UNK_TOKEN, kind_of, parse_outside_pattern, portable_problem,
                        regex_spec, wordlevel_problem)

#: the Split pattern's classes as General_Category names (a one-letter name is the group)
WORD_START = ("L", "N", "Pc")
PUNCT_START = ("Pd", "Ps", "Pe", "Pi", "Pf", "Po", "S")
MARK = ("M",)
#: texts longer than this many characters per kept token stop scanning after
#: ``max_length`` tokens (the first N matches do not depend on the rest of the text)
LONG_TEXT_CHARS_PER_TOKEN = 8


class NotPortable(ValueError):
    """The tokenizer is not one this module reproduces exactly."""


def _ranges_of(runs, cats) -> list:
    merged = []
    for a, b, c in runs:
        if c in cats or c[0] in cats:
            if merged and merged[-1][1] == a - 1:
                merged[-1][1] = b
            else:
                merged.append([a, b])
    return merged


def _body(ranges) -> str:
    esc = lambda cp: f"\\U{cp:08x}"  # noqa: E731
    return "".join(esc(a) if a == b else f"{esc(a)}-{esc(b)}" for a, b in ranges)


def _alt(ranges) -> str:
    """A fast regex for a set of code-point ranges. Python's ``re`` turns the BMP part of a
    class into a constant-time bitmap but tests astral ranges one by one, so a miss would
    scan hundreds of ranges: the astral part is tested only behind a one-range lookahead."""
    bmp = [(a, min(b, 0xFFFF)) for a, b in ranges if a <= 0xFFFF]
    astral = [(max(a, 0x10000), b) for a, b in ranges if b > 0xFFFF]
    parts = []
    if bmp:
        parts.append(f"[{_body(bmp)}]")
    if astral:
        parts.append(f"(?=[\\U00010000-\\U0010ffff])[{_body(astral)}]")
    return "(?:" + "|".join(parts) + ")" if parts else "(?!)"


def _pattern(runs):
    w = _alt(_ranges_of(runs, WORD_START))
    wm = _alt(_ranges_of(runs, WORD_START + MARK))
    p = _alt(_ranges_of(runs, PUNCT_START))
    pm = _alt(_ranges_of(runs, PUNCT_START + MARK))
    m = _alt(_ranges_of(runs, MARK))
    return re.compile(f"{w}{wm}*|{p}{pm}*|{m}+")


def _runs(first: int, last: int) -> list:
    """``[(first, last, category)]`` over a code-point range."""
    runs, cp = [], first
    for cat, group in itertools.groupby(map(unicodedata.category, map(chr, range(first, last + 1)))):
        n = sum(1 for _ in group)
        runs.append((cp, cp + n - 1, cat))
        cp += n
    return runs


_ASCII_PATTERN = _pattern(_runs(0, 0x7F))

#: Batches are tokenized as one string: texts joined by ``SEPARATOR``, which no pattern of
#: these tokenizers matches (a control character), scanned once by the pattern plus
#: ``|SEPARATOR``, so every separator is a token of its own and marks where a text ends.
#: A text holding the separator itself goes the per-text way.
SEPARATOR = "\n"
_SEP_ID = -1


def _joined(pattern):
    return re.compile(pattern.pattern + "|" + re.escape(SEPARATOR))


def _ascii_bodies():
    """The ASCII word and punctuation classes of ``_ASCII_PATTERN`` as regex class bodies.
    ASCII has no combining marks, so ``w wm*`` is ``[w]+`` and ``p pm*`` is ``[p]+``."""
    runs = _runs(0, 0x7F)
    assert not _ranges_of(runs, MARK)
    return _body(_ranges_of(runs, WORD_START)), _body(_ranges_of(runs, PUNCT_START))


_ASCII_BODIES = _ascii_bodies()
#: ``_ASCII_PATTERN`` written as two plain classes (the same matches, 20% faster in ``re``)
_ASCII_SIMPLE = re.compile("[" + _ASCII_BODIES[0] + "]+|[" + _ASCII_BODIES[1] + "]+")
_ASCII_JOINED = _joined(_ASCII_SIMPLE)


def _bulk_ids(joined: str, pattern, vocab_sep: dict, unk_id: int, n: int):
    """``(ids, counts)`` of ``n`` texts joined by ``SEPARATOR``: every text's ids in order
    and how many each text has; one regex scan and one dict lookup per token for the whole
    batch. None if the separators do not come out as exactly ``n - 1`` tokens (then the
    caller goes text by text)."""
    ids = np.fromiter(map(vocab_sep.get, pattern.findall(joined), repeat(unk_id)), np.int32)
    sep = ids == _SEP_ID
    if int(np.count_nonzero(sep)) != n - 1:
        return None
    keep = ~sep
    return ids[keep], np.bincount(np.cumsum(sep)[keep], minlength=n)


# ------------------------------------------------------------------ the NumPy scanner
#: multiplier of the scanner's hash (2^64 / golden ratio, odd)
_MIX = np.uint64(0x9E3779B97F4A7C15)
#: ``_LOW[k]``: the low ``k`` bytes of a uint64 set
_LOW = np.array([(1 << (8 * k)) - 1 for k in range(9)], np.uint64)
#: token bytes the scanner looks up itself; longer tokens (rare: a word of 65 letters) are
#: looked up in the dict one by one
SCAN_TOKEN_BYTES = 64
#: a byte's class in ``_Scanner.classes``: delimiter, the text separator, tokens 1..
_DELIMITER, _SEP_CLASS = 0, 255


def _words8(data: np.ndarray) -> np.ndarray:
    """uint64 ``w`` with ``w[i]`` = bytes ``data[i:i + 8]`` little-endian (zeros past the end):
    a view with a stride of one byte over a zero-padded copy."""
    padded = np.zeros(len(data) + 8, np.uint8)
    padded[:len(data)] = data
    return np.ndarray((len(data) + 1,), dtype="<u8", buffer=padded, strides=(1,))


def _keys(words, starts, lengths) -> np.ndarray:
    """One uint64 key per span ``[start, start + length)`` of ``words``' bytes (length 1 to
    ``SCAN_TOKEN_BYTES``): up to 8 bytes, the bytes themselves (distinct spans of the same
    length, distinct keys); longer, their 8-byte chunks mixed with the length (equal keys
    are checked byte by byte: ``_Scanner._same``)."""
    keys = words[starts] & _LOW[np.minimum(lengths, 8)]
    at = np.flatnonzero(lengths > 8)
    if len(at):
        offset = 8
        keys[at] = keys[at] * _MIX ^ lengths[at].astype(np.uint64)
        while len(at):
            left = lengths[at] - offset
            keys[at] = (keys[at] ^ (words[starts[at] + offset] & _LOW[np.minimum(left, 8)])) * _MIX
            at = at[left > 8]
            offset += 8
    return keys


class _Scanner:
    """The regex scan and dict lookup of ``_bulk_ids`` done by NumPy over a window's texts
    joined by ``SEPARATOR``, with the same ids (``tests/test_fast_path.py``), for patterns
    whose tokens are maximal runs of one character class.

    Two encodings: ``unit`` 1, UTF-8 bytes classed by a 256-byte ``bytes.translate`` table
    (ASCII classes; every byte of a non-ASCII character a delimiter); ``unit`` 4, UTF-32
    code points classed by a table of every code point, where a combining mark joins the
    word or punctuation run before it, else runs with other marks (``_mark_runs``).

    Tokens are looked up in an open-addressing table of the vocabulary's keys (``_keys``,
    over the encoded bytes); a found entry counts only when its length, and for tokens over
    8 bytes every byte, are the token's: no hash collision, however a text is made, can give
    a wrong id. Vocabulary entries no scan can produce (a delimiter inside, two classes) are
    left out; if two entries it keeps share a key, ``build`` returns None and the regex path
    is used."""

    def __init__(self, classes, unit, vocab, slot_keys, slot_entries, probes, ids, lengths, starts, words):
        self.classes, self.unit, self.vocab, self.probes = classes, unit, vocab, probes
        self.encoding = "utf-8" if unit == 1 else "utf-32-le"
        #: the table: each slot's key and entry (-1: empty)
        self.slot_keys, self.slot_entries = slot_keys, slot_entries
        self.mask = len(slot_keys) - 1
        self.shift = np.uint64(64 - (len(slot_keys).bit_length() - 1))
        #: per entry: its id, its length in bytes and where its bytes are in ``words``
        self.ids, self.lengths, self.starts, self.words = ids, lengths, starts, words

    @classmethod
    def build(cls, vocab: dict, classes, unit: int = 1):
        encoding = "utf-8" if unit == 1 else "utf-32-le"
        tokens = [t for t in vocab if t]
        raw = [t.encode(encoding, "surrogatepass") for t in tokens]
        lengths = np.fromiter(map(len, raw), np.int64, len(raw))
        sep = SEPARATOR.encode(encoding)
        data = sep.join(raw) + sep  # each entry classed alone: a mark at its start joins nothing
        starts = np.cumsum(lengths + len(sep)) - lengths - len(sep)
        keep = np.zeros(0, np.int64)
        if len(raw):  # producible: one token class throughout, and short enough to scan
            c = cls._classify(classes, unit, data)
            spans = np.empty(2 * len(raw), np.int64)  # each entry's span, then the separator after it
            spans[0::2], spans[1::2] = starts // unit, (starts + lengths) // unit
            lo, hi = np.minimum.reduceat(c, spans)[0::2], np.maximum.reduceat(c, spans)[0::2]
            keep = np.flatnonzero((lo == hi) & (lo != _DELIMITER) & (lo != _SEP_CLASS) & (lengths <= SCAN_TOKEN_BYTES))
        words = _words8(np.frombuffer(data, np.uint8))
        keys = _keys(words, starts[keep], lengths[keep])
        if len(np.unique(keys)) != len(keys):
            return None
        size = 1 << max(10, (4 * len(keys)).bit_length())
        slot_keys, slot_entries = np.zeros(size, np.uint64), np.full(size, -1, np.int32)
        slot = ((keys * _MIX) >> np.uint64(64 - (size.bit_length() - 1))).astype(np.int64)
        pending, probes = np.arange(len(keys)), 0
        while len(pending):  # linear probing: each free slot taken by the first entry that wants it
            s = slot[pending]
            free = np.flatnonzero(slot_entries[s] < 0)
            placed = free[np.unique(s[free], return_index=True)[1]]
            slot_entries[s[placed]] = pending[placed]
            slot_keys[s[placed]] = keys[pending[placed]]
            left = np.ones(len(pending), bool)
            left[placed] = False
            pending = pending[left]
            slot[pending] = (slot[pending] + 1) & (size - 1)
            probes += bool(len(pending))
        ids = np.fromiter((vocab[tokens[i]] for i in keep), np.int32, len(keep))
        return cls(classes, unit, vocab, slot_keys, slot_entries, probes, ids, lengths[keep], starts[keep], words)

    @staticmethod
    def _classify(classes, unit: int, data: bytes) -> np.ndarray:
        """Each character's class (uint8): a token is a maximal run of one class."""
        if unit == 1:
            return np.frombuffer(data.translate(classes), np.uint8)
        return _mark_runs(classes[np.frombuffer(data, "<u4")])

    def scan(self, data: bytes, n: int, unk_id: int):
        """``(ids, counts)`` for ``n`` texts joined by ``SEPARATOR`` and encoded (``unit``),
        as ``_bulk_ids``; None when the separators are not ``n - 1``."""
        c = self._classify(self.classes, self.unit, data)
        sep = c == _SEP_CLASS
        if int(np.count_nonzero(sep)) != n - 1:
            return None
        edge = np.ones(len(c) + 1, bool)
        np.not_equal(c[1:], c[:-1], out=edge[1:-1])
        token = (c != _DELIMITER) & ~sep
        starts = np.flatnonzero(edge[:-1] & token)
        ends = np.flatnonzero(edge[1:] & token) + 1
        counts = np.bincount(np.cumsum(sep)[starts], minlength=n)
        u = self.unit
        ids = self.lookup(data, _words8(np.frombuffer(data, np.uint8)), starts * u, (ends - starts) * u, unk_id)
        return ids, counts

    def lookup(self, data: bytes, words, starts, lengths, unk_id: int) -> np.ndarray:
        """The id of each span ``[start, start + length)`` of ``data``'s bytes (``words``:
        its ``_words8``), ``unk_id`` for a span not in the vocabulary."""
        if len(starts) and int(lengths.max()) > SCAN_TOKEN_BYTES:
            ids = np.full(len(starts), unk_id, np.int32)
            short = np.flatnonzero(lengths <= SCAN_TOKEN_BYTES)
            for i in np.flatnonzero(lengths > SCAN_TOKEN_BYTES).tolist():  # rare: one by one
                s = int(starts[i])
                ids[i] = self.vocab.get(data[s:s + int(lengths[i])].decode(self.encoding, "surrogatepass"), unk_id)
            ids[short] = self.lookup(data, words, starts[short], lengths[short], unk_id)
            return ids
        if not len(self.ids):  # no entry a scan can produce
            return np.full(len(starts), unk_id, np.int32)
        keys = _keys(words, starts, lengths)
        slot = ((keys * _MIX) >> self.shift).astype(np.int64)
        entry = self.slot_entries[slot]
        found = (self.slot_keys[slot] == keys) & (entry >= 0)
        go = np.flatnonzero(~found & (entry >= 0))  # the slot holds another key: probe on
        for _ in range(self.probes):
            if not len(go):
                break
            slot[go] = (slot[go] + 1) & self.mask
            e = self.slot_entries[slot[go]]
            hit = (self.slot_keys[slot[go]] == keys[go]) & (e >= 0)
            entry[go[hit]] = e[hit]
            found[go[hit]] = True
            go = go[~hit & (e >= 0)]
        found &= self.lengths[entry] == lengths
        long = np.flatnonzero(found & (lengths > 8))
        if len(long):
            found[long] = self._same(words, starts[long], entry[long])
        return np.where(found, self.ids[entry], np.int32(unk_id))

    def _same(self, words, starts, entries) -> np.ndarray:
        """Whether each span of the text equals its vocabulary entry, 8 bytes at a time."""
        same = np.ones(len(starts), bool)
        lengths, vstarts = self.lengths[entries], self.starts[entries]
        for offset in range(0, SCAN_TOKEN_BYTES, 8):
            at = np.flatnonzero(lengths > offset)
            if not len(at):
                break
            low = _LOW[np.minimum(lengths[at] - offset, 8)]
            same[at] &= (words[starts[at] + offset] & low) == (self.words[vstarts[at] + offset] & low)
        return same


#: a code point's class in the portable kind's table: a combining mark (before ``_mark_runs``)
_MARK_CLASS = 3


def _mark_runs(c: np.ndarray) -> np.ndarray:
    """Classes of the portable Split pattern ``w[wm]*|p[pm]*|m+``: a mark takes the class of
    the last non-mark before it when that is a word (1) or punctuation (2) character; other
    marks keep the mark class, so consecutive ones make a run of their own."""
    mark = c == _MARK_CLASS
    if not mark.any():
        return c
    last = np.where(mark, -1, np.arange(len(c)))
    np.maximum.accumulate(last, out=last)
    before = np.where(last >= 0, c[np.maximum(last, 0)], _DELIMITER)
    joins = mark & ((before == 1) | (before == 2))
    return np.where(joins, before, c).astype(np.uint8)


@functools.lru_cache(maxsize=1)
def _codepoint_classes() -> np.ndarray:
    """uint8 class of every code point for the portable kind's ``_Scanner`` (unit 4): 1 word
    start, 2 punctuation start, ``_MARK_CLASS`` mark, 0 anything else, the separator its own;
    from this Python's ``unicodedata``, as the regex of ``_unicode_tables``."""
    classes = np.zeros(0x110000, np.uint8)
    for a, b, cat in _all_runs():
        if cat in WORD_START or cat[0] in WORD_START:
            classes[a:b + 1] = 1
        elif cat in PUNCT_START or cat[0] in PUNCT_START:
            classes[a:b + 1] = 2
        elif cat in MARK or cat[0] in MARK:
            classes[a:b + 1] = _MARK_CLASS
    classes[ord(SEPARATOR)] = _SEP_CLASS
    return classes


def padded_matrix(n: int, max_length: int | None, bulk=None, rows=None, prefix_id: int | None = None,
                  keep: int | None = None) -> np.ndarray:
    """``int32 [n, longest]`` right-padded with 0 and cut at ``max_length``: what
    ``tokenizer.pad_rows`` makes of the same ids. ``bulk``: ``(positions, ids, counts)``,
    the ids of the texts at ``positions``, text after text, and how many each has
    (``_bulk_ids``; each text's tokens cut at ``keep`` and put after ``prefix_id`` when
    given); ``rows``: ``{position: id list}`` for the others."""
    pre = 0 if prefix_id is None else 1
    width = 1
    if bulk is not None:
        pos, ids, counts = bulk
        longest = int(counts.max()) if len(counts) else 0
        if keep is not None:
            longest = min(longest, keep)
        width = max(width, longest + pre)
    for r in (rows or {}).values():
        width = max(width, len(r))
    if max_length is not None:
        width = min(width, max(1, int(max_length)))
    out = np.zeros((n, width), np.int32)
    if bulk is not None and len(pos):
        if pre:
            out[pos, 0] = prefix_id
        span = min(width - pre, longest)
        if span > 0 and len(ids):
            text = np.repeat(np.arange(len(counts)), counts)
            rank = np.arange(len(ids)) - np.repeat(np.cumsum(counts) - counts, counts)
            if span < longest or int(counts.max()) > span:
                sel = np.flatnonzero(rank < span)
                text, rank, ids = text[sel], rank[sel], ids[sel]
            out[pos[text], rank + pre] = ids
    for i, r in (rows or {}).items():
        r = r[:width]
        out[i, :len(r)] = r
    return out


@functools.lru_cache(maxsize=1)
def _all_runs() -> list:
    return _runs(0, 0x10FFFF)


@functools.lru_cache(maxsize=1)
def _unicode_tables():
    """(runs of unassigned and surrogate code points, the full pattern): built once."""
    runs = _all_runs()
    unknown = [(a, b) for a, b, c in runs if c in ("Cn", "Cs")]
    return unknown, _pattern(runs)


def _uncovered(unknown, outside):
    """The first run of ``unknown`` not inside the ``outside`` ranges, or None."""
    covered, j = sorted(outside), 0
    for a, b in unknown:
        while j < len(covered) and covered[j][1] < a:
            j += 1
        # a run may span adjacent outside ranges: walk them
        k, reach = j, a - 1
        while k < len(covered) and covered[k][0] <= reach + 1 and reach < b:
            reach = max(reach, covered[k][1])
            k += 1
        if reach < b:
            return a, b
    return None


class _Bulk:
    """``encode_padded``: ``pad_rows(self.encode_batch(texts), max_length)``, faster: the
    texts ``_bulk_eligible`` accepts are scanned as one string (``SEPARATOR``) by NumPy
    (``_Scanner``; the regex of ``_bulk_ids`` when the vocabulary does not allow it), the
    others go text by text."""

    _scanner = False  # not built yet

    def encode_padded(self, texts, max_length: int | None = None) -> np.ndarray:
        texts = texts if isinstance(texts, list) else list(texts)
        return self.encode_plan(texts, [range(len(texts))], max_length)[0]

    def encode_plan(self, texts, plan, max_length: int | None = None) -> list:
        """``[encode_padded([texts[i] for i in rows], max_length) for rows in plan]``, with
        the texts scanned together once (a batch of a few dozen texts is too small for
        NumPy to pay)."""
        texts = texts if isinstance(texts, list) else list(texts)
        bulk = self._bulk(texts)
        index, rows = None, {}
        if bulk is not None:
            scanned, ids, counts, first = bulk
            index = np.full(len(texts), -1, np.int64)
            index[scanned] = np.arange(len(scanned))
            others = np.flatnonzero(index < 0).tolist()
        else:
            others = list(range(len(texts)))
        if others:
            rows = dict(zip(others, self.encode_batch([texts[i] for i in others])))
        out = []
        for batch in plan:
            batch = np.asarray(batch, np.int64)
            here = {j: rows[i] for j, i in enumerate(batch.tolist()) if i in rows} if rows else None
            part = None
            if index is not None:
                local = np.flatnonzero(index[batch] >= 0)
                k = index[batch[local]]
                c = counts[k]
                take = np.repeat(first[k] - (np.cumsum(c) - c), c) + np.arange(int(c.sum()))
                part = (local, ids[take], c)
            out.append(padded_matrix(len(batch), max_length, part, here, prefix_id=self._bulk_prefix,
                                     keep=self._bulk_keep()))
        return out

    def _bulk(self, texts):
        """``(positions, ids, counts, first)`` of the texts that can be scanned together:
        ``ids`` holds each one's ids (``counts`` of them, from ``first``); None when none
        can. Texts ``_bulk_eligible`` accepts are scanned as one string of bytes, then
        ``_bulk_more`` may scan others (the portable kind: non-ASCII texts as code points)."""
        joined = SEPARATOR.join(texts)
        if joined.isascii() and joined.count(SEPARATOR) == len(texts) - 1:  # every text is eligible
            eligible, rest = list(range(len(texts))), []
        else:
            flags = list(map(self._bulk_eligible, texts))
            eligible = [i for i, f in enumerate(flags) if f]
            rest = [i for i, f in enumerate(flags) if not f]
            if 1 < len(eligible) < len(texts):
                joined = SEPARATOR.join([texts[i] for i in eligible])
        parts = []
        if len(eligible) > 1:
            got = self._scan_bytes(joined, len(eligible))
            if got is None:
                rest = list(range(len(texts)))
            else:
                parts.append((eligible, *got))
        else:
            rest = sorted(rest + eligible)
        more = self._bulk_more(texts, rest) if rest else None
        if more is not None:
            parts.append(more)
        if not parts:
            return None
        first, offset = [], 0
        for _, ids, counts in parts:
            first.append(np.cumsum(counts) - counts + offset)
            offset += len(ids)
        return (np.concatenate([np.asarray(p[0], np.int64) for p in parts]), np.concatenate([p[1] for p in parts]),
                np.concatenate([p[2] for p in parts]), np.concatenate(first))

    def _scan_bytes(self, joined: str, n: int):
        """``(ids, counts)`` of ``n`` eligible texts joined: the ``_Scanner``, or the regex of
        ``_bulk_ids`` when the vocabulary does not allow it; None if the separators are off."""
        if self._bulk_lower:
            joined = joined.lower()
        if self._scanner is False:
            self._scanner = _Scanner.build(self.vocab, self._bulk_classes())
        if self._scanner is not None:
            return self._scanner.scan(joined.encode("utf-8", "surrogatepass"), n, self.unk_id)
        if getattr(self, "_sep_vocab", None) is None:
            self._sep_vocab = dict(self.vocab)
            self._sep_vocab[SEPARATOR] = _SEP_ID
        return _bulk_ids(joined, self._bulk_pattern, self._sep_vocab, self.unk_id, n)

    def _bulk_more(self, texts, positions):
        """``(positions, ids, counts)`` for some of the texts at ``positions`` that the byte
        scan left, or None (they go text by text)."""
        return None


def _byte_classes(word: str, punct: str = "") -> bytes:
    """``_Scanner.classes`` (a ``bytes.translate`` table) for ASCII classes given as regex
    class bodies: 1 word, 2 punctuation, every other byte (non-ASCII UTF-8 bytes included)
    a delimiter, the separator its own class."""
    classes = bytearray([_DELIMITER]) * 256
    for value, body in ((1, word), (2, punct)):
        if body:
            pattern = re.compile(f"[{body}]")
            for b in range(128):
                if pattern.fullmatch(chr(b)):
                    classes[b] = value
    classes[ord(SEPARATOR)] = _SEP_CLASS
    return bytes(classes)


class FastTokenizer(_Bulk):
    """``encode(text) -> ids`` with the ids of ``tokenizers`` for the portable kind;
    ``from_spec`` returns the twin of whichever kind a file is."""

    kind = KIND_PORTABLE

    def __init__(self, vocab: dict, outside, unk_id: int, max_length: int | None = None,
                 fallback=None):
        self.vocab = vocab
        self.unk_id = unk_id
        self.max_length = max_length
        self.outside = [tuple(r) for r in outside]
        #: the lowest outside code point: a text below it has none to replace
        self._outside_from = min((a for a, _ in self.outside), default=0x110000)
        #: ``fallback(texts) -> [ids]`` for non-ASCII texts when this Python lacks part of
        #: the repertoire (None: raise NotPortable then)
        self.fallback = fallback
        self._long = LONG_TEXT_CHARS_PER_TOKEN * max_length if max_length else None
        self._checked = False
        self._unicode_ok = False
        self._problem = None

    @classmethod
    def from_spec(cls, spec: dict, fallback=None) -> "FastTokenizer":
        """The twin of ``spec``'s kind (``portable``, ``regex``, ``regex-start`` or
        ``wordlevel``); NotPortable for any other tokenizer."""
        if cls is FastTokenizer:
            kind = kind_of(spec)
            if kind in (KIND_REGEX, KIND_REGEX_START):
                return RegexFastTokenizer.from_spec(spec, fallback)
            if kind == KIND_WORDLEVEL:
                return WordLevelFastTokenizer.from_spec(spec, fallback)
        problem = portable_problem(spec)
        if problem:
            raise NotPortable(f"not a tokenizer probattn reproduces (portable: {problem}; regex: not "
                              f"MediaPipe's regex tokenizer; wordlevel: {wordlevel_problem(spec)})")
        outside = parse_outside_pattern(spec["normalizer"]["normalizers"][0]["pattern"]["Regex"])
        model = spec["model"]
        trunc = spec.get("truncation")
        return cls(model["vocab"], outside, model["vocab"][UNK_TOKEN],
                   trunc["max_length"] if trunc else None, fallback)

    @classmethod
    def from_file(cls, path, fallback=None) -> "FastTokenizer":
        return cls.from_spec(json.loads(Path(path).read_text(encoding="utf-8")), fallback)

    # -- the Unicode check, on the first non-ASCII text -------------------------------
    def unicode_problem(self) -> str | None:
        """None when this Python knows every code point the repertoire keeps."""
        if not self._checked:
            unknown, self._pattern = _unicode_tables()
            gap = _uncovered(unknown, self.outside)
            if gap:
                self._problem = (f"this Python's Unicode {unicodedata.unidata_version} does not know "
                                 f"U+{gap[0]:04X}..U+{gap[1]:04X}, which the tokenizer's repertoire keeps "
                                 "(it was built with a newer Unicode database)")
            self._checked, self._unicode_ok = True, gap is None
        return self._problem

    def _unicode(self) -> bool:
        if not self._checked:
            self.unicode_problem()
        return self._unicode_ok

    def needs_fallback(self) -> bool:
        """True when some texts go to the ``fallback`` (load it while it can be loaded)."""
        return self.unicode_problem() is not None

    # -- the stages, for checks --------------------------------------------------------
    def normalize(self, text: str) -> str:
        if text.isascii():
            return text.lower()
        if not self._unicode():
            raise NotPortable(self._problem)
        return self._normalized(text)

    def pre_tokenize(self, normalized: str) -> list:
        if normalized.isascii():
            return _ASCII_PATTERN.findall(normalized)
        if not self._unicode():
            raise NotPortable(self._problem)
        return self._pattern.findall(normalized)

    # -- encoding ----------------------------------------------------------------------
    def _ids(self, text: str, pattern) -> list:
        if self._long is not None and len(text) > self._long:
            tokens = [m.group() for m in islice(pattern.finditer(text), self.max_length)]
        else:
            tokens = pattern.findall(text)
        ids = list(map(self.vocab.get, tokens, repeat(self.unk_id)))
        return ids if self.max_length is None else ids[: self.max_length]

    def encode(self, text: str) -> list:
        if text.isascii():
            return self._ids(text.lower(), _ASCII_SIMPLE)
        if not self._unicode():
            if self.fallback is None:
                raise NotPortable(self._problem)
            return self.fallback([text])[0]
        return self._encode_unicode(text)

    def _normalized(self, text: str) -> str:
        """The normalizer (needs ``_unicode()``): outside -> U+FFFD, NFKC, lower, final
        sigma -> sigma. Each step maps a character, or a character and the marks after it,
        alone, so texts joined by ``SEPARATOR`` come out joined the same way (``_bulk_more``
        normalizes a window at once): the outside code points are replaced through a table
        of every code point (one NumPy gather, not a regex over each character; skipped
        when no character reaches the lowest outside code point) and NFKC runs only on the
        texts between separators that are not in NFKC already."""
        if self.outside and ord(max(text, default="\0")) >= self._outside_from:
            if getattr(self, "_outside_table", None) is None:
                table = np.zeros(0x110000, bool)
                for a, b in self.outside:
                    table[a:b + 1] = True
                self._outside_table = table
            cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), "<u4")
            hit = self._outside_table[cp]
            if hit.any():
                cp = cp.copy()
                cp[hit] = ord(REPLACEMENT_CHAR)
                text = cp.tobytes().decode("utf-32-le", "surrogatepass")
        if not unicodedata.is_normalized("NFKC", text):
            text = SEPARATOR.join([t if unicodedata.is_normalized("NFKC", t) else unicodedata.normalize("NFKC", t)
                                   for t in text.split(SEPARATOR)])
        text = text.lower()
        return text.replace(FINAL_SIGMA, SIGMA) if FINAL_SIGMA in text else text

    def _encode_unicode(self, text: str) -> list:
        text = self._normalized(text)
        return self._ids(text, _ASCII_SIMPLE if text.isascii() else self._pattern)

    _code_scanner = False  # not built yet

    def _bulk_more(self, texts, positions):
        """The texts the byte scan left that hold no separator, normalized together and
        scanned as code points (when this Python knows the repertoire)."""
        positions = [i for i in positions if SEPARATOR not in texts[i]]
        if len(positions) < 2 or not self._unicode():
            return None
        if self._code_scanner is False:
            self._code_scanner = _Scanner.build(self.vocab, _codepoint_classes(), unit=4)
        if self._code_scanner is None:
            return None
        joined = self._normalized(SEPARATOR.join([texts[i] for i in positions]))
        got = self._code_scanner.scan(joined.encode("utf-32-le", "surrogatepass"), len(positions), self.unk_id)
        return None if got is None else (positions, *got)

    def encode_batch(self, texts) -> list:
        out, later = [], []
        ids, pattern = self._ids, _ASCII_SIMPLE
        for i, text in enumerate(texts):
            if text.isascii():
                out.append(ids(text.lower(), pattern))
            elif self._unicode():
                out.append(self._encode_unicode(text))
            elif self.fallback is None:
                raise NotPortable(self._problem)
            else:
                out.append(None)
                later.append(i)
        return _fill_from_fallback(out, later, texts, self.fallback)

    def _bulk_eligible(self, text: str) -> bool:
        return text.isascii() and SEPARATOR not in text

    _bulk_pattern = _ASCII_JOINED
    _bulk_lower = True

    @staticmethod
    def _bulk_classes():
        return _byte_classes(*_ASCII_BODIES)
    _bulk_prefix = None

    def _bulk_keep(self):
        return self.max_length


def _fill_from_fallback(out, later, texts, fallback) -> list:
    """Put the ids of the texts at positions ``later`` (those the fast path handed over) into
    ``out``, from one batch call of ``fallback`` (the ``tokenizers`` library)."""
    if later:
        for i, row in zip(later, fallback([texts[i] for i in later])):
            out[i] = row
    return out


def _truncation(spec):
    trunc = spec.get("truncation")
    return trunc["max_length"] if trunc else None


class RegexFastTokenizer(_Bulk):
    """The twin of the ``regex`` / ``regex-start`` kinds (MediaPipe's regex tokenizer): every
    text, no Unicode table needed (the word class is ASCII, everything else delimits)."""

    WORD_CLASS = "0-9A-Za-z_'"
    WORD = re.compile(f"[{WORD_CLASS}]+")

    def __init__(self, vocab: dict, unk_id: int, start_id: int | None, max_length: int | None):
        self.vocab, self.unk_id, self.start_id, self.max_length = vocab, unk_id, start_id, max_length
        self.kind = KIND_REGEX_START if start_id is not None else KIND_REGEX
        self.fallback = None
        # tokenizers keeps room for the <START> id the post-processor adds
        self._keep = None if max_length is None else max(0, max_length - (start_id is not None))
        self._long = LONG_TEXT_CHARS_PER_TOKEN * max_length if max_length else None

    @classmethod
    def from_spec(cls, spec: dict, fallback=None) -> "RegexFastTokenizer":
        regex = regex_spec(spec)
        if regex is None:
            raise NotPortable("not MediaPipe's regex tokenizer")
        model = spec["model"]
        vocab = model["vocab"]
        return cls(vocab, vocab[model["unk_token"]], vocab[REGEX_START] if regex["start"] else None,
                   _truncation(spec))

    def unicode_problem(self) -> str | None:
        return None

    def needs_fallback(self) -> bool:
        return False

    def normalize(self, text: str) -> str:
        return text

    def pre_tokenize(self, normalized: str) -> list:
        return self.WORD.findall(normalized)

    def encode(self, text: str) -> list:
        if self._long is not None and len(text) > self._long:
            words = [m.group() for m in islice(self.WORD.finditer(text), self._keep)]
        else:
            words = self.WORD.findall(text)
        if self._keep is not None:
            words = words[: self._keep]
        ids = list(map(self.vocab.get, words, repeat(self.unk_id)))
        return ids if self.start_id is None else [self.start_id] + ids

    def encode_batch(self, texts) -> list:
        return [self.encode(t) for t in texts]

    _bulk_pattern = _joined(WORD)
    _bulk_lower = False

    @classmethod
    def _bulk_classes(cls):
        return _byte_classes(cls.WORD_CLASS)

    def _bulk_eligible(self, text: str) -> bool:  # no Unicode table: every text without the separator
        return SEPARATOR not in text

    def _bulk_keep(self):
        return self._keep

    @property
    def _bulk_prefix(self):
        return self.start_id


class WordLevelFastTokenizer:
    """The twin of the ``wordlevel`` kind (the earlier default) on ASCII texts; non-ASCII
    texts go to ``fallback`` (``tokenizers``), or NotPortable without one."""

    #: Oniguruma's ``\\w+|[^\\w\\s]+`` restricted to ASCII: ``\\s`` is Unicode White_Space
    #: (tab to carriage return and space), so \\x1c-\\x1f are not spaces there (Python's
    #: ``\\s`` says they are)
    ASCII_PATTERN = re.compile(r"[0-9A-Za-z_]+|[^0-9A-Za-z_\t\n\x0b\x0c\r ]+")
    PROBLEM = ("the wordlevel tokenizer's Whitespace pre-tokenizer and NFKC/lowercase have no exact "
               "pure-Python twin outside ASCII")

    def __init__(self, vocab: dict, unk_id: int, added: dict, max_length: int | None, fallback=None):
        self.vocab, self.unk_id, self.added, self.max_length = vocab, unk_id, added, max_length
        self.fallback = fallback
        self.kind = KIND_WORDLEVEL
        # added tokens are matched in the raw text, longest first at each position
        self._added = re.compile("(" + "|".join(re.escape(a) for a in sorted(added, key=len, reverse=True)) + ")") \
            if added else None

    @classmethod
    def from_spec(cls, spec: dict, fallback=None) -> "WordLevelFastTokenizer":
        problem = wordlevel_problem(spec)
        if problem:
            raise NotPortable(f"not the wordlevel tokenizer: {problem}")
        model = spec["model"]
        added = {a["content"]: a["id"] for a in spec.get("added_tokens") or []}
        return cls(model["vocab"], model["vocab"][model["unk_token"]], added, _truncation(spec), fallback)

    def unicode_problem(self) -> str | None:
        return self.PROBLEM

    def needs_fallback(self) -> bool:
        return True

    def _ascii_ids(self, text: str) -> list:
        pieces = self._added.split(text) if self._added is not None else [text]
        ids = []
        for i, piece in enumerate(pieces):
            if i % 2:  # an added token
                ids.append(self.added[piece])
            elif piece:
                ids += map(self.vocab.get, self.ASCII_PATTERN.findall(piece.lower()), repeat(self.unk_id))
            if self.max_length is not None and len(ids) >= self.max_length:
                break
        return ids if self.max_length is None else ids[: self.max_length]

    def encode(self, text: str) -> list:
        if text.isascii():
            return self._ascii_ids(text)
        if self.fallback is None:
            raise NotPortable(self.PROBLEM)
        return self.fallback([text])[0]

    def encode_padded(self, texts, max_length: int | None = None) -> np.ndarray:
        """``pad_rows(self.encode_batch(texts), max_length)`` (text by text: added tokens are
        matched in the raw text first)."""
        rows = self.encode_batch(texts)
        return padded_matrix(len(rows), max_length, rows=dict(enumerate(rows)))

    def encode_batch(self, texts) -> list:
        out, later = [], []
        for i, text in enumerate(texts):
            if text.isascii():
                out.append(self._ascii_ids(text))
            elif self.fallback is None:
                raise NotPortable(self.PROBLEM)
            else:
                out.append(None)
                later.append(i)
        return _fill_from_fallback(out, later, texts, self.fallback)
