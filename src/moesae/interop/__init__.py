"""Checkpoints other tools read, and checkpoints of other tools read here (docs/interop.md).

- :mod:`.saelens`: a moesae SAE ⇄ an SAELens 6.x folder (``cfg.json`` + ``sae_weights.safetensors``
  that ``sae_lens.SAE.load_from_disk`` loads), for the architectures SAELens has (TopK, ReLU →
  ``standard``, JumpReLU, Gated; BatchTopK and Feature Choice → ``jumprelu`` with their
  inference thresholds). ``moesae.load_sae`` on an SAELens folder builds the equivalent SAE.
- :mod:`.plain`: any SAE, MoE ones included, as plain safetensors + a self-describing
  ``cfg.json`` (expert layout, router, Feature Scaling tensors), readable without moesae.
- :mod:`.metadata`: the hook name, model name, context size and BOS handling written beside the
  weights, read from the subject model's folder and params.yaml.

Nothing here imports ``sae_lens``: the files follow its source (``sae_lens/saes/*.py``,
``sae_lens/loading/pretrained_sae_loaders.py``), and the tests check them against a
re-implementation of its forward passes.
"""
from __future__ import annotations

from .plain import PLAIN_FORMAT, is_plain_config, load_plain, to_plain, write_plain
from .saelens import (
    SAELENS_ARCHITECTURE, from_saelens, is_saelens_config, load_saelens, to_saelens, write_saelens,
)

__all__ = [
    "PLAIN_FORMAT", "SAELENS_ARCHITECTURE", "from_saelens", "is_plain_config", "is_saelens_config", "load_plain",
    "load_saelens", "to_plain", "to_saelens", "write_plain", "write_saelens", "load_foreign",
]


def load_foreign(path, cfg: dict):
    """The SAE of a folder whose ``cfg.json`` (already parsed as ``cfg``) is not moesae's own
    checkpoint layout, or None when it is. Called by :func:`moesae.saes.registry.load_sae`."""
    if is_plain_config(cfg):
        return load_plain(path, cfg)
    if is_saelens_config(cfg):
        return load_saelens(path, cfg)
    return None
