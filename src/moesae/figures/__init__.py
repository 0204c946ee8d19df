"""The figures of the study: one module per figure (``fig01_architecture`` … ``fig11_decomposition``,
``table1_configurations``), each with a ``plot`` function, drawn by its notebook in ``notebooks/``.

This file holds only the captions (``FIGURES``: name → (title, caption)), which the report and
the notebooks read. It imports no figure module, so that each figure's DVC stage depends on its
own module (plus :mod:`moesae.figures.draw`, :mod:`moesae.figures.style` and
:mod:`moesae.results`) and editing one figure reruns only that figure's stage. What each figure
shows and which grid families feed it: docs/method.md, "Figures".
"""
from __future__ import annotations

FIGURES: dict[str, tuple[str, str]] = {
    "fig01_architecture": (
        "Fig 1 · Scale SAE architecture",
        "The Scale SAE as configured in this run: a router picks the e experts with the largest "
        "probability out of N, Feature Scaling (ω, T) sharpens each selected expert's encoder, a global "
        "TopK keeps k of the e·m candidate features, and one shared decoder reconstructs x.",
    ),
    "fig02_omega": (
        "Fig 2 · Feature Scaling ω vs active experts",
        "Mean learned ω (raw; the encoder's high-frequency multiplier is 1 + ω) against the number of "
        "active experts e, one line per L0. The paper reports ω growing with e.",
    ),
    "fig03_main_comparison": (
        "Fig 3 · Reconstruction and loss recovered vs L0",
        "(a) MSE on held-out text of the training domain, (b) MSE and (c) loss recovered (zero "
        "ablation) on the cross-domain set, against L0, for Scale SAE (N, e), Switch SAE, TopK and the "
        "other baselines (one colour and marker per configuration, shared by all panels); (d) "
        "automated-interpretability (fuzzing) accuracy per activation quantile, MoE SAEs and dense SAEs "
        "in two panels.",
    ),
    "fig04_active_experts": (
        "Fig 4 · Number of active experts (no Feature Scaling)",
        "MSE and loss recovered against L0 for e active experts out of N, without Feature Scaling, on "
        "both domains (e = 1 is the authors' Switch preset).",
    ),
    "fig05_feature_scaling": (
        "Fig 5 · With vs without Feature Scaling",
        "Solid: with Feature Scaling, dashed: without. Left: against e at a low and a high L0; right: "
        "against L0 at two values of e. Held-out text of the training domain.",
    ),
    "fig06_specialisation": (
        "Fig 6 · Expert specialisation",
        "Cumulative share of a probe category's top features owned by the experts, experts sorted by "
        "usage (x: fraction of experts), for the MoE SAEs of Fig 3. A curve far above the diagonal means "
        "a few experts own the category.",
    ),
    "fig07_redundancy": (
        "Fig 7 · Feature redundancy without Feature Scaling",
        "Fraction of decoder rows whose maximum cosine similarity to another row exceeds 0.8, for e "
        "active experts × L0, without Feature Scaling.",
    ),
    "fig08_redundancy_scaling": (
        "Fig 8 · Redundancy with vs without Feature Scaling",
        "Redundancy (max cosine > 0.8) against e, without (dashed) and with (solid) Feature Scaling.",
    ),
    "fig09_expert_redundancy": (
        "Fig 9 · In-expert vs inter-expert redundancy",
        "Redundancy (max cosine > 0.8) within each expert, averaged over experts (solid), against the "
        "same statistic on random equal-size subsets of the whole dictionary (dashed); one colour per L0.",
    ),
    "fig10_activation_overlap": (
        "Fig 10 · Activation overlap",
        "Left: mean share of top-k features two probe tokens have in common, without Feature Scaling. "
        "Right: change with Feature Scaling, in percent (positive: less overlap with scaling).",
    ),
    "fig11_decomposition": (
        "Fig 11 · Feature Scaling decompositions",
        "MSE against L0 for the mean-based (the paper's), identity-based and learned-based "
        "low-frequency decompositions, and without Feature Scaling.",
    ),
    "table1_configurations": (
        "Table 1 · Configurations",
        "Every trained configuration with its parameter count, forward FLOPs per token, measured "
        "training throughput and headline metrics (mean over seeds).",
    ),
}
