// Label texts with a probattn bundle from Node.js: the bundle's portable tokenizer in
// tokenizers.js (@huggingface/tokenizers) and its ONNX model in onnxruntime-node.
//
//   import { loadBundle } from "./probattn.mjs";
//   const model = await loadBundle("path/to/bundle");            // fp32, int32 ids
//   const results = await model.classify(["a gripping, funny film"]);
//   // [{ label: "fresh", probabilities: { fresh: 0.93, rotten: 0.07 } }]
//
// What a client must do to get the ids probattn's Python side gets:
// * read tokenizer_config.json too: tokenizers.js takes unk_token from it for a word-level
//   model (without it unknown words come out undefined, which an Int32Array turns into the
//   pad id 0);
// * truncate itself: neither tokenizers.js nor transformers.js applies the truncation
//   stored in tokenizer.json; keep the first model_max_length ids;
// * pad with 0 ([PAD]) on the right, to the longest text of the batch (the model masks pads);
// * send int32 ids to model_<precision>.onnx. transformers.js returns int64 ids: send those
//   to the int64 twin model_<precision>_int64.onnx, or convert with
//   Int32Array.from(ids.data, Number) for the int32 file.
import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";

import { Tokenizer } from "@huggingface/tokenizers";
import * as ort from "onnxruntime-node";

export const INPUT = "token_ids";
export const PROBABILITIES = "probabilities";
export const PAD_ID = 0;
const MANIFEST = "manifest.json";
const SCHEMA_VERSION = 1;

export class BundleError extends Error {}

function sha256(file) {
  return crypto.createHash("sha256").update(fs.readFileSync(file)).digest("hex");
}

/** A bundle file after checking it stays inside the bundle and matches its manifest hash. */
export function verifiedPath(dir, entry) {
  const root = path.resolve(dir);
  const file = path.resolve(root, entry.path);
  if (!file.startsWith(root + path.sep)) throw new BundleError(`manifest path '${entry.path}' points outside the bundle`);
  if (!fs.existsSync(file)) throw new BundleError(`${entry.path} is listed in ${MANIFEST} but missing`);
  const digest = sha256(file);
  if (digest !== entry.sha256) throw new BundleError(`${entry.path} does not match its manifest hash (it was modified or damaged)`);
  return file;
}

/** The manifest, checked for what this client reads. */
export function readManifest(dir) {
  const file = path.join(dir, MANIFEST);
  if (!fs.existsSync(file)) throw new BundleError(`${dir} is not a probattn bundle: no ${MANIFEST}`);
  const manifest = JSON.parse(fs.readFileSync(file, "utf8"));
  if (!(manifest.schema_version <= SCHEMA_VERSION)) {
    throw new BundleError(`${MANIFEST} has schema_version ${manifest.schema_version}; this client reads up to ${SCHEMA_VERSION}`);
  }
  const tok = manifest.tokenizer || {};
  if (tok.kind !== "portable" || !tok.config) {
    throw new BundleError(`the bundle's tokenizer is kind '${tok.kind ?? "unknown (an older bundle)"}'; ` +
      "JavaScript gives the same ids as Python only for the portable tokenizer: train and export again with this probattn");
  }
  return manifest;
}

/** The manifest entry of the ONNX file of `precision` taking `inputDtype` ids. */
export function onnxEntry(manifest, precision = "fp32", inputDtype = "int32") {
  const entry = manifest.artifacts.find((a) => a.format === "onnx" && a.precision === precision
    && (a.input_dtype ?? "int32") === inputDtype);
  if (!entry) {
    const have = manifest.artifacts.filter((a) => a.format === "onnx").map((a) => `${a.precision}/${a.input_dtype ?? "int32"}`);
    throw new BundleError(`the bundle has no onnx ${precision} artifact with ${inputDtype} input; it has ${have.join(", ") || "none"}`);
  }
  return entry;
}

/** tokenizers.js from the bundle's tokenizer.json + tokenizer_config.json, with the
 *  truncation length the config gives. */
export function loadTokenizer(dir, manifest) {
  const json = JSON.parse(fs.readFileSync(verifiedPath(dir, manifest.tokenizer), "utf8"));
  const config = JSON.parse(fs.readFileSync(verifiedPath(dir, manifest.tokenizer.config), "utf8"));
  if (config.unk_token !== "[UNK]" || !Number.isInteger(config.model_max_length)) {
    throw new BundleError("tokenizer_config.json must set unk_token [UNK] and an integer model_max_length");
  }
  return { tokenizer: new Tokenizer(json, config), maxLength: config.model_max_length, config };
}

/** Ids for each text: encoded, then cut at maxLength (the libraries do not truncate). */
export function encodeTexts(tokenizer, texts, maxLength) {
  return texts.map((t) => tokenizer.encode(t).ids.slice(0, maxLength));
}

/** Id rows -> an int32 [batch, longest] tensor, right-padded with 0. */
export function padRows(rows, dtype = "int32") {
  const width = Math.max(1, ...rows.map((r) => r.length));
  if (dtype === "int64") {
    const data = new BigInt64Array(rows.length * width);
    rows.forEach((r, i) => r.forEach((id, j) => { data[i * width + j] = BigInt(id); }));
    return new ort.Tensor("int64", data, [rows.length, width]);
  }
  const data = new Int32Array(rows.length * width); // zero-filled: the pad id
  rows.forEach((r, i) => data.set(r, i * width));
  return new ort.Tensor("int32", data, [rows.length, width]);
}

/** A session on the bundle's ONNX file (one thread: deterministic and light). */
export async function loadSession(dir, manifest, precision = "fp32", inputDtype = "int32") {
  const file = verifiedPath(dir, onnxEntry(manifest, precision, inputDtype));
  return ort.InferenceSession.create(file, { executionProviders: ["cpu"], intraOpNumThreads: 1, interOpNumThreads: 1 });
}

export async function loadBundle(dir, { precision = "fp32" } = {}) {
  const manifest = readManifest(dir);
  const { tokenizer, maxLength } = loadTokenizer(dir, manifest);
  const session = await loadSession(dir, manifest, precision, "int32");
  const labels = manifest.labels;
  return {
    manifest, tokenizer, session, labels, maxLength,
    encode: (texts) => encodeTexts(tokenizer, texts, maxLength),
    /** probabilities as a Float32Array [batch * classes] for id rows */
    async probabilities(rows) {
      const out = await session.run({ [INPUT]: padRows(rows) }, [PROBABILITIES]);
      return out[PROBABILITIES].data;
    },
    async classify(texts) {
      const p = await this.probabilities(this.encode(texts));
      const k = labels.length;
      return texts.map((_, i) => {
        const row = Array.from(p.subarray(i * k, (i + 1) * k));
        const best = row.indexOf(Math.max(...row));
        return { label: labels[best], probabilities: Object.fromEntries(labels.map((l, j) => [l, row[j]])) };
      });
    },
  };
}
