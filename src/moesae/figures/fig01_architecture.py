"""Fig 1: the Scale SAE diagram, drawn from a real configuration (a trained checkpoint's cfg.json).

The configuration is chosen by :func:`moesae.results.architecture_config`; the forward cost
printed under the title is the registry's (:func:`moesae.saes.describe`), not a formula of its own.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import draw


def forward_flops(cfg: dict[str, Any]) -> tuple[int, int] | None:
    """``(this configuration's, a dense TopK of width M at the same k)`` forward MACs per token, or
    None when the configuration lacks d."""
    from ..saes import describe

    fields = {k: v for k, v in cfg.items() if k != "architecture"}
    if not fields.get("d_in"):
        return None
    ours = describe(cfg.get("architecture", "scale"), **fields).flops_per_token
    dense = describe("topk", d_in=int(fields["d_in"]), num_latents=int(fields["num_latents"]), k=int(fields["k"]))
    return ours, dense.flops_per_token


def plot(cfg: dict[str, Any], source: str = ""):
    """The Scale SAE diagram for ``cfg`` (N, e, m, k, Feature Scaling, d)."""
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    N = int(cfg["num_experts"])
    e = int(cfg.get("active_experts", 1))
    M = int(cfg["num_latents"])
    k = int(cfg["k"])
    m = M // N
    d = cfg.get("d_in")
    fs = cfg.get("feature_scaling", "mean")
    gate = cfg.get("gate", "prob_softmax")
    fig, axes = draw.figure(1, 1, width=12.5, height=4.8)
    ax = axes[0, 0]
    ax.set_xlim(0, 25)
    ax.set_ylim(0, 9.4)
    ax.set_axis_off()

    def box(x, y, w, h, text, color="#dbe9f6", edge="#3b6ea5", fs_=8.5, weight="normal"):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.08", facecolor=color, edgecolor=edge, linewidth=1.2))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fs_, weight=weight)

    def arrow(x0, y0, x1, y1, color="0.3"):
        ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=11, color=color, linewidth=1.1))

    d_txt = f"d = {d}" if d else "d"
    box(0.2, 4.1, 1.8, 1.2, f"x\n({d_txt})", color="#eeeeee", edge="0.4")
    box(2.3, 6.3, 4.9, 1.7, f"Router\np = softmax(W_g(x − b_g) + c_g)\nover N = {N} experts", color="#fde8c8", edge="#c9822b")
    arrow(1.1, 5.3, 3.2, 6.8)
    # Experts: up to 16 slots drawn; the highlighted ones are an illustrative selection of e.
    shown = min(N, 16)
    selected = set(np.linspace(0, shown - 1, num=min(e, shown)).round().astype(int).tolist()) if e < N else set(range(shown))
    x0, width_all = 7.6, 8.4
    slot = width_all / shown
    for i in range(shown):
        is_sel = i in selected
        ax.add_patch(FancyBboxPatch((x0 + i * slot + 0.04, 4.2), slot - 0.12, 1.0, boxstyle="round,pad=0.02",
                                    facecolor="#4c9f70" if is_sel else "#f2f2f2", edgecolor="#2f6b48" if is_sel else "0.6"))
    more = f"; first {shown} of {N} drawn" if N > shown else ""
    ax.text(x0 + width_all / 2, 3.75, f"N = {N} experts × m = {m} features each{more}", ha="center", fontsize=8.5)
    ax.text(x0 + width_all / 2, 3.25, f"green: the e = {e} selected for a token (illustrative), the only ones computed",
            ha="center", fontsize=7.5, color="0.35")
    arrow(7.2, 7.3, x0 + 0.6, 5.3)
    arrow(2.0, 4.7, x0, 4.7)
    gate_txt = "w_i = softmax over S of p_i" if gate == "prob_softmax" else "w_i = softmax over S of the logits"
    ax.text(x0 + 1.4, 6.3, f"S = the top-{e} experts by p\n{gate_txt}", ha="left", fontsize=8, color="#8a5a1c")
    if fs == "none":
        fs_text = "Feature Scaling: off\n(ω = 0, T = I, frozen)"
    elif fs == "mean":
        fs_text = "Feature Scaling (mean)\nL_i = T μ_i,  H_i = W_i − 1 L_iᵀ\nŴ_i = 1 L_iᵀ + (1 + ω_i) H_i\nω ∈ R^N (one per expert), T ∈ R^(d×d)"
    elif fs == "identity":
        fs_text = "Feature Scaling (identity)\nL_i = μ_i,  H_i = W_i − 1 L_iᵀ\nŴ_i = 1 L_iᵀ + (1 + ω_i) H_i"
    else:
        fs_text = f"Feature Scaling ({fs})\nL_i learned per expert\nŴ_i = 1 L_iᵀ + (1 + ω_i) H_i"
    box(6.0, 0.4, 6.4, 2.3, fs_text, color="#efe3f7", edge="#7d4e9e", fs_=8)
    arrow(9.0, 2.7, 9.0, 3.2)
    ax.text(12.9, 1.6, f"a_i = ReLU(Ŵ_i (x − b_dec) + b_i)\nf = concat over S of w_i · a_i\n{e} × {m} = {e * m} candidate features",
            fontsize=8, va="center")
    box(16.9, 4.0, 2.6, 1.4, f"Global TopK\nkeep k = {k}\nof {e * m}", color="#fbe0e0", edge="#b04040", weight="bold")
    arrow(x0 + width_all, 4.7, 16.9, 4.7)
    box(20.2, 4.0, 2.9, 1.4, f"Decoder\nW_dec: {M} × {d or 'd'}\n(+ b_dec)", color="#dbe9f6")
    arrow(19.5, 4.7, 20.2, 4.7)
    box(23.7, 4.1, 1.1, 1.2, "x̂", color="#eeeeee", edge="0.4", fs_=11)
    arrow(23.1, 4.7, 23.7, 4.7)
    ax.text(0.2, 9.3, f"Scale SAE · M = {M}, N = {N}, e = {e}, m = M/N = {m}, k = {k}, Feature Scaling = {fs}",
            fontsize=10, weight="bold", va="top")
    flops = forward_flops(cfg)
    if flops:
        ours, dense = flops
        ax.text(0.2, 8.6, f"forward multiply-accumulates per token: {ours:,} (router + e·m·d encoder rows + k·d decoder rows); "
                          f"a dense TopK of width M: {dense:,}", fontsize=7.5, color="0.3", va="top")
    if source:
        ax.text(24.8, 0.1, f"drawn from {source}", fontsize=7, color="0.45", ha="right")
    return fig
