"""Hard inputs for tokenizer parity (Python/Rust ``tokenizers`` vs the pure-Python fast path
vs tokenizers.js / transformers.js), and a deterministic code-point sample.

Shared by tests/test_tokenizer.py, tests/test_node_client.py and
scripts/tokenizer_codepoints.py (the exhaustive check over every code point)."""
from __future__ import annotations

import random
import unicodedata

BATTERY = [
    # accents, composed and decomposed
    "naïve clichés café", "Cafe\u0301 nai\u0308ve", "Ångström Ölçü Tiếng Việt", "ÉCOLE ÉTÉ",
    # compatibility forms (NFKC)
    "ﬁne ﬂow ﬀ ﬆ", "ＦＵＬＬ　ｗｉｄｔｈ！ＡＢＣ１２３", "x² + y³ = z⁴ H₂O", "①②③ ½ ¼ ™ ℌ ㎏ Ⅻ …",
    "𝐇𝐞𝐥𝐥𝐨 𝟙𝟚𝟛", "Ⓐⓑ ǅ ǈ", "ｶﾀｶﾅ ｶﾞｷﾞ", "K Ω Å (Kelvin, Ohm, Angstrom signs)", "ﻼ ﷺ",
    # scripts without spaces or with their own marks
    "日本語のテキストです。", "中文文本，标点。", "한국어 텍스트", "\u1112\u1161\u11ab\u1100\u1173\u11af",
    "ภาษาไทย", "हिन्दी भाषा", "தமிழ்",
    # emoji: modifiers, ZWJ sequences, flags, keycaps
    "😀 👍🏽 ❤️ 👨‍👩‍👧 🇬🇧 1️⃣ #️⃣", "great😀movie!!😀😀", "🫨🫩",
    # right-to-left, bidi controls
    "مرحبا بالعالم", "مَرْحَبًا ٠١٢٣ ۴۵۶", "שָׁלוֹם עולם", "abc\u200fdef\u200e", "\u202ertl override\u202c",
    # combining marks with and without a base
    "a\u0301", "\u0301 leading mark", " \u0308x", "Z̸̢͙a̵l̴g̷o̶", "e\u0301\u0302\u0303", "❤\ufe0e ❤\ufe0f",
    # apostrophes and quotes
    "don't don’t ‘quoted’ “double” \"plain\"", "rock 'n' roll O'Neil", "``latex'' ´acute` ′prime″",
    "it's it’s it‘s", "«guillemets» „low“ 「括弧」",
    # hyphens and dashes
    "well-known en–dash em—dash minus − sign", "non\u2011breaking co\u00adoperate", "‐hyphen ‒ ― ⸺",
    # digits of other scripts, numbers
    "1,234.56 3.14 2024-01-01 10:30pm", "١٢٣ ४५६ 𝟕𝟖", "0x1F 1e-9 -5 +7 50%",
    # connectors
    "snake_case_name __init__ _ a_1 ＿x‿y", "___", "_!_!",
    # every kind of space and line break
    "a\u00a0b 10\u00a0000", "a\u202fb\u2007c\u3000d", "a\u2028b\u2029c\u0085d", "a\tb\nc\r\nd\x0be\x0cf",
    "  leading and trailing  ", "\u1680ogham\u180emongolian",
    # invisible, format and control characters
    "a\u200db a\u200cb a\u200bb", "\ufeffHello BOM", "word\u2060joiner", "a\x00b\x01c\x7fd",
    "a\x1cb\x1dc\x1ed\x1ff", "\ue000private\U000F0000", "\u0378unassigned\uffff\U0010FFFF",
    # case specials: final sigma, dotted I, sharp s, Georgian, titlecase digraphs
    "ΟΔΟΣ ΟΔΟΣ. Σίσυφος ΣΑΣ", "ς σ Σ", "İstanbul ISTANBUL ıi", "ß ẞ STRASSE", "ᲐᲑᲒ Ꭰ ꭰ", "ǅungla DŽ",
    # code points newer than some engines' Unicode (outside the repertoire: U+FFFD everywhere)
    "\u1c89\u1c8a", "\U00031350\U00011F04\U0001E4D0", "\u32ff \U0001fbf0",
    # special-token look-alikes: plain text, never the pad or unknown id
    "[PAD] [UNK] [pad] [unk]", "[PAD][PAD]",
    # the rest
    "", "   ", "!!!", "...", "?!", "https://example.com/a_b?c=d&e=f", "<b>bold</b> #hashtag @user",
    "abcДЕЖ日本 Привет, МИР", "user@example.com $100 €5 £3 ¥9", "tab\tseparated\tvalues",
    # long texts: truncation, and the fast path's early stop
    "a" * 5000, "!" * 3000 + "word", "word " * 10000, "naïve " * 3000,
]


def random_unicode(n=300, seed=0, length=40) -> list:
    """Random strings mixing ASCII with random code points of every plane (no surrogates)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        chars = []
        for _ in range(length):
            r = rng.random()
            if r < 0.4:
                chars.append(rng.choice("abc XYZ_-'.,"))
            elif r < 0.7:
                chars.append(chr(rng.randrange(0x80, 0x3000)))
            else:
                cp = rng.randrange(0x3000, 0x110000)
                chars.append(chr(0x20 if 0xD800 <= cp <= 0xDFFF else cp))
        out.append("".join(chars))
    return out


#: characters whose interactions matter: composition, final sigma, marks, separators,
#: NFKC expansions, case mappings that change length
TRICKY = ("ΣσςΟΔΑ" "\u0301\u0308\u0327\u20e3\ufe0f\ufe0e" "\u1100\u1161\u11a8\u1112\u1173"
          "\u200d\u200c\u200b\u2060\ufeff\u00ad" " \t\n\u00a0\u2028\u3000\u0085\x1c"
          "ＡＢｃ１＿ﬁﬂ²½™" "İıIi" "0123456789_-'’\".,!?" "😀👍🏽🇬🇧" "\ufffd\U00031350\u32ff\U0001fbf1"
          "aeoubcdxyzAEZ" "日本한ภा" "ǅ\u0345\u0399")


def random_mix(n=3000, seed=1, length=30) -> list:
    """Random strings over TRICKY."""
    rng = random.Random(seed)
    return ["".join(rng.choice(TRICKY) for _ in range(rng.randrange(1, length))) for _ in range(n)]


def template(c: str) -> str:
    """A code point inside, at the start and at the end of words, before punctuation, doubled."""
    return f"a{c}b {c}. {c}{c}"


def code_points(stride: int = 0) -> list:
    """Every Unicode scalar value (``stride=0``), or a deterministic sample: every code point
    where this Python's General_Category changes, its neighbours, and every ``stride``-th."""
    cps = [cp for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF]
    if not stride:
        return cps
    keep = set(cps[::stride])
    prev = None
    for cp in cps:
        cat = unicodedata.category(chr(cp))
        if cat != prev:
            keep.update(c for c in (cp - 1, cp, cp + 1) if 0 <= c < 0x110000 and not 0xD800 <= c <= 0xDFFF)
        prev = cat
    return sorted(keep)


def pre_tokenized(tokens_of, cps, chunk: int = 2048) -> list:
    """``tokens_of(text) -> [str]`` for chunks of templates joined by spaces (a space
    separates templates in every engine, so a chunk's tokens are its templates' tokens in
    order; chunking makes the check ~30x faster than one call per code point)."""
    return [tokens_of(" ".join(template(chr(cp)) for cp in cps[i:i + chunk]))
            for i in range(0, len(cps), chunk)]
