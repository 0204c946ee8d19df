"""Where an SAE reads its activations, for the ``metadata`` of an exported checkpoint.

SAELens keeps these in ``cfg.json``'s ``metadata`` (``model_name``, ``hook_name``,
``hook_head_index``, ``context_size``, ``prepend_bos``, ``exclude_special_tokens``,
``dataset_path``, ``model_from_pretrained_kwargs``). They are read, in this order, from the
subject model's folder (``subject.json``: hook name, model name, BOS, context length, BOS id),
then params.yaml (``activations.context_length``, ``activations.exclude_bos``, the corpus
dataset, and the ``subject_model`` section when there is no folder), and fall back to the
default profile's values with a warning naming every guessed field.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SUBJECT_META_FILE = "subject.json"
DEFAULT_SUBJECT_DIR = Path("models/subject")

# TransformerLens processes GPT-2's weights by default; centring the writing weights changes the
# residual stream. moesae hooks the unprocessed HuggingFace model, so the same activations come
# from HookedTransformer.from_pretrained(..., center_writing_weights=False) (or
# from_pretrained_no_processing, which SAELens suggests when this is non-empty).
MODEL_FROM_PRETRAINED_KWARGS = {"center_writing_weights": False}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def hook_metadata(params: dict[str, Any] | None = None, subject_dir: str | Path | None = None,
                  overrides: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """(metadata, warnings): SAELens-style metadata of the hook the SAEs of this pipeline read.

    ``subject_dir``: the subject model's folder (default: ``paths.subject_model`` of ``params``,
    else ``models/subject``). ``overrides``: values given on the command line (win over all).
    """
    params = params or {}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    warnings: list[str] = []
    if subject_dir is None:
        subject_dir = (params.get("paths") or {}).get("subject_model") or DEFAULT_SUBJECT_DIR
    subject_dir = Path(subject_dir)
    subject = _read_json(subject_dir / SUBJECT_META_FILE)
    section = params.get("subject_model") or {}
    activations = params.get("activations") or {}
    corpus = params.get("corpus") or {}

    from ..subject_model import SubjectModelConfig

    default = SubjectModelConfig()
    guessed: list[str] = []
    if subject is not None:
        hook_name = subject.get("hook_name") or f"blocks.{subject['hook_layer']}.hook_resid_post"
        model_name = subject.get("name")
        prepend_bos = bool(subject.get("prepend_bos", True))
        context = subject.get("context_length")
        bos_id = subject.get("bos_token_id")
    elif section:
        source = section.get("source", default.source)
        hook_name = f"blocks.{section.get('hook_layer', default.hook_layer)}.hook_resid_post"
        model_name = section.get("name", default.name) if source == "pretrained" else "trained"
        prepend_bos = bool(section.get("prepend_bos", default.prepend_bos))
        context = section.get("context_length", default.context_length)
        bos_id = None
        warnings.append(f"no {SUBJECT_META_FILE} in {subject_dir}: hook, model and BOS taken from params.yaml's "
                        "subject_model section")
    else:
        hook_name = f"blocks.{default.hook_layer}.hook_resid_post"
        model_name = "trained" if default.source == "train" else default.name
        prepend_bos, context, bos_id = default.prepend_bos, default.context_length, None
        guessed += ["hook_name", "model_name", "prepend_bos"]
    if activations.get("context_length") is not None:
        context = activations["context_length"]  # the cache the SAEs were trained on
    if context is None:
        context = default.context_length
        guessed.append("context_size")
    exclude_bos = activations.get("exclude_bos", True)
    if "exclude_bos" not in activations:
        guessed.append("exclude_special_tokens")
    exclude: bool | list[int] = False
    if exclude_bos and prepend_bos:
        exclude = [int(bos_id)] if bos_id is not None else True
    dataset = None
    if corpus.get("source") == "hf":
        dataset = corpus.get("train_dataset")
    elif corpus.get("source"):
        dataset = f"moesae:{corpus['source']}"
    meta = {
        "model_name": model_name,
        "hook_name": hook_name,
        "hook_head_index": None,
        "context_size": int(context),
        "prepend_bos": prepend_bos,
        "exclude_special_tokens": exclude,
        "dataset_path": dataset,
        "model_from_pretrained_kwargs": dict(MODEL_FROM_PRETRAINED_KWARGS),
        "neuronpedia_id": None,
    }
    for key, value in overrides.items():
        meta[key] = value
        if key in guessed:
            guessed.remove(key)
    if guessed:
        warnings.append(
            f"no subject model folder ({subject_dir / SUBJECT_META_FILE}) and no params given: "
            f"{', '.join(guessed)} are the default profile's values ("
            + ", ".join(f"{k}={meta[k]!r}" for k in guessed)
            + "); pass --params params.yaml or --subject DIR"
        )
    return meta, warnings
