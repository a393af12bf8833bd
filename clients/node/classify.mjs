#!/usr/bin/env node
// usage: node classify.mjs BUNDLE "text one" "text two" ...   (one JSON object per line)
import { requireNode } from "./node_version.mjs";

const PROG = "probattn-classify";
requireNode(PROG);
const { loadBundle } = await import("./probattn.mjs");
const [dir, ...texts] = process.argv.slice(2);
if (!dir || texts.length === 0) {
  process.stderr.write(`${PROG}: error: usage: node classify.mjs BUNDLE TEXT [TEXT ...]\n`);
  process.exit(2);
}
try {
  const model = await loadBundle(dir);
  for (const [i, r] of (await model.classify(texts)).entries()) {
    console.log(JSON.stringify({ text: texts[i], ...r }));
  }
} catch (e) {
  process.stderr.write(`${PROG}: error: ${String(e.message).split("\n")[0]}\n`);
  process.exit(2);
}
