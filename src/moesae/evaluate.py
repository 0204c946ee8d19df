"""The ``evaluate`` stage: every metric of docs/method.md#metrics for one trained SAE, on held-out
data only (never the training batches).

``moesae evaluate --family F`` (or ``--variant NAME``) writes ``results/eval/<family>/NAME.json``;
``moesae collect`` (:mod:`moesae.collect`) gathers them into the tables the figures read.

What is measured, and on what:

- **Reconstruction** (MSE summed over dims, FVU centred on the mean, L0): on the cached activations
  of the held-out split of the training domain (``heldout``) and of the cross-domain set
  (``cross``), the first ``max_tokens`` tokens of each cache.
- **Dead fraction**: a latent is dead if it never fires on the evaluated held-out tokens of the
  training domain (not the trainer's running count, which only sees training batches).
- **Loss recovered**: on ``loss_batches`` batches of ``loss_batch_sequences`` held-out documents
  (the first non-empty ones, in order) per domain; the SAE reconstruction is spliced into the
  residual stream at the hook and only the blocks after it are run. Zero ablation replaces the
  same positions by 0; **mean ablation** replaces them by the mean activation of the training
  domain's *held-out* cache (the tokens of the reconstruction pass), for both domains. The BOS
  position is left clean (``splice_bos: false``): its residual is an outlier the SAE is not asked
  to reconstruct. Mean and sample standard deviation over batches.
- **SAEBench core metrics** (``sae_bench/evals/core``), beside the paper's: on the reconstruction
  pass, explained variance (1 − FVU, centred on the mean), ``cossim`` (mean cos(x, x̂)), ``l2_ratio``
  (mean ‖x̂‖/‖x‖) and the relative reconstruction bias Σ‖x̂‖² / Σ x·x̂, per split; from the
  loss-recovered pass's own forward passes (no extra run of the subject model), KL(clean ‖ SAE),
  KL(clean ‖ zero ablation), ``kl_div_score`` and ``ce_loss_score``; on the held-out tokens, the
  feature density: a histogram of log10 density (``feature_density_hist`` over the fixed
  ``feature_density_bin_edges``), ``freq_over_1_percent`` / ``freq_over_10_percent`` and the mean /
  median log10 density of the latents that fire.
- **Redundancy**: decoder rows; fraction with max cosine to another row above τ, mean max cosine;
  in-expert redundancy and the random-subset inter-expert baseline (MoE SAEs only).
- **Experts**: usage = share of (token, selected expert) assignments per expert on the held-out
  pass; raw ω per expert and statistics (only when ω is a trained parameter).
- **Probe set**: one token category in a template (``probe_words`` + ``probe_template``); the SAE
  code at the word's first sub-token. Specialisation CDF from the experts owning each probe
  token's top ``probe_top_features`` features (experts ranked by how many they own); activation
  overlap from each token's top-k features (k = the SAE's k), pairs i < j counted once.
- **Cost**: parameters, FLOPs per token (an architecture fact), measured training tokens/s.

Dense SAEs have no experts: their MoE fields are NaN (``null`` in the JSON) and arrays empty.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import metrics as mt
from .devices import check_device, resolve_device
from .io import atomic_write_json
from .params import ParamsError, load_params, require, section_to

RESULTS_DIR = Path("results")
CORE_RECONSTRUCTION_KEYS = ("explained_variance", "cossim", "l2_ratio", "relative_reconstruction_bias")
"""SAEBench core metrics of the reconstruction pass, one column per split (``cossim_heldout``...)."""
EVAL_SUBDIR = "eval"
SPLITS = ("heldout", "cross")

# ---- configuration ----------------------------------------------------------------------------
@dataclass
class EvaluateConfig:
    """The ``evaluate`` section of params.yaml."""

    batch_tokens: int = 4096
    """Tokens per SAE forward pass in the reconstruction pass."""
    max_tokens: int | None = 32768
    """Cached tokens per split used for MSE / FVU / L0 / dead fraction (null = the whole cache)."""
    loss_batches: int = 4
    """Batches of documents for loss recovered (mean and std over batches are reported)."""
    loss_batch_sequences: int = 16
    """Documents per loss-recovered batch (each truncated to the subject model's context)."""
    redundancy_thresholds: list[float] = field(default_factory=lambda: [0.7, 0.8, 0.9])
    """τ values for decoder redundancy (column ``redundancy_<τ>``)."""
    expert_redundancy_threshold: float = 0.8
    """τ for in-expert redundancy and the random-subset inter-expert baseline."""
    redundancy_subsets: int = 8
    """Random equal-size subsets averaged for the inter-expert baseline."""
    probe_words: str = "probe_python_builtins.txt"
    """Probe word list: a file in the package's data folder, or a path."""
    probe_template: str = "x = {w}(y)"
    """Text around each probe word; ``{w}`` is replaced by the word."""
    max_probe_words: int | None = None
    """Use only the first this many probe words (null = all)."""
    probe_top_features: int = 3
    """Top features per probe token whose experts enter the specialisation CDF."""
    splice_bos: bool = False
    """Also replace the BOS position when splicing (false: BOS keeps its clean residual)."""
    device: str = "cpu"
    """Torch device for the SAE and the subject model ("auto" = cuda when available)."""
    seed: int = 0
    """Seed for the random subsets of the inter-expert baseline."""

    def __post_init__(self) -> None:
        def bad(name: str, message: str) -> None:
            raise ValueError(f"invalid evaluate config field '{name}': {message}")

        for name in ("batch_tokens", "loss_batches", "loss_batch_sequences", "redundancy_subsets", "probe_top_features"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                bad(name, f"must be a positive integer, got {value!r}")
        for name in ("max_tokens", "max_probe_words"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                bad(name, f"must be a positive integer or null, got {value!r}")
        if not self.redundancy_thresholds or any(not -1 <= float(t) <= 1 for t in self.redundancy_thresholds):
            bad("redundancy_thresholds", f"must be a non-empty list of cosines in [-1, 1], got {self.redundancy_thresholds!r}")
        self.redundancy_thresholds = [float(t) for t in self.redundancy_thresholds]
        if not -1 <= float(self.expert_redundancy_threshold) <= 1:
            bad("expert_redundancy_threshold", f"must be a cosine in [-1, 1], got {self.expert_redundancy_threshold!r}")
        if "{w}" not in str(self.probe_template):
            bad("probe_template", f"must contain '{{w}}' where the probe word goes, got {self.probe_template!r}")
        try:
            check_device(self.device)
        except ValueError as exc:
            bad("device", str(exc))

    def torch_device(self) -> torch.device:
        return resolve_device(self.device, "evaluate.device")


# ---- what evaluate_sae needs from the other stages (see moesae.subject_model / .activations) --
class SubjectModelLike(Protocol):
    prepend_bos: bool
    context_length: int

    def encode_texts(self, texts: list[str], context_length: int | None = None) -> tuple[Tensor, Tensor]: ...
    def hook_activations(self, tokens: Tensor, mask: Tensor) -> Tensor: ...
    def loss_after_hook(self, tokens: Tensor, mask: Tensor, resid: Tensor) -> Tensor: ...
    def clean_loss(self, tokens: Tensor, mask: Tensor) -> Tensor: ...
    # optional: ``logits_after_hook(tokens, mask, resid) -> [n, V]`` (see logits_after_hook_fn) for KL


class ActivationReaderLike(Protocol):
    d_model: int
    num_tokens: int

    def iter_batches(self, batch_size: int, max_tokens: int | None = None) -> Iterator[Tensor]: ...


# ---- probe words ------------------------------------------------------------------------------
def load_probe_words(name: str) -> list[str]:
    """Read a probe list (one word per line, ``#`` comments): a package data file or a path."""
    packaged = resources.files("moesae") / "data" / name
    path = Path(name)
    if packaged.is_file():
        text = packaged.read_text(encoding="utf-8")
    elif path.is_file():
        text = path.read_text(encoding="utf-8")
    else:
        available = sorted(p.name for p in (resources.files("moesae") / "data").iterdir() if p.name.startswith("probe_"))
        raise FileNotFoundError(
            f"probe word list '{name}' not found (neither in moesae/data nor as a path); "
            f"set evaluate.probe_words to one of {available} or to an existing file"
        )
    words, seen = [], set()
    for line in text.splitlines():
        word = line.split("#", 1)[0].strip()
        if word and word not in seen:
            seen.add(word)
            words.append(word)
    if not words:
        raise ValueError(f"probe word list '{name}' is empty")
    return words


# ---- the core ---------------------------------------------------------------------------------
def _is_moe(sae) -> bool:
    return type(sae).is_moe


def _sparse_code(out, num_latents: int) -> tuple[Tensor, Tensor]:
    """(values, indices) of the code: the SAE's own sparse form, else the non-zero dense entries
    padded to the row maximum (padding values are 0, so they count as inactive)."""
    if out.top_indices is not None and out.top_values is not None:
        return out.top_values, out.top_indices
    code = out.dense_code(num_latents)
    width = max(1, int((code != 0).sum(1).max()) if code.numel() else 1)
    values, indices = code.abs().topk(width, dim=1)
    return code.gather(1, indices), indices


def _top_features(values: Tensor, indices: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Each token's ``count`` largest code entries: (indices, valid) with valid = value > 0."""
    count = min(count, values.shape[1])
    top_vals, pos = values.topk(count, dim=1)
    return indices.gather(1, pos), top_vals > 0


def _identity(sae) -> dict[str, Any]:
    cfg = sae.config_dict()
    cls = type(sae)
    row = {
        "architecture": cfg.get("architecture"),
        "label": cls.config_label(sae.cfg),
        "l0_is_set": cls.l0_is_set,
        "active_width": cls.active_width(sae.cfg),
        "d_in": cfg["d_in"],
        "num_latents": cfg["num_latents"],
        "num_experts": cfg.get("num_experts", math.nan) if _is_moe(sae) else math.nan,
        "active_experts": math.nan,
        "feature_scaling": cfg.get("feature_scaling", ""),
        "gate": cfg.get("gate", ""),
        "k": cfg.get("k"),
        "seed": cfg.get("seed"),
    }
    if _is_moe(sae):
        row["active_experts"] = cls.experts_per_token(sae.cfg)
    return row


def _check_finite(what: str, value: Tensor, split: str) -> None:
    if not torch.isfinite(value).all():
        raise RuntimeError(
            f"the SAE's {what} is NaN/inf on split '{split}': training diverged or the checkpoint is corrupt; "
            "retrain this variant (lower its learning rate if it diverges again)"
        )


@torch.no_grad()
def reconstruction_pass(sae, reader: ActivationReaderLike, cfg: EvaluateConfig, split: str, progress: bool = False) -> dict[str, Any]:
    """MSE, FVU, L0, feature fire counts, expert assignments and the activation sum over one cache."""
    device = next(sae.parameters()).device
    M = sae.cfg.num_latents
    d = reader.d_model
    if d != sae.cfg.d_in:
        raise ValueError(
            f"the '{split}' activation cache has width {d} but the SAE reads d_in={sae.cfg.d_in}; "
            "re-run `moesae activations` or retrain the SAE on this subject model"
        )
    sse, sum_sq, n, l0_sum = 0.0, 0.0, 0, 0.0
    cos_sum, l2_ratio_sum, xhat_sq, x_dot_xhat = 0.0, 0.0, 0.0, 0.0  # the SAEBench core sums
    sum_x = torch.zeros(d, dtype=torch.float64)
    fire = torch.zeros(M, dtype=torch.long)
    num_experts = sae.cfg.num_experts if _is_moe(sae) else 0
    assignments = torch.zeros(max(num_experts, 1), dtype=torch.long)
    total = cfg.max_tokens if cfg.max_tokens is not None else reader.num_tokens
    bar = tqdm(total=min(total, reader.num_tokens), disable=not progress, desc=f"eval {split}", unit="tok")
    for x in reader.iter_batches(cfg.batch_tokens, cfg.max_tokens):
        x = x.to(device=device, dtype=torch.float32)
        out = sae(x)
        _check_finite("reconstruction", out.x_hat, split)
        x64, err = x.double(), (x - out.x_hat).double()
        sse += float(err.pow(2).sum())
        x_hat64 = out.x_hat.double()
        cos_sum += float(mt.token_cosine_similarity(x64, x_hat64).sum())
        l2_ratio_sum += float(mt.token_l2_ratio(x64, x_hat64).sum())
        xhat_sq += float(x_hat64.pow(2).sum())
        x_dot_xhat += float((x64 * x_hat64).sum())
        sum_sq += float(x64.pow(2).sum())
        sum_x += x64.sum(0).cpu()
        n += x.shape[0]
        values, indices = _sparse_code(out, M)
        l0_sum += float((values != 0).sum())
        fire += mt.feature_fire_counts(indices, values, M).cpu()
        selected = out.extras.get("selected_experts") if num_experts else None
        if selected is not None:
            assignments += torch.bincount(selected.reshape(-1).cpu().long(), minlength=num_experts)
        bar.update(x.shape[0])
    bar.close()
    if n == 0:
        raise ValueError(f"the '{split}' activation cache is empty; re-run `moesae activations`")
    # share of (token, selected expert) assignments per expert, as metrics.expert_usage
    usage = assignments.double() / assignments.sum() if num_experts and assignments.sum() > 0 else torch.empty(0)
    return {
        "mse": sse / n,
        "fvu": mt.fvu_from_sums(sse, sum_x, sum_sq, n),
        "explained_variance": mt.explained_variance_from_sums(sse, sum_x, sum_sq, n),
        "cossim": cos_sum / n,
        "l2_ratio": l2_ratio_sum / n,
        "relative_reconstruction_bias": mt.relative_reconstruction_bias_from_sums(xhat_sq, x_dot_xhat),
        "l0": l0_sum / n,
        "num_tokens": n,
        "fire_counts": fire,
        "expert_usage": usage,
        "mean_activation": (sum_x / n).float(),
    }


def _non_empty(texts: Iterable[str]) -> list[str]:
    return [t for t in texts if isinstance(t, str) and t.strip()]


def logits_after_hook_fn(subject) -> Callable[[Tensor, Tensor, Tensor], Tensor] | None:
    """The subject model's ``logits_after_hook(tokens, mask, resid) → logits [n, V]`` (the logits
    when the hook's residual is ``resid``, at the positions with a next-token target,
    ``mask[:, 1:] & mask[:, :-1]``, row-major), or None when it has none: then only the
    cross-entropies are measured and the KL columns are NaN."""
    own = getattr(subject, "logits_after_hook", None)
    return own if callable(own) else None


P_CLEAN_CACHE_BYTES = 256 * 2**20
"""Largest clean next-token distribution (per loss batch) :func:`loss_baseline` keeps for the
KL of every SAE; above it (a large vocabulary) the clean logits are recomputed per SAE instead."""


@torch.no_grad()
def loss_baseline(subject: SubjectModelLike, texts: Sequence[str], mean_activation: Tensor, cfg: EvaluateConfig,
                  split: str) -> list[dict[str, Any]]:
    """What loss recovered needs that does not depend on the SAE, per batch of documents: the
    tokens, the hook's residual and the positions replaced, and the clean, zero-ablation and
    mean-ablation runs (cross-entropies, KL of zero ablation, the clean distribution).

    Computed once per evaluate stage and reused for every SAE of the family: three of the four
    runs after the hook per batch, plus the runs up to it, are the same for every SAE."""
    docs = _non_empty(texts)[: cfg.loss_batches * cfg.loss_batch_sequences]
    if not docs:
        raise ValueError(f"the '{split}' corpus split has no non-empty text for loss recovered; re-run `moesae corpus`")
    logits_fn = logits_after_hook_fn(subject)
    out: list[dict[str, Any]] = []
    for start in range(0, len(docs), cfg.loss_batch_sequences):
        tokens, mask = subject.encode_texts(docs[start : start + cfg.loss_batch_sequences])
        resid = subject.hook_activations(tokens, mask)
        replace = mask.to(resid.device).bool().clone()
        if getattr(subject, "prepend_bos", False) and not cfg.splice_bos:
            replace[:, 0] = False
        if not replace.any():
            continue
        x = resid[replace].to(dtype=torch.float32)
        batch: dict[str, Any] = {"tokens": tokens, "mask": mask, "resid": resid, "replace": replace, "x": x}
        ablations = {"zero": _spliced(resid, replace, torch.zeros_like(x)),
                     "mean": _spliced(resid, replace, mean_activation.to(x).expand_as(x))}
        if logits_fn is None:
            batch["ce"] = {"clean": float(subject.clean_loss(tokens, mask))}
            batch["ce"].update({key: float(subject.loss_after_hook(tokens, mask, r)) for key, r in ablations.items()})
        else:
            mask_d = mask.bool()
            valid = mask_d[:, 1:] & mask_d[:, :-1]
            if not bool(valid.any()):
                continue
            targets = tokens[:, 1:][valid]
            spliced_pos = replace.to(valid.device)[:, :-1][valid]  # the residual at the predicting position was replaced
            clean_logits = logits_fn(tokens, mask, resid)
            targets = targets.to(clean_logits.device)
            log_p = torch.log_softmax(clean_logits, dim=-1)
            p_clean = log_p.exp()
            neg_entropy = (p_clean * log_p).sum(-1)
            token_ce = {"clean": torch.nn.functional.nll_loss(log_p, targets, reduction="none")}
            kl_zero = None
            for key, r in ablations.items():
                log_q = torch.log_softmax(logits_fn(tokens, mask, r), dim=-1)  # cross-entropy = its NLL
                token_ce[key] = torch.nn.functional.nll_loss(log_q, targets, reduction="none")
                if key == "zero":
                    kl_zero = mt.kl_from_log_probs(log_p, log_q, p_clean, neg_entropy)
                del log_q
            keep_p = p_clean.numel() * p_clean.element_size() <= P_CLEAN_CACHE_BYTES
            batch.update({"targets": targets, "keep": spliced_pos.to(targets.device), "token_ce": token_ce,
                          "kl_zero": kl_zero, "p_clean": p_clean if keep_p else None,
                          "neg_entropy": neg_entropy if keep_p else None})
            del clean_logits, log_p
        out.append(batch)
    if not out:
        raise ValueError(f"no token of the '{split}' loss batches could be replaced (all padding or BOS)")
    return out


def _spliced(resid: Tensor, replace: Tensor, values: Tensor) -> Tensor:
    out = resid.clone()
    out[replace] = values.to(device=resid.device, dtype=resid.dtype)
    return out


@torch.no_grad()
def loss_recovered_pass(sae, subject: SubjectModelLike, texts: Sequence[str], mean_activation: Tensor,
                        cfg: EvaluateConfig, split: str, progress: bool = False,
                        baseline: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """Loss recovered with zero and mean ablation over ``loss_batches`` batches of documents, and
    from the same forward passes the SAEBench scores: KL(clean ‖ spliced) with the SAE and with
    zero ablation, ``kl_div_score`` and ``ce_loss_score`` (token averages over the positions whose
    residual was replaced, so BOS is left out unless ``splice_bos``, as SAEBench skips special
    tokens). Per batch: the clean run and the three splices after the hook; ``baseline`` (from
    :func:`loss_baseline` on the same texts and mean) supplies all but the SAE's splice."""
    device = next(sae.parameters()).device
    if baseline is None:
        baseline = loss_baseline(subject, texts, mean_activation, cfg, split)
    per_batch: dict[str, list[float]] = {key: [] for key in ("clean", "recon", "zero", "mean", "lr_zero", "lr_mean")}
    sums = {key: 0.0 for key in ("ce_clean", "ce_recon", "ce_zero", "kl_recon", "kl_zero")}
    scored = 0  # positions entering the SAEBench token averages
    logits_fn = logits_after_hook_fn(subject)
    for batch in tqdm(baseline, disable=not progress, desc=f"loss {split}", unit="batch"):
        tokens, mask, resid, replace = batch["tokens"], batch["mask"], batch["resid"], batch["replace"]
        x_hat = sae(batch["x"].to(device=device)).x_hat
        _check_finite("reconstruction", x_hat, split)
        recon = _spliced(resid, replace, x_hat)
        if logits_fn is None:
            ce = {**batch["ce"], "recon": float(subject.loss_after_hook(tokens, mask, recon))}
        else:
            targets, keep = batch["targets"], batch["keep"]
            p_clean, neg_entropy = batch["p_clean"], batch["neg_entropy"]
            if p_clean is None:  # not kept (large vocabulary): the clean distribution again
                log_p = torch.log_softmax(logits_fn(tokens, mask, resid), dim=-1)
                p_clean = log_p.exp()
                neg_entropy = (p_clean * log_p).sum(-1)
                del log_p
            log_q = torch.log_softmax(logits_fn(tokens, mask, recon), dim=-1)
            token_ce = {**batch["token_ce"], "recon": torch.nn.functional.nll_loss(log_q, targets, reduction="none")}
            kl_recon = mt.kl_from_clean(p_clean, neg_entropy, log_q)
            del log_q
            ce = {key: float(token_ce[key].double().mean()) for key in ("clean", "recon", "zero", "mean")}
            scored += int(keep.sum())
            for key in ("clean", "recon", "zero"):
                sums[f"ce_{key}"] += float(token_ce[key][keep].double().sum())
            sums["kl_recon"] += float(kl_recon[keep].sum())
            sums["kl_zero"] += float(batch["kl_zero"][keep].sum())
        for key in ("clean", "recon", "zero", "mean"):
            per_batch[key].append(ce[key])
        per_batch["lr_zero"].append(mt.loss_recovered(ce["clean"], ce["recon"], ce["zero"]))
        per_batch["lr_mean"].append(mt.loss_recovered(ce["clean"], ce["recon"], ce["mean"]))
    lr_zero, lr_zero_std = mt.mean_and_std(per_batch["lr_zero"])
    lr_mean, lr_mean_std = mt.mean_and_std(per_batch["lr_mean"])
    ce_clean, ce_recon, ce_zero, ce_mean = (mt.mean_and_std(per_batch[k])[0] for k in ("clean", "recon", "zero", "mean"))
    if scored:
        kl_sae, kl_zero = sums["kl_recon"] / scored, sums["kl_zero"] / scored
        ce_score = mt.ce_loss_score(sums["ce_clean"] / scored, sums["ce_recon"] / scored, sums["ce_zero"] / scored)
    else:  # no logits from this subject model: KL unmeasured, the CE score from the batch means
        kl_sae = kl_zero = math.nan
        ce_score = mt.ce_loss_score(ce_clean, ce_recon, ce_zero)
    return {
        "loss_recovered_zero": lr_zero,
        f"loss_recovered_zero_{split}_std": lr_zero_std,
        "loss_recovered_mean": lr_mean,
        f"loss_recovered_mean_{split}_std": lr_mean_std,
        "ce_clean": ce_clean,
        "ce_recon": ce_recon,
        "ce_zero": ce_zero,
        "ce_mean": ce_mean,
        "loss_batches": len(per_batch["clean"]),
        "kl_div_with_sae": kl_sae,
        "kl_div_with_ablation": kl_zero,
        "kl_div_score": mt.kl_div_score(kl_sae, kl_zero) if math.isfinite(kl_zero) else math.nan,
        "ce_loss_score": ce_score,
    }


def probe_positions(subject: SubjectModelLike, template: str, tokens: Tensor) -> Tensor:
    """Position of the probe word's first sub-token in each row of ``tokens``.

    The template's text before ``{w}`` (right-stripped, so a space that belongs to the word's token
    stays with it) is tokenised alone; the word starts where the full text first departs from it,
    skipping a whitespace-only token (tokenizers that split " len" into " " + "len"). Assumes the
    word is not empty and does not start with whitespace.
    """
    prefix = template.split("{w}", 1)[0].rstrip()
    p_tokens, p_mask = subject.encode_texts([prefix])
    prefix_ids = p_tokens[0][p_mask[0].bool()]
    L = min(prefix_ids.numel(), tokens.shape[1])
    same = tokens[:, :L] == prefix_ids[:L].to(tokens.device)[None, :]
    # first mismatch, or L where the whole prefix matches
    mismatch = (~same).int()
    first = torch.where(mismatch.any(1), mismatch.argmax(1), torch.full((tokens.shape[0],), L, dtype=torch.long))
    first = first.clamp(max=tokens.shape[1] - 1)
    # a tokenizer that keeps the space apart (" ", "len") puts a whitespace-only token first: skip it
    for row in range(tokens.shape[0]):
        pos = int(first[row])
        while pos + 1 < tokens.shape[1] and not subject.token_strings([int(tokens[row, pos])])[0].strip():
            pos += 1
        first[row] = pos
    return first


@torch.no_grad()
def probe_inputs(subject: SubjectModelLike, words: Sequence[str], cfg: EvaluateConfig, chunk: int = 256) -> list[Tensor]:
    """The hook's residual at each probe word's first sub-token, in chunks of ``chunk`` words
    (SAE-independent: computed once per evaluate stage)."""
    inputs = []
    for start in range(0, len(words), chunk):
        texts = [cfg.probe_template.replace("{w}", w) for w in words[start : start + chunk]]
        tokens, mask = subject.encode_texts(texts)
        positions = probe_positions(subject, cfg.probe_template, tokens)
        resid = subject.hook_activations(tokens, mask)
        inputs.append(resid[torch.arange(resid.shape[0], device=resid.device), positions.to(resid.device)])
    return inputs


@torch.no_grad()
def probe_pass(sae, subject: SubjectModelLike, words: Sequence[str], cfg: EvaluateConfig, chunk: int = 256,
               inputs: list[Tensor] | None = None) -> dict[str, Any]:
    """SAE codes at the probe words; specialisation CDF and activation overlap. ``inputs``: the
    words' residuals from :func:`probe_inputs` (computed here when None)."""
    device = next(sae.parameters()).device
    M, k = sae.cfg.num_latents, sae.cfg.k
    top_idx, top_valid, spec_idx, spec_valid = [], [], [], []
    for x in inputs if inputs is not None else probe_inputs(subject, words, cfg, chunk):
        out = sae(x.to(device=device, dtype=torch.float32))
        values, indices = _sparse_code(out, M)
        idx, valid = _top_features(values, indices, k)
        top_idx.append(idx.cpu())
        top_valid.append(valid.cpu())
        idx, valid = _top_features(values, indices, cfg.probe_top_features)
        spec_idx.append(idx.cpu())
        spec_valid.append(valid.cpu())
    overlap = mt.activation_overlap(torch.cat(top_idx), k, torch.cat(top_valid))
    cdf = torch.empty(0)
    if _is_moe(sae):
        owner = sae.expert_of_feature().cpu()[torch.cat(spec_idx)]
        owner = torch.where(torch.cat(spec_valid), owner, torch.full_like(owner, -1))
        cdf = mt.specialisation_cdf(owner, sae.cfg.num_experts)
    return {"activation_overlap": overlap, "specialisation_cdf": cdf, "probe_tokens": len(words)}


@torch.no_grad()
def evaluate_sae(sae, subject: SubjectModelLike, heldout_reader: ActivationReaderLike, cross_reader: ActivationReaderLike,
                 texts_by_split: dict[str, Sequence[str]], cfg: EvaluateConfig, train_log: dict | None = None,
                 progress: bool = False, cache: dict | None = None) -> dict[str, Any]:
    """Every metric for one SAE: a flat dict of scalars plus the arrays ``omega``,
    ``expert_usage`` and ``specialisation_cdf`` (lists; empty for dense SAEs) and
    ``feature_density_hist`` / ``feature_density_bin_edges`` (log10 density of the latents that
    fire on the held-out tokens; the dead ones are ``dead_fraction``).

    ``cache``: a dict kept across the SAEs of one stage (same subject model, texts and config):
    the SAE-independent runs of the subject model (loss-recovered baselines, probe residuals) are
    computed for the first SAE and reused, with the same results as computing them every time."""
    cache = {} if cache is None else cache
    sae.eval()
    start = time.perf_counter()
    result: dict[str, Any] = _identity(sae)
    result["params"] = int(sae.num_parameters())
    result["flops_per_token"] = int(sae.flops_per_token())
    result["train_tokens_per_s"] = float((train_log or {}).get("tokens_per_second", math.nan))

    readers = {"heldout": heldout_reader, "cross": cross_reader}
    passes = {split: reconstruction_pass(sae, readers[split], cfg, split, progress) for split in SPLITS}
    mean_activation = passes["heldout"]["mean_activation"]
    for split in SPLITS:
        p = passes[split]
        result.update({f"mse_{split}": p["mse"], f"fvu_{split}": p["fvu"], f"l0_{split}": p["l0"],
                       f"num_tokens_{split}": p["num_tokens"]})
        result.update({f"{key}_{split}": p[key] for key in CORE_RECONSTRUCTION_KEYS})
        if split not in texts_by_split:
            raise ValueError(f"no '{split}' texts given for loss recovered (texts_by_split has {sorted(texts_by_split)})")
        key = ("loss_baseline", split)
        if key not in cache or not torch.equal(cache[key][0], mean_activation):
            cache[key] = (mean_activation, loss_baseline(subject, texts_by_split[split], mean_activation, cfg, split))
        lr = loss_recovered_pass(sae, subject, texts_by_split[split], mean_activation, cfg, split, progress,
                                 baseline=cache[key][1])
        for key, value in lr.items():
            result[key if key.endswith("_std") else f"{key}_{split}"] = value
    result["dead_fraction"] = mt.dead_fraction(passes["heldout"]["fire_counts"])
    density = mt.feature_density(passes["heldout"]["fire_counts"], passes["heldout"]["num_tokens"])
    result.update(mt.density_summary(density))
    counts, edges, _ = mt.log10_density_histogram(density)
    result["feature_density_hist"] = counts.tolist()
    result["feature_density_bin_edges"] = edges.tolist()

    result.update(mt.decoder_redundancy(sae.W_dec, cfg.redundancy_thresholds))
    tau = cfg.expert_redundancy_threshold
    in_key, inter_key = f"in_expert_redundancy_{tau:g}", f"inter_expert_redundancy_{tau:g}"
    if _is_moe(sae) and sae.cfg.num_latents // sae.cfg.num_experts >= 2:
        owner = sae.expert_of_feature().cpu()
        result[in_key] = mt.in_expert_redundancy(sae.W_dec.cpu(), owner, tau)
        result[inter_key] = mt.random_subset_redundancy(
            sae.W_dec.cpu(), sae.cfg.num_latents // sae.cfg.num_experts, tau, cfg.redundancy_subsets, cfg.seed
        )
    else:
        result[in_key] = result[inter_key] = math.nan

    omega = getattr(sae, "omega", None)
    omega = omega.detach().cpu() if isinstance(omega, torch.nn.Parameter) else None  # buffer = frozen at 0
    result.update(mt.omega_stats(omega))
    result["omega"] = [] if omega is None else omega.tolist()
    result["expert_usage"] = passes["heldout"]["expert_usage"].tolist()

    words = load_probe_words(cfg.probe_words)
    if cfg.max_probe_words is not None:
        words = words[: cfg.max_probe_words]
    if ("probe", tuple(words)) not in cache:
        cache[("probe", tuple(words))] = probe_inputs(subject, words, cfg)
    probe = probe_pass(sae, subject, words, cfg, inputs=cache[("probe", tuple(words))])
    result["activation_overlap"] = probe["activation_overlap"]
    result["specialisation_cdf"] = probe["specialisation_cdf"].tolist()
    result["probe_tokens"] = probe["probe_tokens"]
    result["probe_template"] = cfg.probe_template
    result["probe_words"] = cfg.probe_words
    result["eval_seconds"] = time.perf_counter() - start
    return result


# ---- files ------------------------------------------------------------------------------------
def _json_safe(value: Any) -> Any:
    """NaN/inf → null (valid JSON); tensors and numpy scalars → Python numbers."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomic(path: Path, data: Any) -> Path:
    """``data`` as JSON (NaN → null), written atomically."""
    return atomic_write_json(path, _json_safe(data))


def load_shared_inputs(params: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """What every variant's evaluation reads: the subject model, held-out caches and texts, and
    the cache of SAE-independent subject-model runs (:func:`evaluate_sae`'s ``cache``).

    Loaded once per process, so a family's variants are evaluated after one model load.
    """
    from .activations import ActivationReader
    from .corpus import load_split
    from .subject_model import load_subject_model

    paths = params.get("paths") or {}
    subject = load_subject_model(require(paths, "subject_model", "paths"), device=str(device))
    activations = Path(require(paths, "activations", "paths"))
    readers = {split: ActivationReader(activations / split) for split in SPLITS}
    corpus = Path(require(paths, "corpus", "paths"))
    texts = {split: load_split(corpus, split)["text"] for split in SPLITS}
    return {"subject": subject, "readers": readers, "texts": texts, "cache": {}}


def eval_path(variant: str, family: str, results_dir: str | Path = RESULTS_DIR) -> Path:
    """``results/eval/<family>/<variant>.json``."""
    return Path(results_dir) / EVAL_SUBDIR / family / f"{variant}.json"


def run_evaluation(variant: str, params_path: str | Path = "params.yaml", results_dir: str | Path = RESULTS_DIR,
                   progress: bool = True, shared: dict[str, Any] | None = None) -> Path:
    """Evaluate one variant and write ``<results_dir>/eval/<family>/<variant>.json``. Any failure is
    re-raised naming the variant; other variants' results are never touched."""
    from .grid import model_dir, study_variants
    from .saes import load_sae
    from .training import read_train_log

    params = load_params(params_path)
    variants = study_variants(params)
    if variant not in variants:
        raise ParamsError(
            f"no variant named '{variant}' in params.yaml's grid (variants are <family>_k<k>[_s<seed>])"
        )
    cfg = section_to(EvaluateConfig, params.get("evaluate"), "evaluate")
    family = str(variants[variant].get("family", variant))
    try:
        device = cfg.torch_device()
        shared = shared or load_shared_inputs(params, device)
        folder = model_dir(variant, variants[variant])
        sae = load_sae(folder).to(device)
        try:
            train_log = read_train_log(folder)[1]
        except FileNotFoundError:
            train_log = {}
        readers, texts = shared["readers"], shared["texts"]
        result = evaluate_sae(sae, shared["subject"], readers["heldout"], readers["cross"], texts, cfg, train_log, progress,
                              cache=shared.setdefault("cache", {}))
        for key in ("mse_heldout", "mse_cross"):
            if not math.isfinite(result[key]):
                raise RuntimeError(f"{key} is {result[key]}: training diverged; retrain this variant")
    except Exception as exc:  # name the variant; the grid's other cells are not touched
        kind = FileNotFoundError if isinstance(exc, FileNotFoundError) else ValueError if isinstance(exc, ValueError) else RuntimeError
        raise kind(f"variant '{variant}': {exc}") from exc
    result = {"variant": variant, "family": family, **result}
    return write_json_atomic(eval_path(variant, family, results_dir), result)


EXTERNAL_SUBDIR = "external"


def run_external_evaluation(sae_dir: str | Path, params_path: str | Path = "params.yaml", out: str | Path | None = None,
                            results_dir: str | Path = RESULTS_DIR, progress: bool = True) -> Path:
    """Evaluate the SAE in ``sae_dir`` (a moesae checkpoint, an SAELens folder or a plain export)
    on this pipeline's held-out data; writes ``<results_dir>/external/<folder name>.json`` (or
    ``out``), outside ``results/eval`` so that the grid's stages and tables are not touched."""
    from .saes import load_sae

    params = load_params(params_path)
    cfg = section_to(EvaluateConfig, params.get("evaluate"), "evaluate")
    device = cfg.torch_device()
    sae = load_sae(sae_dir).to(device)
    shared = load_shared_inputs(params, device)
    readers, texts = shared["readers"], shared["texts"]
    result = evaluate_sae(sae, shared["subject"], readers["heldout"], readers["cross"], texts, cfg, {}, progress)
    name = Path(sae_dir).resolve().name
    source = getattr(sae, "imported_from", {}).get("format", "moesae")
    result = {"variant": name, "family": EXTERNAL_SUBDIR, "sae_dir": str(sae_dir), "checkpoint_format": source, **result}
    path = Path(out) if out is not None else Path(results_dir) / EXTERNAL_SUBDIR / f"{name}.json"
    return write_json_atomic(path, result)


# ---- CLI --------------------------------------------------------------------------------------
def _timing(stage: str):
    from .timing import record

    return record(stage)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moesae evaluate", description="Evaluate trained SAEs on held-out data")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--family", help="evaluate every variant of this grid family (one DVC stage per family)")
    group.add_argument("--variant", action="append", help="variant name from params.yaml (repeatable)")
    group.add_argument("--sae-dir", help="evaluate the SAE in this folder (moesae, SAELens or plain export) on this "
                                         "pipeline's held-out data; writes results/external/<folder>.json")
    parser.add_argument("--out", help="with --sae-dir: the JSON file to write instead")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.out is not None and args.sae_dir is None:
        parser.error("--out goes with --sae-dir")
    if args.sae_dir is not None:
        # no timing file: results/timings is the pipeline's run time (the report sums it)
        path = run_external_evaluation(args.sae_dir, args.params, args.out, progress=not args.no_progress)
        print(f"[evaluate] {args.sae_dir}: wrote {path}")
        return 0
    from .grid import family_variants

    params = load_params(args.params)
    names = family_variants(params, args.family) if args.family else args.variant
    cfg = section_to(EvaluateConfig, params.get("evaluate"), "evaluate")
    with _timing("evaluate@" + (args.family or "+".join(names))):
        if args.family:  # the stage owns results/eval/<family>/: drop files of removed variants
            folder = Path(RESULTS_DIR) / EVAL_SUBDIR / args.family
            for stale in folder.glob("*.json") if folder.is_dir() else []:
                if stale.stem not in names:
                    stale.unlink()
        shared = load_shared_inputs(params, cfg.torch_device())
        for name in names:
            path = run_evaluation(name, args.params, progress=not args.no_progress, shared=shared)
            print(f"[evaluate] {name}: wrote {path}")
    return 0
