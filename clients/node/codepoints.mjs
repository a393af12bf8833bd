// Normalize + pre-tokenize strings with tokenizers.js (no vocabulary): the JavaScript side
// of scripts/tokenizer_codepoints.py, which sends every Unicode code point through it.
// usage: node codepoints.mjs BUNDLE STRINGS.json OUT.json   (OUT: one token list per string)
import { requireNode } from "./node_version.mjs";

requireNode("probattn-codepoints");
const fs = await import("node:fs");
const P = await import("./probattn.mjs");
const [dir, inPath, outPath] = process.argv.slice(2);
const { tokenizer } = P.loadTokenizer(dir, P.readManifest(dir));
const strings = JSON.parse(fs.readFileSync(inPath, "utf8"));
fs.writeFileSync(outPath, JSON.stringify(strings.map((s) => tokenizer.pre_tokenizer(tokenizer.normalizer(s)))));
