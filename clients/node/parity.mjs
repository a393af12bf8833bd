// The Node side of probattn's client test: ids and probabilities for a list of texts.
// usage: node parity.mjs BUNDLE TEXTS.json OUT.json
//   tokenizers.js ids (truncated by the client) -> int32 model_fp32.onnx
//   transformers.js ids (int64, {padding: true, truncation: true}) -> int64 twin
//   model_fp32_int64.onnx, and the same ids converted to int32 -> model_fp32.onnx
import { requireNode } from "./node_version.mjs";

const PROG = "probattn-node-parity";
requireNode(PROG);
const fs = await import("node:fs");
const path = await import("node:path");
const P = await import("./probattn.mjs");
const { env, AutoTokenizer } = await import("@huggingface/transformers");
const ort = await import("onnxruntime-node");

const [dir, textsPath, outPath] = process.argv.slice(2);
try {
  const texts = JSON.parse(fs.readFileSync(textsPath, "utf8"));
  const manifest = P.readManifest(dir);
  const { tokenizer, maxLength } = P.loadTokenizer(dir, manifest);
  const s32 = await P.loadSession(dir, manifest, "fp32", "int32");
  const s64 = await P.loadSession(dir, manifest, "fp32", "int64");
  const run = async (session, tensor) => Array.from((await session.run({ [P.INPUT]: tensor }, [P.PROBABILITIES]))[P.PROBABILITIES].data);

  // 1. tokenizers.js, truncated here, int32 ids
  const rows = P.encodeTexts(tokenizer, texts, maxLength);
  const ids32 = P.padRows(rows);
  // 2. transformers.js from the bundle folder, offline
  env.allowRemoteModels = false;
  env.allowLocalModels = true;
  env.localModelPath = path.dirname(path.resolve(dir)) + path.sep;
  const auto = await AutoTokenizer.from_pretrained(path.basename(path.resolve(dir)));
  const single = texts.map((t) => auto(t, { truncation: true, return_tensor: false }).input_ids.map(Number));
  const batch = auto(texts, { padding: true, truncation: true });
  const asInt32 = new ort.Tensor("int32", Int32Array.from(batch.input_ids.data, Number), batch.input_ids.dims);
  let int64IntoInt32 = null;
  try { await s32.run({ [P.INPUT]: new ort.Tensor("int64", batch.input_ids.data, batch.input_ids.dims) }); }
  catch (e) { int64IntoInt32 = String(e.message).split("\n")[0]; }

  fs.writeFileSync(outPath, JSON.stringify({
    versions: { node: process.version, unicode: process.versions.unicode, icu: process.versions.icu,
                onnxruntime: ort.env.versions?.common ?? null },
    max_length: maxLength,
    tokenizers_js_ids: rows,
    transformers_js_ids: single,
    transformers_js_batch: { dtype: batch.input_ids.type, dims: batch.input_ids.dims },
    dims: ids32.dims,
    probabilities_int32: await run(s32, ids32),
    probabilities_int64_twin: await run(s64, new ort.Tensor("int64", batch.input_ids.data, batch.input_ids.dims)),
    probabilities_int64_converted: await run(s32, asInt32),
    int64_into_int32_model: int64IntoInt32,
  }));
} catch (e) {
  process.stderr.write(`${PROG}: error: ${String(e.message).split("\n")[0]}\n`);
  process.exit(2);
}
