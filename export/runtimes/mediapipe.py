"""MediaPipe's ``TextClassifier`` (the ``mediapipe`` package: the same C++ task as on
Android, iOS and the web), running the ``mediapipe`` artifacts: fixed-shape, probabilities
only, with regex-tokenizer metadata.

The task takes texts, not ids: it tokenizes with the vocabulary and delimiter stored in
the file's metadata. The parity engine feeds ids, so this runner turns each row of ids
back into a text, the row's words joined by single spaces, and lets MediaPipe tokenize
that. This is exact for the regex tokenizer, which is a pure split-and-lookup: every
vocabulary word is made of word characters only, so splitting the joined text gives back
the same words and the lookup the same ids. An unknown id (``<UNKNOWN>``) is written as a
word of word characters that is not in the vocabulary. Rows MediaPipe could not have
produced (padding before a word, ``<START>`` anywhere but first) are refused by
``accepts``, and verify reports those cases as not applicable. The runner checks the
round trip itself on every row it runs: the text, split on the delimiter and looked up,
must give the row's ids back.

Scores are the model's raw outputs (no score calibration in the metadata), placed by
category index. ``mediapipe`` imports TensorFlow when it is installed (for its API docs,
``mediapipe.tasks.python.core.optional_dependencies``), so this runtime is not
TensorFlow-free and ``predict`` does not offer it.
"""
from __future__ import annotations

import contextlib
import re
import zipfile
import io

import numpy as np

from probattn.models.errors import UsageError, one_line

from . import register
from .base import Runner


@contextlib.contextmanager
def classifier(blob: bytes):
    """A ``TextClassifier`` over a model in memory, returning every category; closed after."""
    from mediapipe.tasks.python.core.base_options import BaseOptions
    from mediapipe.tasks.python.text import text_classifier as tc

    from probattn.models.quiet import quiet_stderr

    with quiet_stderr():  # "Created TensorFlow Lite XNNPACK delegate for CPU."
        clf = tc.TextClassifier.create_from_options(
            tc.TextClassifierOptions(base_options=BaseOptions(model_asset_buffer=blob), max_results=-1))
    try:
        yield clf
    finally:
        clf.close()


def embedded_files(blob: bytes) -> dict:
    """The files packed in a model's metadata (a zip archive appended to the flatbuffer)."""
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            return {n: z.read(n) for n in z.namelist()}
    except zipfile.BadZipFile:
        return {}


def read_metadata(blob: bytes) -> dict:
    """Delimiter, vocabulary (token -> id, as MediaPipe parses ``token id`` lines) and
    labels that the metadata stores."""
    from mediapipe.tasks.metadata import metadata_schema_py_generated as mfb
    from mediapipe.tasks.metadata import schema_py_generated as sfb

    model = sfb.Model.GetRootAs(blob, 0)
    meta_buf = None
    for i in range(model.MetadataLength()):
        m = model.Metadata(i)
        if m.Name() == b"TFLITE_METADATA":
            meta_buf = model.Buffers(m.Buffer()).DataAsNumpy().tobytes()
    if meta_buf is None:
        raise UsageError("the model has no TFLite metadata; MediaPipe's TextClassifier needs it")
    meta = mfb.ModelMetadataT.InitFromObj(mfb.ModelMetadata.GetRootAs(meta_buf, 0))
    sg = meta.subgraphMetadata[0]
    units = list(sg.inputProcessUnits or []) + [u for t in sg.inputTensorMetadata or [] for u in t.processUnits or []]
    regex = [u.options for u in units if u.optionsType == mfb.ProcessUnitOptions.RegexTokenizerOptions]
    if not regex:
        raise UsageError("the metadata has no regex tokenizer; this runner reproduces regex-tokenizer ids only")
    opts = regex[0]
    files = embedded_files(blob)
    vocab_name = opts.vocabFile[0].name.decode()
    vocab = {}
    for line in files[vocab_name].decode("utf-8").split("\n"):
        line = line[:-1] if line.endswith("\r") else line
        if line:
            word, idx = line.split(" ")[:2]
            vocab[word] = int(idx)
    labels = []
    for t in sg.outputTensorMetadata or []:
        for f in t.associatedFiles or []:
            if f.type == mfb.AssociatedFileType.TENSOR_AXIS_LABELS:
                labels = [l for l in files[f.name.decode()].decode("utf-8").splitlines() if l]
    return {"delimiter": opts.delimRegexPattern.decode(), "vocab": vocab, "labels": labels}


