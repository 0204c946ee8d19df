"""The evaluate / collect stages on stand-ins: a tiny char-level subject model implementing the
SubjectModel contract and in-memory activation readers. Hand-checkable SAEs (an exact identity
SAE, an SAE that always outputs its bias) pin the loss-recovered and reconstruction numbers."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
import yaml

from moesae import build_sae, cli
from moesae import evaluate as ev
from moesae import collect as collect_mod
from moesae.collect import IDENTITY_COLUMNS
from moesae.params import ParamsError, section_to

D = 8


class TinySubject:
    """SubjectModel stand-in: one token per ASCII character, id = 1 + ord(c) % 127 (BOS = 0);
    embedding + position, two residual tanh blocks, hook after block 0, tied unembedding."""

    hook_layer = 0
    n_layers = 2
    hook_name = "blocks.0.hook_resid_post"

    def __init__(self, d: int = D, vocab: int = 128, context_length: int = 32, prepend_bos: bool = True):
        g = torch.Generator().manual_seed(0)
        self.d_model, self.vocab, self.context_length, self.prepend_bos = d, vocab, context_length, prepend_bos
        self.emb = torch.randn(vocab, d, generator=g)
        self.pos = 0.3 * torch.randn(context_length, d, generator=g)
        self.blocks = [torch.randn(d, d, generator=g) / d**0.5 for _ in range(2)]
        self.calls = {"after_hook": 0}

    def encode_texts(self, texts, context_length=None):
        L = context_length or self.context_length
        rows = [(([0] if self.prepend_bos else []) + [1 + ord(c) % (self.vocab - 1) for c in t])[:L] for t in texts]
        T = max(len(r) for r in rows)
        tokens = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = True
        return tokens, mask

    def token_strings(self, ids):
        return ["<bos>" if i == 0 else chr(i - 1) for i in ids]

    def _block(self, x, i):
        return x + torch.tanh(x @ self.blocks[i])

    def hook_activations(self, tokens, mask):
        return self._block(self.emb[tokens] + self.pos[: tokens.shape[1]], 0)

    def logits_after_hook(self, tokens, mask, resid):
        """Logits at the positions with a next-token target (row-major), as the evaluate stage asks."""
        self.calls["after_hook"] += 1
        logits = self._block(resid, 1) @ self.emb.T
        valid = mask[:, 1:] & mask[:, :-1]
        return logits[:, :-1][valid]

    def loss_after_hook(self, tokens, mask, resid):
        valid = mask[:, 1:] & mask[:, :-1]
        return torch.nn.functional.cross_entropy(self.logits_after_hook(tokens, mask, resid), tokens[:, 1:][valid])

    def clean_loss(self, tokens, mask):
        return self.loss_after_hook(tokens, mask, self.hook_activations(tokens, mask))


class MemoryReader:
    """ActivationReader stand-in over an in-memory tensor."""

    def __init__(self, data):
        self.data = data
        self.d_model = data.shape[1]
        self.num_tokens = data.shape[0]

    def iter_batches(self, batch_size, max_tokens=None):
        n = self.num_tokens if max_tokens is None else min(max_tokens, self.num_tokens)
        for start in range(0, n, batch_size):
            yield self.data[start : min(start + batch_size, n)]


HELDOUT = [f"def f{i}(x):\n    return len(x) + {i}\n" for i in range(40)]
CROSS = [f"The module number {i} explains how lists are sorted.\n" for i in range(40)]


def _cache(subject, texts):
    tokens, mask = subject.encode_texts(texts)
    return subject.hook_activations(tokens, mask)[mask]


@pytest.fixture(scope="module")
def world():
    subject = TinySubject()
    readers = {"heldout": MemoryReader(_cache(subject, HELDOUT)), "cross": MemoryReader(_cache(subject, CROSS))}
    return subject, readers, {"heldout": HELDOUT, "cross": CROSS}


def _cfg(**overrides):
    base = dict(batch_tokens=256, max_tokens=None, loss_batches=4, loss_batch_sequences=5, redundancy_subsets=3,
                max_probe_words=30)
    return ev.EvaluateConfig(**{**base, **overrides})


def _identity_sae(d=D):
    """TopK SAE with encoder = decoder = [I; −I], k = d: relu(x) − relu(−x) = x exactly."""
    sae = build_sae("topk", d_in=d, num_latents=2 * d, k=d)
    W = torch.cat([torch.eye(d), -torch.eye(d)])
    with torch.no_grad():
        sae.W_enc.copy_(W)
        sae.W_dec.copy_(W)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def _bias_only_sae(bias, d=D):
    """Every code is 0 (encoder bias −1e6), so x̂ = b_dec for every token."""
    sae = build_sae("topk", d_in=d, num_latents=2 * d, k=2)
    with torch.no_grad():
        sae.b_enc.fill_(-1e6)
        sae.b_dec.copy_(bias)
    return sae


def _run(sae, world, **overrides):
    subject, readers, texts = world
    return ev.evaluate_sae(sae, subject, readers["heldout"], readers["cross"], texts, _cfg(**overrides),
                           train_log={"tokens_per_second": 1234.5})


# ---- hand-checkable SAEs ----------------------------------------------------------------------
def test_exact_identity_sae(world):
    r = _run(_identity_sae(), world)
    for split in ("heldout", "cross"):
        assert r[f"mse_{split}"] == pytest.approx(0.0, abs=1e-9)
        assert r[f"fvu_{split}"] == pytest.approx(0.0, abs=1e-9)
        assert r[f"l0_{split}"] == pytest.approx(D)  # all d coordinates are non-zero
        assert r[f"loss_recovered_zero_{split}"] == pytest.approx(1.0, abs=1e-5)
        assert r[f"loss_recovered_mean_{split}"] == pytest.approx(1.0, abs=1e-5)
        assert r[f"ce_recon_{split}"] == pytest.approx(r[f"ce_clean_{split}"], abs=1e-5)
        assert r[f"ce_zero_{split}"] != pytest.approx(r[f"ce_clean_{split}"])
        assert r[f"loss_batches_{split}"] == 4
        assert r[f"loss_recovered_zero_{split}_std"] == pytest.approx(0.0, abs=1e-5)
    assert r["dead_fraction"] == 0.0  # every coordinate takes both signs
    # rows ±e_i: cosine 0 to other axes, −1 to the opposite row → max 0, no redundancy
    assert r["mean_max_cos"] == pytest.approx(0.0, abs=1e-6)
    assert r["redundancy_0.7"] == r["redundancy_0.8"] == r["redundancy_0.9"] == 0.0
    # a dense SAE has no experts
    assert math.isnan(r["num_experts"]) and math.isnan(r["omega_mean"])
    assert math.isnan(r["in_expert_redundancy_0.8"]) and math.isnan(r["inter_expert_redundancy_0.8"])
    assert r["omega"] == [] and r["expert_usage"] == [] and r["specialisation_cdf"] == []
    assert 0.0 <= r["activation_overlap"] <= 1.0
    assert (r["params"], r["flops_per_token"], r["train_tokens_per_s"]) == (2 * (16 * D) + 16 + D, 16 * D + D * D, 1234.5)


def test_bias_only_sae_hand_computed(world):
    subject, readers, texts = world
    heldout = readers["heldout"].data.double()
    mean = heldout.mean(0)
    r = _run(_bias_only_sae(mean.float()), world)
    # x̂ = x̄ for every token: MSE = mean ‖x − x̄‖², FVU = 1 (variance centred on the mean)
    assert r["mse_heldout"] == pytest.approx(float((heldout - mean).pow(2).sum(1).mean()), rel=1e-5)
    assert r["fvu_heldout"] == pytest.approx(1.0, rel=1e-5)
    assert r["l0_heldout"] == 0.0 and r["dead_fraction"] == 1.0
    # reconstruction = the mean-ablation value: nothing recovered over mean ablation
    assert r["loss_recovered_mean_heldout"] == pytest.approx(0.0, abs=1e-5)
    assert r["ce_recon_heldout"] == pytest.approx(r["ce_mean_heldout"], abs=1e-6)
    # one batch: loss recovered (zero) = (CE_zero − CE_recon) / (CE_zero − CE_clean) with CE_recon = CE_mean
    r1 = _run(_bias_only_sae(mean.float()), world, loss_batches=1, loss_batch_sequences=20)
    expected = (r1["ce_zero_heldout"] - r1["ce_mean_heldout"]) / (r1["ce_zero_heldout"] - r1["ce_clean_heldout"])
    assert r1["loss_recovered_zero_heldout"] == pytest.approx(expected, rel=1e-9)
    assert math.isnan(r1["loss_recovered_zero_heldout_std"])  # one batch: no spread
    # and an SAE that outputs 0 recovers nothing over zero ablation
    r0 = _run(_bias_only_sae(torch.zeros(D)), world)
    assert r0["loss_recovered_zero_cross"] == pytest.approx(0.0, abs=1e-6)


def test_loss_recovered_keeps_bos_clean_and_uses_only_the_given_batches(world):
    subject, readers, texts = world
    subject.calls["after_hook"] = 0
    _run(_identity_sae(), world, loss_batches=2, loss_batch_sequences=3)
    # per split and batch: clean + recon + zero + mean ablation = 4 calls
    assert subject.calls["after_hook"] == 2 * 2 * 4
    r = _run(_bias_only_sae(torch.zeros(D)), world, splice_bos=True)
    r_kept = _run(_bias_only_sae(torch.zeros(D)), world)
    assert r["ce_zero_heldout"] != pytest.approx(r_kept["ce_zero_heldout"])  # BOS zeroed only with splice_bos


# ---- MoE SAEs ---------------------------------------------------------------------------------
def _scale(**kw):
    sae = build_sae("scale", d_in=D, num_latents=32, k=4, num_experts=4, **kw)
    return sae


def test_scale_sae_expert_metrics(world):
    subject, readers, texts = world
    sae = _scale(active_experts=2, feature_scaling="mean")
    with torch.no_grad():
        sae.omega.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
        sae.b_dec.copy_(readers["heldout"].data.mean(0))
    r = _run(sae, world)
    assert (r["architecture"], r["num_experts"], r["active_experts"], r["feature_scaling"]) == ("scale", 4, 2, "mean")
    assert r["omega"] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert r["omega_mean"] == pytest.approx(0.25)
    # usage by hand: share of (token, selected expert) pairs on the held-out cache
    selected = sae(readers["heldout"].data).extras["selected_experts"]
    expected = torch.bincount(selected.reshape(-1), minlength=4).double() / selected.numel()
    assert r["expert_usage"] == pytest.approx(expected.tolist())
    cdf = r["specialisation_cdf"]
    assert len(cdf) == 4 and cdf[-1] == pytest.approx(1.0)
    assert all(a <= b + 1e-12 for a, b in zip(cdf, cdf[1:]))
    assert 0 <= r["in_expert_redundancy_0.8"] <= 1 and 0 <= r["inter_expert_redundancy_0.8"] <= 1
    assert r["flops_per_token"] == 4 * D + 2 * 8 * D + 4 * D


def test_plain_and_switch_variants(world):
    plain = _run(build_sae("authors_switch", d_in=D, num_latents=32, k=4, num_experts=4), world)
    assert plain["active_experts"] == 1 and plain["feature_scaling"] == "none"
    assert math.isnan(plain["omega_mean"]) and plain["omega"] == []  # ω frozen at 0 is not a parameter
    switch = _run(build_sae("switch", d_in=D, num_latents=32, k=4, num_experts=4), world)
    assert switch["architecture"] == "switch" and switch["active_experts"] == 1
    assert sum(switch["expert_usage"]) == pytest.approx(1.0)


# ---- probe set --------------------------------------------------------------------------------
def test_probe_positions_first_subtoken():
    subject = TinySubject()
    tokens, _ = subject.encode_texts(["f(len)", "f(x)"])
    # [BOS, 'f', '(', word...]: the word starts at position 3
    assert ev.probe_positions(subject, "f({w})", tokens).tolist() == [3, 3]
    tokens, _ = subject.encode_texts(["len is here"])
    assert ev.probe_positions(subject, "{w} is here", tokens).tolist() == [1]  # right after BOS
    # [BOS, 'x', ' ', '=', ' ', word...]: the whitespace-only token before the word is skipped
    tokens, _ = subject.encode_texts(["x = len(y)", "x = id(y)"])
    assert ev.probe_positions(subject, "x = {w}(y)", tokens).tolist() == [5, 5]


def test_probe_word_lists_are_packaged():
    builtins_ = ev.load_probe_words("probe_python_builtins.txt")
    assert {"len", "print", "range"} <= set(builtins_) and len(builtins_) == len(set(builtins_))
    verbs = ev.load_probe_words("probe_past_tense_verbs.txt")
    assert len(verbs) >= 500 and "walked" in verbs and all(" " not in w for w in verbs)
    with pytest.raises(FileNotFoundError, match="probe_words"):
        ev.load_probe_words("probe_nope.txt")


# ---- config -----------------------------------------------------------------------------------
def test_config_errors_name_the_key():
    with pytest.raises(ParamsError, match="probe_template"):
        section_to(ev.EvaluateConfig, {"probe_template": "no placeholder"}, "evaluate")
    with pytest.raises(ParamsError, match="evaluate.batch_size"):
        section_to(ev.EvaluateConfig, {"batch_size": 3}, "evaluate")
    with pytest.raises(ParamsError, match="loss_batches"):
        section_to(ev.EvaluateConfig, {"loss_batches": 0}, "evaluate")


def test_default_profile_evaluate_section_is_valid():
    params = yaml.safe_load(open("profiles/default.yaml"))
    cfg = section_to(ev.EvaluateConfig, params["evaluate"], "evaluate")
    assert cfg.loss_batches >= 4
    assert ev.load_probe_words(cfg.probe_words)


# ---- the stage: files, failures, collect ------------------------------------------------------
def _write_params(path, families):
    params = {"paths": {}, "evaluate": {"batch_tokens": 256, "loss_batches": 4, "loss_batch_sequences": 5,
                                        "max_probe_words": 20, "redundancy_subsets": 2},
              "grid": {"num_latents": 32, "l0": [4, 8], "families": families}}
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture()
def stage(tmp_path, monkeypatch, world):
    subject, readers, texts = world
    saes = {"topk_id_k8": _identity_sae(), "scale_k4": _scale(active_experts=2)}
    bad = _scale(active_experts=2)
    with torch.no_grad():
        bad.W_dec.fill_(math.nan)
    saes["scale_nan_k4"] = bad

    import moesae.saes
    import moesae.training

    monkeypatch.setattr(ev, "load_shared_inputs", lambda params, device: {"subject": subject, "readers": readers, "texts": texts})
    monkeypatch.setattr(moesae.saes, "load_sae", lambda folder: saes[folder.name])
    monkeypatch.setattr(moesae.training, "read_train_log", lambda folder: ([], {"tokens_per_second": 99.0}))
    monkeypatch.chdir(tmp_path)
    _write_params(tmp_path / "params.yaml", {  # variants topk_id_k8, scale_k4, scale_nan_k4
        "topk_id": {"architecture": "topk", "width_fraction": 0.5, "l0": [8]},
        "scale": {"architecture": "scale", "num_experts": 4, "l0": [4]},
        "scale_nan": {"architecture": "scale", "num_experts": 4, "l0": [4]},
    })
    return tmp_path


def test_stage_writes_json_and_failures_name_the_variant(stage, capsys):
    assert cli.main(["evaluate", "--variant", "topk_id_k8", "--no-progress"]) == 0
    written = stage / "results" / "eval" / "topk_id" / "topk_id_k8.json"
    text = written.read_text()
    assert "NaN" not in text  # NaN is written as null: valid JSON
    data = json.loads(text)
    assert data["variant"] == "topk_id_k8" and data["family"] == "topk_id" and data["omega_mean"] is None
    assert (stage / "results" / "timings" / "evaluate@topk_id_k8.json").is_file()
    before = written.stat().st_mtime_ns

    assert cli.main(["evaluate", "--variant", "scale_nan_k4", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "scale_nan_k4" in err and "NaN" in err and "retrain" in err
    assert not (stage / "results" / "eval" / "scale_nan" / "scale_nan_k4.json").exists()
    assert not any(p.name.endswith(".tmp") for p in (stage / "results" / "eval").rglob("*"))
    assert written.stat().st_mtime_ns == before  # the finished cell is untouched

    assert cli.main(["evaluate", "--variant", "nope", "--no-progress"]) == 1
    assert "no variant named 'nope'" in capsys.readouterr().err


def test_collect_tables(stage, capsys):
    for name in ("topk_id_k8", "scale_k4"):
        assert cli.main(["evaluate", "--variant", name, "--no-progress"]) == 0
    (stage / "results" / "eval" / "stale_removed.json").write_text("{}")  # not in params: ignored
    assert cli.main(["collect"]) == 0
    assert "scale_nan_k4" in capsys.readouterr().out  # missing cell reported by name

    frame = pd.read_csv(stage / "results" / "metrics.csv")
    assert list(frame.columns[:len(IDENTITY_COLUMNS)]) == IDENTITY_COLUMNS
    assert frame["label"].tolist() == ["TopK-16", "Scale (4,2)"] and frame["l0_is_set"].all()
    assert frame["variant"].tolist() == ["topk_id_k8", "scale_k4"]
    for col in ("params", "flops_per_token", "train_tokens_per_s", "mse_heldout", "fvu_cross", "l0_cross",
                "loss_recovered_zero_heldout", "loss_recovered_zero_heldout_std", "loss_recovered_mean_cross",
                "loss_recovered_mean_cross_std", "ce_clean_cross", "ce_recon_heldout", "ce_zero_cross",
                "ce_mean_heldout", "dead_fraction", "redundancy_0.7", "redundancy_0.8", "redundancy_0.9",
                "mean_max_cos", "in_expert_redundancy_0.8", "inter_expert_redundancy_0.8", "omega_mean",
                "activation_overlap",
                # the SAEBench core metrics (tests/test_core_metrics.py)
                "explained_variance_heldout", "explained_variance_cross", "cossim_heldout", "l2_ratio_cross",
                "relative_reconstruction_bias_heldout", "kl_div_with_sae_cross", "kl_div_with_ablation_heldout",
                "kl_div_score_heldout", "kl_div_score_cross", "ce_loss_score_heldout", "ce_loss_score_cross",
                "freq_over_1_percent", "freq_over_10_percent", "log10_density_mean", "log10_density_median"):
        assert col in frame.columns, col
    assert "feature_density_hist" not in frame.columns and "feature_density_bin_edges" not in frame.columns
    assert frame["kl_div_score_heldout"].iloc[0] == pytest.approx(1.0, abs=1e-4)  # the exact identity SAE
    dense, moe = frame.iloc[0], frame.iloc[1]
    assert math.isnan(dense["num_experts"]) and math.isnan(dense["in_expert_redundancy_0.8"])
    assert moe["num_experts"] == 4 and moe["active_experts"] == 2
    assert dense["mse_heldout"] == pytest.approx(0.0, abs=1e-9)

    spec = pd.read_csv(stage / "results" / "tables" / "specialisation.csv")
    assert list(spec.columns) == ["variant", "rank", "cumulative_share"]
    assert set(spec["variant"]) == {"scale_k4"} and spec["rank"].tolist() == [1, 2, 3, 4]
    experts = pd.read_csv(stage / "results" / "tables" / "experts.csv")
    assert experts.groupby("variant")["usage"].sum()["scale_k4"] == pytest.approx(1.0)
    metrics = json.loads((stage / "results" / "metrics.json").read_text())  # DVC metrics: headline numbers
    assert set(metrics) == {"claims", "families", "variants"} and metrics["variants"] == 2
    assert set(metrics["claims"]) == {"fig_3a", "fig_3b", "fig_7", "fig_2", "fig_3c", "fig_10", "fig_5"}
    plot = pd.read_csv(stage / "results" / "plots" / "mse_heldout_vs_l0.csv")
    assert plot.columns[0] == "l0" and "switch_n32" in plot.columns


def test_collect_without_results_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="moesae evaluate"):
        collect_mod.collect(tmp_path / "results", None)


# ---- the default profile's size (speed is measured by the benchmarks, not asserted here) -------
def test_default_profile_size_runs():
    subject = TinySubject(d=64)
    data = torch.randn(65536, 64)
    readers = {"heldout": MemoryReader(data), "cross": MemoryReader(data[:32768])}
    sae = build_sae("scale", d_in=64, num_latents=2048, k=32, num_experts=16, active_experts=2)
    cfg = ev.EvaluateConfig(loss_batch_sequences=16)
    r = ev.evaluate_sae(sae, subject, readers["heldout"], readers["cross"], {"heldout": HELDOUT * 2, "cross": CROSS * 2}, cfg)
    assert r["num_tokens_heldout"] == cfg.max_tokens and r["probe_tokens"] == 69


# ---- with the real SubjectModel (a tiny GPT-2 built in memory, byte-level BPE) ----------------
def test_with_real_subject_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    from moesae.subject_model import SPECIAL_TOKEN, SubjectModel, train_tokenizer

    texts = [f"def f{i}(x):\n    y = len(x) + {i}\n    print(y)\n    return sorted(range(y))\n" for i in range(120)]
    tok = train_tokenizer(texts, 300)
    special = tok.token_to_id(SPECIAL_TOKEN)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=tok.get_vocab_size(), n_embd=16, n_layer=2, n_head=2, n_positions=64,
                        bos_token_id=special, eos_token_id=special)
    subject = SubjectModel(GPT2LMHeadModel(config), tok, hook_layer=0, prepend_bos=True, context_length=64)

    cfg = _cfg(max_probe_words=None)
    words = ev.load_probe_words(cfg.probe_words)
    tokens, mask = subject.encode_texts([cfg.probe_template.replace("{w}", w) for w in words])
    positions = ev.probe_positions(subject, cfg.probe_template, tokens)
    for word, row, pos in zip(words, tokens, positions.tolist()):
        piece = subject.token_strings([int(row[pos])])[0].strip()
        assert piece and word.startswith(piece), (word, piece)  # the word's first sub-token

    tk, mk = subject.encode_texts(texts[:40])
    with torch.no_grad():
        cache = subject.hook_activations(tk, mk)[mk]
    r = ev.evaluate_sae(_identity_sae(16), subject, MemoryReader(cache), MemoryReader(cache),
                        {"heldout": texts[60:], "cross": texts[:40]}, cfg)
    assert r["mse_heldout"] == pytest.approx(0.0, abs=1e-8)
    assert r["loss_recovered_zero_heldout"] == pytest.approx(1.0, abs=1e-4)
    assert r["loss_recovered_mean_cross"] == pytest.approx(1.0, abs=1e-4)
    assert r["probe_tokens"] == len(words)


# ---- every SAE in the registry ----------------------------------------------------------------
def _build_any(architecture):
    try:
        return build_sae(architecture, d_in=D, num_latents=32, k=4, num_experts=4)
    except ValueError:  # dense architectures have no num_experts
        return build_sae(architecture, d_in=D, num_latents=32, k=4)


@pytest.mark.parametrize("architecture", __import__("moesae").available_architectures())
def test_every_registered_architecture(world, architecture):
    sae = _build_any(architecture)
    r = _run(sae, world)
    for key in ("mse_heldout", "fvu_cross", "l0_heldout", "dead_fraction", "redundancy_0.8", "mean_max_cos",
                "activation_overlap", "ce_clean_cross"):
        assert math.isfinite(r[key]), key
    moe = type(sae).is_moe
    assert (len(r["expert_usage"]) == 4) == moe and (len(r["specialisation_cdf"]) == 4) == moe
    assert math.isfinite(r["in_expert_redundancy_0.8"]) == moe
