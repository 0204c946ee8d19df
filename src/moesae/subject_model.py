"""Stage ``subject-model``: the language model whose activations the SAEs learn to reconstruct.

Both profiles use one code path: a HuggingFace GPT-2-architecture model (``GPT2LMHeadModel``)
plus a byte-level BPE ``tokenizer.json`` saved together in ``paths.subject_model`` with a small
``subject.json`` (hook layer, BOS choice, context length). Everything downstream calls
:func:`load_subject_model` and never cares where the weights came from.

* ``source: train`` (default profile): a small GPT-2 trained here, on CPU, in minutes, on the
  corpus ``train`` split, with its own byte-level BPE tokenizer (``tokenizers``).
* ``source: pretrained`` (paper profile): GPT-2 small from the local HuggingFace cache, loaded
  with ``local_files_only`` so that a missing download fails at once with instructions instead of
  retrying the network.

The hook is the residual stream after block ``hook_layer`` (the block's output hidden state),
which is TransformerLens's ``blocks.<L>.hook_resid_post`` for a model loaded without weight
processing. ``loss_after_hook`` runs only the blocks after the hook, plus ``ln_f`` and the head.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from .devices import check_device
from .devices import resolve_device as _resolve_device
from .io import atomic_write_json
from .params import load_params, section_to

META_FILE = "subject.json"
TOKENIZER_FILE = "tokenizer.json"
METRICS_FILE = Path("results/subject_model.json")
SPECIAL_TOKEN = "<|endoftext|>"


@dataclass
class SubjectModelConfig:
    """The ``subject_model`` section of params.yaml."""

    source: str = "train"
    """``train``: a small GPT-2 trained here; ``pretrained``: ``name`` from the local HF cache."""
    name: str = "gpt2"
    """HF model id for ``source: pretrained``."""
    hook_layer: int = 2
    """Residual stream after this block (``blocks.<hook_layer>.hook_resid_post``)."""
    prepend_bos: bool = True
    """Put the BOS token (``<|endoftext|>``) first in every context, as TransformerLens does."""
    context_length: int = 128
    """Tokens per context (BOS included) for training and, by default, for the activation cache."""
    # ---- source: train ----
    vocab_size: int = 4096
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    steps: int = 600
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    seed: int = 0
    threads: int | None = None
    """torch CPU threads for training (null: torch's default)."""
    val_windows: int = 256
    """Held-out contexts for the reported validation loss."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``."""

    def __post_init__(self) -> None:
        if self.source not in {"train", "pretrained"}:
            raise ValueError(f"'source' must be 'train' or 'pretrained', got {self.source!r}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "steps", "batch_size", "context_length", "val_windows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"'{name}' must be a positive integer, got {value!r}")
        if self.context_length < 2:
            raise ValueError(f"'context_length' must be at least 2, got {self.context_length}")
        if self.source == "train":
            if self.d_model % self.n_heads:
                raise ValueError(f"'d_model' ({self.d_model}) must be divisible by 'n_heads' ({self.n_heads})")
            if not 0 <= self.hook_layer < self.n_layers:
                raise ValueError(f"'hook_layer' must be in [0, n_layers={self.n_layers}), got {self.hook_layer}")
            if self.vocab_size < 300:
                raise ValueError(f"'vocab_size' must be at least 300 (256 bytes + merges), got {self.vocab_size}")
        elif self.hook_layer < 0:
            raise ValueError(f"'hook_layer' must be >= 0, got {self.hook_layer}")
        if not self.lr > 0:
            raise ValueError(f"'lr' must be positive, got {self.lr!r}")
        check_device(self.device)


def resolve_device(device: str) -> str:
    """The device a setting names, as a string (see :mod:`moesae.devices`)."""
    return str(_resolve_device(device, "subject_model.device"))


class SubjectModel:
    """A GPT-2-architecture LM with a tokenizer and one hook point, ready for SAE work."""

    def __init__(self, model, tokenizer, *, hook_layer: int, prepend_bos: bool, context_length: int,
                 name: str = "", device: str = "cpu") -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.name = name
        cfg = model.config
        self.d_model: int = cfg.n_embd
        self.n_layers: int = cfg.n_layer
        if not 0 <= hook_layer < self.n_layers:
            raise ValueError(f"'hook_layer' {hook_layer} is outside the model's {self.n_layers} blocks")
        self.hook_layer = int(hook_layer)
        self.hook_name = f"blocks.{self.hook_layer}.hook_resid_post"
        self.prepend_bos = bool(prepend_bos)
        self.context_length = int(min(context_length, cfg.n_positions))
        special = tokenizer.token_to_id(SPECIAL_TOKEN)
        if special is None:
            raise ValueError(f"the tokenizer has no {SPECIAL_TOKEN} token (needed as BOS and padding)")
        self.bos_token_id: int = special
        self.pad_token_id: int = special
        self.vocab_size: int = cfg.vocab_size

    # ---- text → tokens -------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without BOS."""
        return [enc.ids for enc in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def windows(self, token_lists: Sequence[Sequence[int]], context_length: int | None = None,
                split_long: bool = True) -> list[tuple[int, int, list[int]]]:
        """Contexts (doc index, first token's offset in the document, ids incl. BOS) from documents.

        ``split_long``: cut a long document into consecutive contexts; otherwise keep only its
        first context (the Switch / Scale SAE code truncates each document)."""
        n = self._ctx(context_length)
        body = n - 1 if self.prepend_bos else n
        out = []
        for doc, ids in enumerate(token_lists):
            starts = range(0, len(ids), body) if split_long else range(0, min(len(ids), 1))
            for start in starts:
                chunk = list(ids[start:start + body])
                out.append((doc, start, [self.bos_token_id] + chunk if self.prepend_bos else chunk))
        return out

    def pad(self, seqs: Sequence[Sequence[int]], length: int | None = None) -> tuple[Tensor, Tensor]:
        """Right-pad to a batch: (tokens LongTensor[B, T], mask BoolTensor[B, T], False on padding)."""
        T = length or max((len(s) for s in seqs), default=1)
        tokens = torch.full((len(seqs), T), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.bool)
        for i, s in enumerate(seqs):
            s = list(s)[:T]
            tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = True
        return tokens, mask

    def encode_texts(self, texts: Sequence[str], context_length: int | None = None) -> tuple[Tensor, Tensor]:
        """Each text's first context (BOS first when ``prepend_bos``), right-padded."""
        n = self._ctx(context_length)
        body = n - 1 if self.prepend_bos else n
        prefix = [self.bos_token_id] if self.prepend_bos else []
        seqs = [prefix + list(ids[:body]) for ids in self.tokenize(texts)]
        return self.pad(seqs)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """A readable string per token id (byte-level pieces decoded; partial UTF-8 shows as �)."""
        return [self.tokenizer.decode([int(i)], skip_special_tokens=False) for i in ids]

    def _ctx(self, context_length: int | None) -> int:
        n = int(context_length or self.context_length)
        limit = self.model.config.n_positions
        if n > limit:
            raise ValueError(f"context_length {n} exceeds the model's {limit} positions")
        if n < 1 + int(self.prepend_bos):
            raise ValueError(f"context_length {n} leaves no room for a token")
        return n

    # ---- forward pieces --------------------------------------------------------------------------
    def _prepare(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        if tokens.shape != mask.shape or tokens.ndim != 2:
            raise ValueError(f"tokens {tuple(tokens.shape)} and mask {tuple(mask.shape)} must be the same [B, T] shape")
        return tokens.to(self.device), mask.to(self.device)

    def _causal_mask(self, hidden: Tensor, mask: Tensor):
        from transformers.masking_utils import create_causal_mask

        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        return create_causal_mask(config=self.model.config, inputs_embeds=hidden, attention_mask=mask.long(),
                                  past_key_values=None, position_ids=positions)

    def _blocks(self, hidden: Tensor, mask: Tensor, start: int, stop: int) -> Tensor:
        causal = self._causal_mask(hidden, mask)
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        for block in self.model.transformer.h[start:stop]:
            out = block(hidden, None, causal, position_ids=positions)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def _loss_from(self, hidden: Tensor, tokens: Tensor, mask: Tensor, reduction: str) -> Tensor:
        # The head runs only on positions with a valid target: with a 4k-50k vocabulary the
        # logits dominate the cost, and padding rows would be thrown away anyway.
        if reduction not in {"mean", "none"}:
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        valid = mask[:, 1:] & mask[:, :-1]
        if reduction == "mean" and not bool(valid.any()):
            raise ValueError("no valid next-token positions: every context is shorter than 2 tokens")
        logits = self.model.lm_head(self.model.transformer.ln_f(hidden[:, :-1][valid]))
        ce = torch.nn.functional.cross_entropy(logits.float(), tokens[:, 1:][valid], reduction="none")
        if reduction == "mean":
            return ce.mean()
        out = torch.zeros(valid.shape, dtype=ce.dtype, device=ce.device)
        out[valid] = ce
        return out

    def hook_activations(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Residual stream after block ``hook_layer``: FloatTensor[B, T, d_model]."""
        tokens, mask = self._prepare(tokens, mask)
        tr = self.model.transformer
        positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
        hidden = tr.drop(tr.wte(tokens) + tr.wpe(positions))
        return self._blocks(hidden, mask, 0, self.hook_layer + 1)

    def loss_after_hook(self, tokens: Tensor, mask: Tensor, resid: Tensor, reduction: str = "mean") -> Tensor:
        """Next-token cross-entropy when the hook's residual is replaced by ``resid`` [B, T, d].

        Runs only the blocks after the hook, ``ln_f`` and the head. ``reduction='mean'``: a scalar
        over valid positions; ``'none'``: [B, T-1] with 0 where the target is padding."""
        tokens, mask = self._prepare(tokens, mask)
        if resid.shape != (*tokens.shape, self.d_model):
            raise ValueError(f"resid must have shape {(*tokens.shape, self.d_model)}, got {tuple(resid.shape)}")
        hidden = self._blocks(resid.to(self.device, dtype=next(self.model.parameters()).dtype), mask,
                              self.hook_layer + 1, self.n_layers)
        return self._loss_from(hidden, tokens, mask, reduction)

    def clean_loss(self, tokens: Tensor, mask: Tensor, reduction: str = "mean") -> Tensor:
        """Next-token cross-entropy of the unmodified model over valid positions."""
        tokens, mask = self._prepare(tokens, mask)
        tr = self.model.transformer
        positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
        hidden = tr.drop(tr.wte(tokens) + tr.wpe(positions))
        hidden = self._blocks(hidden, mask, 0, self.n_layers)
        return self._loss_from(hidden, tokens, mask, reduction)


# ---- saving and loading ------------------------------------------------------------------------
def save_subject_model(path: str | Path, model, tokenizer, meta: dict[str, Any]) -> Path:
    """Write weights (safetensors), ``tokenizer.json`` and ``subject.json`` into ``path``, atomically."""
    import shutil

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save(str(tmp / TOKENIZER_FILE))
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def load_subject_model(path: str | Path, device: str = "cpu") -> SubjectModel:
    """The subject model saved by the ``subject-model`` stage (either profile)."""
    from tokenizers import Tokenizer
    from transformers import GPT2LMHeadModel

    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"no subject model at {path} ({META_FILE} missing): run `moesae subject-model` first")
    meta = json.loads(meta_path.read_text())
    device = resolve_device(device)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per load is noise in stage logs
    model = GPT2LMHeadModel.from_pretrained(str(path), local_files_only=True)
    tokenizer = Tokenizer.from_file(str(path / TOKENIZER_FILE))
    return SubjectModel(model, tokenizer, hook_layer=meta["hook_layer"], prepend_bos=meta["prepend_bos"],
                        context_length=meta["context_length"], name=meta.get("name", path.name), device=device)


def fetch_pretrained(name: str):
    """(model, tokenizers.Tokenizer) of ``name`` from the local HF cache (or a local folder);
    fails at once, naming what is missing and how to get it, instead of retrying the network."""
    from huggingface_hub import try_to_load_from_cache
    from tokenizers import Tokenizer
    from transformers import GPT2LMHeadModel

    local = Path(name)
    if local.is_dir():  # a model folder on disk (save_pretrained + tokenizer.json), e.g. a test stand-in
        if not (local / "config.json").is_file() or not (local / TOKENIZER_FILE).is_file():
            raise RuntimeError(f"{local} is not a model folder: it needs config.json, weights and {TOKENIZER_FILE}")
        return GPT2LMHeadModel.from_pretrained(str(local), local_files_only=True), Tokenizer.from_file(str(local / TOKENIZER_FILE))
    missing = [f for f in ("config.json", TOKENIZER_FILE) if not isinstance(try_to_load_from_cache(name, f), str)]
    has_weights = any(isinstance(try_to_load_from_cache(name, f), str) for f in ("model.safetensors", "pytorch_model.bin"))
    if missing or not has_weights:
        what = ", ".join(missing + ([] if has_weights else ["model.safetensors"]))
        raise RuntimeError(
            f"the pretrained subject model '{name}' is not in the local HuggingFace cache (missing: {what}). "
            f"Download it once on a machine with network access: `hf download {name}` "
            f"(or `huggingface-cli download {name}`), or use the offline default profile (`moesae profile default`)."
        )
    try:
        model = GPT2LMHeadModel.from_pretrained(name, local_files_only=True)
        tokenizer = Tokenizer.from_file(try_to_load_from_cache(name, TOKENIZER_FILE))
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"could not load '{name}' from the local HuggingFace cache: {exc}. "
                           f"Re-download it (`hf download {name}`) or use the default profile.") from exc
    return model, tokenizer


# ---- training the default-profile model ------------------------------------------------------
def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """A GPT-2-style byte-level BPE tokenizer with ``<|endoftext|>`` as its only special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def _window_batch(sm: SubjectModel, texts: Sequence[str], limit: int | None = None) -> tuple[Tensor, Tensor]:
    windows = [w[2] for w in sm.windows(sm.tokenize(texts)) if len(w[2]) >= 2]
    if limit is not None:
        windows = windows[:limit]
    if not windows:
        raise ValueError("no text to make contexts from")
    return sm.pad(windows, sm.context_length)


def unigram_loss(train_tokens: Tensor, train_mask: Tensor, tokens: Tensor, mask: Tensor, vocab_size: int) -> float:
    """Cross-entropy of an add-one-smoothed unigram model (from the training tokens) on the same
    next-token targets the LM is scored on: the floor the LM must clearly beat."""
    counts = torch.bincount(train_tokens[train_mask], minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    targets = tokens[:, 1:]
    valid = mask[:, 1:] & mask[:, :-1]
    return float(-logp[targets[valid]].mean())


def train_subject_model(cfg: SubjectModelConfig, train_texts: Sequence[str], val_texts: Sequence[str],
                        progress: bool = True) -> tuple[SubjectModel, dict[str, Any]]:
    """Train the tokenizer and a small GPT-2 on ``train_texts``; returns the model and its metrics."""
    from tqdm.auto import tqdm
    from transformers import GPT2Config, GPT2LMHeadModel

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(train_texts, cfg.vocab_size)
    torch.manual_seed(cfg.seed)
    config = GPT2Config(
        vocab_size=tokenizer.get_vocab_size(), n_positions=cfg.context_length, n_embd=cfg.d_model,
        n_layer=cfg.n_layers, n_head=cfg.n_heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.token_to_id(SPECIAL_TOKEN), eos_token_id=tokenizer.token_to_id(SPECIAL_TOKEN),
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config)
    sm = SubjectModel(model, tokenizer, hook_layer=cfg.hook_layer, prepend_bos=cfg.prepend_bos,
                      context_length=cfg.context_length, name="trained", device=device)
    tokens, mask = _window_batch(sm, train_texts)
    val_tokens, val_mask = _window_batch(sm, val_texts, cfg.val_windows)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    bar = tqdm(range(cfg.steps), desc="subject model", unit="step", disable=not progress)
    loss_value = math.nan
    with torch.enable_grad():  # whatever the caller's grad mode: this loop needs gradients
        for step in bar:
            # Linear warm-up, then cosine decay to 10% of the peak rate.
            if step < cfg.warmup_steps:
                scale = (step + 1) / cfg.warmup_steps
            else:
                frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
                scale = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
            for group in opt.param_groups:
                group["lr"] = cfg.lr * scale
            idx = torch.randint(0, tokens.shape[0], (cfg.batch_size,), generator=gen)
            loss = sm.clean_loss(tokens[idx], mask[idx])
            if not torch.isfinite(loss):
                raise RuntimeError(f"subject-model training diverged (loss {loss.item()}) at step {step}; lower 'subject_model.lr'")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss_value = float(loss.detach())
            if step % 25 == 0:
                bar.set_postfix(loss=f"{loss_value:.3f}")
    model.eval()
    train_seconds = time.perf_counter() - t0
    val_loss = evaluate_loss(sm, val_tokens, val_mask)
    metrics = {
        "val_loss": val_loss,
        "unigram_loss": unigram_loss(tokens, mask, val_tokens, val_mask, config.vocab_size),
        "final_train_loss": loss_value,
        "train_seconds": round(train_seconds, 2),
        "train_tokens": int(mask.sum()),
        "val_tokens": int(val_mask.sum()),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return sm, metrics


@torch.no_grad()
def evaluate_loss(sm: SubjectModel, tokens: Tensor, mask: Tensor, batch_size: int = 64) -> float:
    total, count = 0.0, 0
    for i in range(0, tokens.shape[0], batch_size):
        t, m = tokens[i:i + batch_size], mask[i:i + batch_size]
        ce = sm.clean_loss(t, m, reduction="none")
        total += float(ce.sum())
        count += int((m[:, 1:] & m[:, :-1]).sum())
    return total / max(count, 1)


def _meta(cfg: SubjectModelConfig, sm: SubjectModel, source_name: str) -> dict[str, Any]:
    return {
        "name": source_name, "source": cfg.source, "hook_layer": sm.hook_layer, "hook_name": sm.hook_name,
        "prepend_bos": sm.prepend_bos, "context_length": sm.context_length, "d_model": sm.d_model,
        "n_layers": sm.n_layers, "vocab_size": sm.vocab_size, "bos_token_id": sm.bos_token_id,
    }


def build_subject_model(cfg: SubjectModelConfig, corpus_root: str | Path, out: str | Path,
                        metrics_path: str | Path = METRICS_FILE, progress: bool = True) -> dict[str, Any]:
    """Train (default) or fetch (paper) the subject model, save it to ``out``, write the metric."""
    from .corpus import load_split

    train_texts = list(load_split(corpus_root, "train")["text"])
    val_texts = list(load_split(corpus_root, "heldout")["text"])
    if cfg.source == "train":
        sm, metrics = train_subject_model(cfg, train_texts, val_texts, progress=progress)
        name = "trained"
    else:
        t0 = time.perf_counter()
        model, tokenizer = fetch_pretrained(cfg.name)
        if cfg.context_length > model.config.n_positions:
            raise ValueError(f"'context_length' {cfg.context_length} exceeds {cfg.name}'s {model.config.n_positions} positions")
        sm = SubjectModel(model, tokenizer, hook_layer=cfg.hook_layer, prepend_bos=cfg.prepend_bos,
                          context_length=cfg.context_length, name=cfg.name, device=resolve_device(cfg.device))
        val_tokens, val_mask = _window_batch(sm, val_texts, cfg.val_windows)
        # The unigram floor from a bounded sample of training text (the whole corpus is large).
        ref_tokens, ref_mask = _window_batch(sm, train_texts[:2000])
        metrics = {
            "val_loss": evaluate_loss(sm, val_tokens, val_mask),
            "unigram_loss": unigram_loss(ref_tokens, ref_mask, val_tokens, val_mask, sm.vocab_size),
            "train_seconds": 0.0,
            "load_seconds": round(time.perf_counter() - t0, 2),
            "val_tokens": int(val_mask.sum()),
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        name = cfg.name
    metrics = {"model": name, "hook": sm.hook_name, "d_model": sm.d_model, **metrics}
    save_subject_model(out, sm.model, sm.tokenizer, _meta(cfg, sm, name))
    metrics_path = Path(metrics_path)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(metrics_path, metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    from .timing import record

    parser = argparse.ArgumentParser(prog="moesae subject-model", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    cfg = section_to(SubjectModelConfig, params.get("subject_model"), "subject_model")
    paths = params.get("paths") or {}
    with record("subject_model"):
        metrics = build_subject_model(cfg, paths.get("corpus", "data/corpus"), paths.get("subject_model", "models/subject"),
                                      progress=not args.no_progress)
    print(f"[subject-model] {metrics['model']}: val loss {metrics['val_loss']:.3f} nats "
          f"(unigram {metrics['unigram_loss']:.3f}), hook {metrics['hook']}, d_model {metrics['d_model']}")
    return 0


main_subject_model = main

if __name__ == "__main__":
    raise SystemExit(main())
