"""Helpers for tests: a micro profile that runs the real data stages in seconds.

``run_micro_data_pipeline(workdir)`` writes ``workdir/params.yaml`` (the default profile's
sections with tiny data settings) and runs ``corpus`` → ``subject-model`` → ``activations`` there,
exactly as ``dvc repro`` would (same ``main(argv)`` entry points, paths relative to ``workdir``).
"""
from __future__ import annotations

import contextlib
import copy
import os
import time
from pathlib import Path
from typing import Any

import yaml

MICRO_DATA_SECTIONS: dict[str, Any] = {
    "paths": {"corpus": "data/corpus", "subject_model": "models/subject", "activations": "data/activations"},
    "corpus": {"source": "stdlib", "max_train_bytes": 250_000, "max_cross_bytes": 60_000,
               "heldout_fraction": 0.1, "seed": 0},
    "subject_model": {"source": "train", "hook_layer": 1, "prepend_bos": True, "vocab_size": 512,
                      "d_model": 32, "n_layers": 2, "n_heads": 2, "context_length": 64, "steps": 40,
                      "batch_size": 8, "lr": 0.003, "warmup_steps": 5, "seed": 0, "val_windows": 32,
                      "device": "cpu"},
    "activations": {"context_length": 64, "paper_faithful": False, "dtype": "float32", "shard_tokens": 4096,
                    "max_tokens": {"train": 16384, "heldout": 4096, "cross": 4096}, "batch_size": 32,
                    "device": "cpu"},
}


SAMPLE_TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "class Stack:\n    def push(self, item):\n        self.items.append(item)\n",
    "Sparse autoencoders split a residual stream into features.",
    "for i in range(10):\n    print(i * i)\n",
    "x",
]


def tiny_subject_model(texts: list[str] | None = None, *, vocab_size: int = 300, d_model: int = 16,
                       n_layers: int = 2, n_heads: int = 2, hook_layer: int = 0, context_length: int = 32,
                       prepend_bos: bool = True, seed: int = 0):
    """A random-weight GPT-2-architecture SubjectModel with a BPE tokenizer trained on ``texts``,
    built in memory in well under a second: the real code paths, no download."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from .subject_model import SPECIAL_TOKEN, SubjectModel, train_tokenizer

    tokenizer = train_tokenizer(texts or SAMPLE_TEXTS * 4, vocab_size)
    torch.manual_seed(seed)
    special = tokenizer.token_to_id(SPECIAL_TOKEN)
    config = GPT2Config(vocab_size=tokenizer.get_vocab_size(), n_positions=context_length, n_embd=d_model,
                        n_layer=n_layers, n_head=n_heads, bos_token_id=special, eos_token_id=special)
    return SubjectModel(GPT2LMHeadModel(config), tokenizer, hook_layer=hook_layer, prepend_bos=prepend_bos,
                        context_length=context_length, name="tiny")


def _default_profile() -> dict[str, Any]:
    # The repository's own profile when running from a checkout (src layout), else nothing.
    path = Path(__file__).resolve().parents[2] / "profiles" / "default.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def micro_params(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The default profile with the micro data sections; ``overrides`` replace whole keys of a
    section (``{"train": {"steps": 20}}`` updates ``train.steps`` only)."""
    params = _default_profile()
    params.update(copy.deepcopy(MICRO_DATA_SECTIONS))
    for section, values in (overrides or {}).items():
        if isinstance(values, dict) and isinstance(params.get(section), dict):
            params[section] = {**params[section], **values}
        else:
            params[section] = values
    return params


def run_micro_data_pipeline(workdir: str | Path, overrides: dict[str, Any] | None = None,
                            progress: bool = False) -> dict[str, Any]:
    """Write ``workdir/params.yaml`` and run the three data stages inside ``workdir``.

    Returns absolute paths (params, corpus, subject_model, activations, metrics) and the seconds
    each stage took."""
    from . import activations, corpus, subject_model

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    params = micro_params(overrides)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    flags = [] if progress else ["--no-progress"]
    seconds = {}
    with contextlib.chdir(workdir):
        with _env(TOKENIZERS_PARALLELISM="false"):
            for name, module, extra in (("corpus", corpus, []), ("subject_model", subject_model, flags),
                                        ("activations", activations, flags)):
                t0 = time.perf_counter()
                rc = module.main(["--params", "params.yaml", *extra])
                if rc:
                    raise RuntimeError(f"stage {name} exited with {rc}")
                seconds[name] = time.perf_counter() - t0
    paths = params["paths"]
    return {
        "workdir": workdir,
        "params": workdir / "params.yaml",
        "corpus": workdir / paths["corpus"],
        "subject_model": workdir / paths["subject_model"],
        "activations": workdir / paths["activations"],
        "metrics": workdir / "results" / "subject_model.json",
        "seconds": seconds,
    }


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
