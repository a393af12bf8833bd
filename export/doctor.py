"""``probattn doctor MODEL``: the diagnosis ``verify`` gives (``probattn.export.diagnosis``),
without exporting anything. Exit 1 when the model itself breaks masking."""
from __future__ import annotations

from pathlib import Path

from probattn.models.errors import UsageError


def doctor(model, custom_objects=None, tokenizer=None, data=None, unsafe: bool = False) -> dict:
    from probattn.models.text.tokenizer import load_tokenizer

    from .adapt import adapt
    from .diagnosis import diagnose_serving
    from .exporter import _adapt
    from .loading import load_model, vocab_size_of
    from .signature import probe_ids, serving_for

    path = Path(model)
    if path.is_dir() and (path / "model.keras").is_file():  # a RUN_DIR
        tokenizer = tokenizer or path / "tokenizer.json"
        data = data or (path / "test.jsonl" if (path / "test.jsonl").is_file() else None)
        path = path / "model.keras"
    if data and not tokenizer:
        raise UsageError("--data needs --tokenizer (the tokenizer the model was trained with)")
    loaded = load_model(path, unsafe=unsafe, custom_objects=custom_objects)
    notes = []
    tok = load_tokenizer(tokenizer) if tokenizer else None
    if loaded.keras_model is not None:
        adapted = _adapt(loaded, adapt, probe_ids)
        loaded.keras_model = adapted.model
        notes = [n["what"] for n in adapted.notes]
        tok = tok or adapted.tokenizer
    model_obj = loaded.keras_model
    vocab = (vocab_size_of(model_obj) if model_obj is not None else None) or (tok.get_vocab_size() if tok else 100)
    serving = serving_for(loaded, False, vocab)
    texts = _texts(data) if data else None
    result = diagnose_serving(serving, tokenizer=tok, texts=texts)
    result.update({"model": str(path), "file": loaded.info.describe(), "adaptations": notes,
                   "probed_with": f"texts from {data}" if texts else "random ids",
                   "heads": [h.as_dict() for h in serving.heads], "fixed_length": serving.fixed_length})
    return result


def _texts(data) -> list:
    from probattn.models.text.data import load_dataset

    p = Path(data)
    if p.suffix.lower() == ".txt":
        if not p.is_file():
            raise UsageError(f"data file not found: {p}")
        return [l for l in p.read_text(encoding="utf-8").splitlines() if l.strip()]
    return load_dataset(str(p), quiet=True).texts


def render(result: dict) -> str:
    lines = [f"{result['model']}: {result['file']}" + (f"; {', '.join(result['adaptations'])}"
                                                     if result["adaptations"] else ""),
             f"probed with {result['probed_with']}; heads: "
             + ", ".join(f"{h['output']} ({h['kind']}, {h['units']} units)" for h in result["heads"])
             + (f"; fixed input length {result['fixed_length']}" if result["fixed_length"] else "")]
    if "pad_invariance" in result:
        lines.append(f"padding invariance of the outputs: {result['pad_invariance']:.3g}")
    lines.append(f"all-padding row: {'finite' if result['all_padding_row_finite'] else 'NaN/inf'}")
    if not result["traced"]:
        lines.append(f"layers not traced: {result.get('untraced_reason')}")
    if result["breaks_masking"]:
        where = f" It starts at layer '{result['starts_at']}'." if result["starts_at"] else ""
        lines.append(f"The model itself breaks masking.{where}")
    else:
        lines.append("Masking holds: padding changes nothing and an all-padding row stays finite.")
    lines += [f"  - {t}" for t in result["findings_text"]]
    return "\n".join(lines)