@register
class MediaPipeRunner(Runner):
    runtime = "mediapipe"
    formats = ("mediapipe",)
    requires = ("mediapipe",)
    package = "mediapipe"
    tensorflow_free = False  # mediapipe imports TensorFlow when it is installed (API-doc helper)
    order = 50
    description = "MediaPipe TextClassifier on texts rebuilt from the ids (regex-tokenizer bundles)"

    @classmethod
    def cannot_run(cls, fmt: str, precision: str, entry: dict | None = None) -> str | None:
        measured = (entry or {}).get("target_checks", {}).get("mediapipe", "ok")
        if fmt in cls.formats and measured != "ok":
            return f"measured at export: {measured}"
        return super().cannot_run(fmt, precision, entry)

    def _load(self):
        from ..formats.tflite_flatbuffer import describe
        from probattn.models.text.tokenizer import REGEX_PAD, REGEX_START, REGEX_UNK, REGEX_WORD_CHARS

        if not self.path.is_file():
            raise UsageError(f"model file not found: {self.path}")
        blob = self.path.read_bytes()
        try:
            info = describe(blob)
            meta = read_metadata(blob)
        except UsageError as e:
            raise UsageError(f"{self.path.name}: {e}") from None
        except Exception as e:
            raise UsageError(f"{self.path.name} is not a MediaPipe text classifier ({one_line(e, 200)})") from None
        shape = info["inputs"][0]["shape_signature"]
        if len(shape) != 2 or min(shape) < 1:
            raise UsageError(f"{self.path.name}: MediaPipe reads its maximum length from a fixed input; "
                             f"the file has {shape}")
        self.fixed_batch, self.fixed_length = shape
        vocab = meta["vocab"]
        self.pad, self.unk, self.start = vocab[REGEX_PAD], vocab[REGEX_UNK], vocab.get(REGEX_START)
        self.words = {i: w for w, i in vocab.items() if w not in (REGEX_PAD, REGEX_UNK, REGEX_START)}
        bad = [w for w in self.words.values() if not w or not set(w) <= REGEX_WORD_CHARS]
        if bad:
            raise UsageError(f"{self.path.name}: vocabulary words {bad[:3]} are not plain word characters; "
                             "texts cannot be rebuilt from ids")
        # a word that is certainly unknown: underscores, one more than the longest run in the vocabulary
        self.unknown_word = "_" * (1 + max((len(w) for w in vocab if set(w) == {"_"}), default=0))
        self.split = re.compile(meta["delimiter"])
        self.vocab = vocab
        self.n_classes = int(info["outputs"][0]["shape"][-1])
        self.output = info["outputs"][0]["name"]
        self._stack = contextlib.ExitStack()
        try:
            self.clf = self._stack.enter_context(classifier(blob))
        except Exception as e:
            raise UsageError(f"MediaPipe TextClassifier could not load {self.path.name} ({one_line(e, 300)})") from None

    def _text(self, row) -> str | None:
        """The text MediaPipe tokenizes into exactly ``row``, or None when there is none."""
        row = [int(x) for x in row]
        if self.start is not None:
            if not row or row[0] != self.start:
                return None
            row = row[1:]
        n = len(row)
        while n and row[n - 1] == self.pad:
            n -= 1
        words = []
        for i in row[:n]:
            if i == self.unk:
                words.append(self.unknown_word)
            elif i in self.words:
                words.append(self.words[i])
            else:  # padding before a word, <START> later on, or an id outside the vocabulary
                return None
        return " ".join(words)

    def accepts(self, ids) -> bool:
        ids = np.asarray(ids)
        return self.accepts_length(ids.shape[1]) and all(self._text(r) is not None for r in ids)

    def _ids_of(self, text: str) -> list:
        """What MediaPipe's regex tokenizer gives for ``text`` (before padding)."""
        ids = [self.start] if self.start is not None else []
        ids += [self.vocab.get(w, self.unk) for w in self.split.split(text) if w]
        return ids[:self.fixed_length]

    def _infer(self, ids):
        rows = []
        for row in ids:
            text = self._text(row)
            if text is None:
                raise UsageError(f"Input '{self.output}' row {row.tolist()[:12]}... cannot come from the regex "
                                 "tokenizer (padding before a word or a misplaced <START>)")
            want = [int(x) for x in row]
            got = self._ids_of(text)
            if got + [self.pad] * (len(want) - len(got)) != want:
                raise UsageError(f"the rebuilt text does not give back its ids ({got[:8]} vs {want[:8]})")
            result = self.clf.classify(text)
            scores = np.full(self.n_classes, np.nan, np.float32)
            for c in result.classifications[0].categories:
                scores[c.index] = c.score
            rows.append(scores)
        return {self.output: np.stack(rows)}

    def _close(self):
        self._stack.close()
        self.clf = None
