"""Exports other tools load (issue #16, part 1): SAELens 6.x folders for the dense architectures,
plain safetensors for every architecture (MoE included), and SAELens folders read back.

``sae_lens`` is not installed here (it pins transformer-lens < 4): the files are checked against
the contract read from its source (field names, tensor names and shapes, strict state dict) and
against ``saelens_forward`` below, a re-implementation of its 6.x ``encode``/``decode``
(sae_lens/saes/{standard,topk,jumprelu,gated}_sae.py), written independently of the converter.
Every SAE is trained a few steps first so that its weights are not the initialisation.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moesae import build_sae, cli, load_sae
from moesae.export import export_sae
from moesae.interop import from_saelens, is_saelens_config, to_saelens, write_plain, write_saelens
from moesae.training import TrainConfig, TrainingRun, tensor_batches, train_saes

D, M, K = 12, 48, 4
SAELENS_EXPORTS = {  # moesae architecture → (SAELens architecture, the moesae architecture a plain import gives)
    "topk": ("topk", "topk"),
    "relu": ("standard", "relu"),
    "jumprelu": ("jumprelu", "jumprelu"),
    "gated": ("gated", "gated"),
    "batchtopk": ("jumprelu", "jumprelu"),
    "feature_choice": ("jumprelu", "jumprelu"),
}
TENSORS = {  # what SAELens's strict load_state_dict expects, shapes for d_in = D, d_sae = M
    "standard": {"W_enc": [D, M], "b_enc": [M], "W_dec": [M, D], "b_dec": [D]},
    "topk": {"W_enc": [D, M], "b_enc": [M], "W_dec": [M, D], "b_dec": [D]},
    "jumprelu": {"W_enc": [D, M], "b_enc": [M], "W_dec": [M, D], "b_dec": [D], "threshold": [M]},
    "gated": {"W_enc": [D, M], "b_gate": [M], "b_mag": [M], "r_mag": [M], "W_dec": [M, D], "b_dec": [D]},
}


def saelens_forward(cfg: dict, w: dict, x: torch.Tensor) -> torch.Tensor:
    """x̂ of an SAELens 6.x inference SAE (normalize_activations 'none', no hook_z reshaping)."""
    sae_in = x - w["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    arch = cfg["architecture"]
    if arch == "gated":
        active = (sae_in @ w["W_enc"] + w["b_gate"] > 0).float()
        acts = active * torch.relu(sae_in @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"])
    else:
        hidden_pre = sae_in @ w["W_enc"] + w["b_enc"]
        if arch == "standard":
            acts = torch.relu(hidden_pre)
        elif arch == "jumprelu":
            acts = torch.relu(hidden_pre) * (hidden_pre > w["threshold"]).float()
        elif arch == "topk":
            if cfg.get("rescale_acts_by_decoder_norm"):
                hidden_pre = hidden_pre * w["W_dec"].norm(dim=-1)
            values, indices = torch.topk(hidden_pre, k=cfg["k"], dim=-1, sorted=False)
            acts = torch.zeros_like(hidden_pre).scatter_(-1, indices, values.relu())
            if cfg.get("rescale_acts_by_decoder_norm"):
                acts = acts / w["W_dec"].norm(dim=-1)
        else:
            raise AssertionError(arch)
    return acts @ w["W_dec"] + w["b_dec"]


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(D, D, generator=g)
    return torch.randn(1024, D, generator=g) @ basis + 0.3


def _trained(architecture: str, data: torch.Tensor, **extra):
    cfg = {"d_in": D, "num_latents": M, "k": K, "dead_tokens_threshold": 256, **extra}
    if architecture in ("relu", "jumprelu", "gated"):
        cfg["calibration_steps"] = 4
    if architecture in ("switch", "scale"):
        cfg.setdefault("num_experts", 4)
    sae = build_sae(architecture, **cfg)
    run = TrainingRun(name=architecture, sae=sae, out_dir=None,
                      config=TrainConfig(steps=12, lr=3e-3, log_every=6, checkpoint_every=0))
    train_saes([run], tensor_batches(data, 64, seed=0), progress=False)
    return sae.eval()


def _x_hat(sae, x):
    with torch.no_grad():
        return sae(x).x_hat


@pytest.fixture(scope="module")
def trained(data):
    return {arch: _trained(arch, data) for arch in SAELENS_EXPORTS}


# ---- SAELens export: every field and tensor, and the function it computes ---------------------------
@pytest.mark.parametrize("architecture", sorted(SAELENS_EXPORTS))
def test_saelens_export_files(architecture, trained, data, tmp_path):
    sae = trained[architecture]
    target, _ = SAELENS_EXPORTS[architecture]
    out = write_saelens(sae, tmp_path / "sl", {"hook_name": "blocks.2.hook_resid_post", "model_name": "trained",
                                                "context_size": 128, "prepend_bos": True})
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert (out / "sae_weights.safetensors").stat().st_mode & 0o044 == 0o044  # readable by others
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == target
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["device"]) == (D, M, "float32", "cpu")
    assert cfg["apply_b_dec_to_input"] is True  # moesae encodes x − b_dec
    assert cfg["normalize_activations"] == "none" and cfg["reshape_activations"] == "none"
    assert "num_latents" not in cfg and is_saelens_config(cfg)
    if target == "topk":
        assert cfg["k"] == K and cfg["rescale_acts_by_decoder_norm"] is False
    else:
        assert "k" not in cfg
    meta = cfg["metadata"]
    assert int(meta["sae_lens_version"].split(".")[0]) >= 6  # SAELens reads it without the 5.x conversion
    assert meta["hook_name"] == "blocks.2.hook_resid_post" and meta["model_name"] == "trained"
    assert meta["context_size"] == 128 and meta["prepend_bos"] is True
    assert meta["moesae"]["architecture"] == architecture and meta["moesae"]["config"]["num_latents"] == M

    weights = load_file(str(out / "sae_weights.safetensors"))
    assert {name: list(t.shape) for name, t in weights.items()} == TENSORS[target]
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert torch.equal(weights["W_enc"], sae.W_enc.detach().T)  # [d_in, d_sae]: one column per feature
    assert torch.equal(weights["W_dec"], sae.W_dec.detach())
    if architecture == "jumprelu":
        assert torch.equal(weights["threshold"], sae.log_threshold.detach().exp())  # the threshold, not its log
    if architecture == "batchtopk":
        assert float(sae.threshold) > 0 and torch.equal(weights["threshold"], torch.full((M,), float(sae.threshold)))
    if architecture == "feature_choice":
        assert torch.equal(weights["threshold"], sae.thresholds.clamp_min(0))

    # SAELens's forward on the exported files is the moesae SAE's inference forward
    x = data[:200]
    expected = _x_hat(sae, x)
    assert expected.abs().sum() > 0 and (expected - sae.b_dec.detach()).abs().max() > 1e-3  # non-trivial codes
    assert torch.allclose(saelens_forward(cfg, weights, x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture", sorted(SAELENS_EXPORTS))
def test_saelens_round_trip(architecture, trained, data, tmp_path):
    sae = trained[architecture]
    write_saelens(sae, tmp_path / "sl")
    x = data[:200]
    back = load_sae(tmp_path / "sl")  # the registry's hook: an SAELens folder is converted
    assert back.architecture == sae.architecture and back.cfg == sae.cfg  # moesae metadata: the same config
    assert not back.training
    assert torch.allclose(_x_hat(back, x), _x_hat(sae, x), atol=1e-5, rtol=1e-5)

    # without the moesae metadata (as a folder SAELens itself re-saved): the generic mapping
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    del cfg["metadata"]["moesae"]
    generic = from_saelens(cfg, load_file(str(tmp_path / "sl" / "sae_weights.safetensors")))
    assert generic.architecture == SAELENS_EXPORTS[architecture][1]
    assert generic.cfg.num_latents == M and generic.cfg.d_in == D
    assert torch.allclose(_x_hat(generic, x), _x_hat(sae, x), atol=1e-5, rtol=1e-5)


def test_saelens_import_of_a_foreign_moesae_config(trained, data):
    """metadata.moesae from another moesae version (an unknown field): the generic mapping."""
    cfg, tensors = to_saelens(trained["gated"])
    cfg["metadata"]["moesae"]["config"]["field_of_the_future"] = 1
    sae = from_saelens(cfg, tensors)
    assert sae.architecture == "gated" and sae.cfg.k == 32
    assert torch.allclose(_x_hat(sae, data[:50]), _x_hat(trained["gated"], data[:50]), atol=1e-5)
    assert from_saelens(cfg, tensors, k=7).cfg.k == 7


def test_saelens_export_of_an_untrained_batchtopk_threshold(data, tmp_path):
    sae = build_sae("batchtopk", d_in=D, num_latents=M, k=K).eval()  # θ = −1: never set
    cfg, tensors = to_saelens(sae)
    assert torch.equal(tensors["threshold"], torch.zeros(M))  # eval keeps ReLU(h) > max(θ, 0)
    assert torch.allclose(saelens_forward(cfg, tensors, data[:50]), _x_hat(sae, data[:50]), atol=1e-5)


@pytest.mark.parametrize("architecture", ["scale", "switch", "authors_switch"])
def test_moe_saes_are_refused_for_saelens(architecture):
    sae = build_sae(architecture, d_in=D, num_latents=M, k=K, num_experts=4)
    with pytest.raises(ValueError, match=r"mixture of experts.*--format safetensors"):
        to_saelens(sae)


# ---- SAELens folders written by SAELens (or older versions) ----------------------------------------
def _folder(path: Path, cfg: dict, tensors: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "sae_weights.safetensors"))
    return path


def _random_saelens(arch: str, seed: int = 0, **cfg_extra) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    tensors = {"W_enc": torch.randn(D, M, generator=g) / D**0.5, "W_dec": torch.randn(M, D, generator=g) / D**0.5,
               "b_dec": torch.randn(D, generator=g) * 0.1}
    if arch == "gated":
        tensors.update(b_gate=torch.randn(M, generator=g) * 0.1, b_mag=torch.randn(M, generator=g) * 0.1,
                       r_mag=torch.randn(M, generator=g) * 0.1)
    else:
        tensors["b_enc"] = torch.randn(M, generator=g) * 0.1
    if arch == "jumprelu":
        tensors["threshold"] = torch.rand(M, generator=g) * 0.3
    cfg = {"architecture": arch, "d_in": D, "d_sae": M, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.18.0", "hook_name": "blocks.8.hook_resid_pre", "model_name": "gpt2"}}
    if arch == "topk":
        cfg.update(k=5, rescale_acts_by_decoder_norm=False)
    cfg.update(cfg_extra)
    return cfg, tensors


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_import_saelens_folder(arch, apply_b_dec, data, tmp_path):
    cfg, tensors = _random_saelens(arch, apply_b_dec_to_input=apply_b_dec)
    folder = _folder(tmp_path / arch, cfg, tensors)
    sae = load_sae(folder)
    assert sae.architecture == {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}[arch]
    assert (sae.cfg.d_in, sae.cfg.num_latents) == (D, M)
    assert sae.cfg.k == (5 if arch == "topk" else 32)
    assert sae.imported_from["metadata"]["hook_name"] == "blocks.8.hook_resid_pre"
    x = data[:200] / data.std()
    assert torch.allclose(_x_hat(sae, x), saelens_forward(cfg, tensors, x), atol=1e-5, rtol=1e-4)


def test_import_topk_rescaled_by_decoder_norm_and_bf16(data, tmp_path):
    cfg, tensors = _random_saelens("topk", rescale_acts_by_decoder_norm=True)
    sae = from_saelens(cfg, tensors)
    x = data[:200] / data.std()
    assert torch.allclose(_x_hat(sae, x), saelens_forward(cfg, tensors, x), atol=1e-5, rtol=1e-4)
    # a bfloat16 checkpoint is read as float32 (SAELens casts to cfg["dtype"] the same way)
    half = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
    sae16 = load_sae(_folder(tmp_path / "bf16", {**cfg, "dtype": "bfloat16"}, half))
    assert sae16.W_enc.dtype == torch.float32
    ref = saelens_forward(cfg, {k: v.float() for k, v in half.items()}, x)
    assert torch.allclose(_x_hat(sae16, x), ref, atol=1e-4, rtol=1e-3)


def test_import_saelens_5x_flat_config(data):
    cfg, tensors = _random_saelens("topk")
    legacy = {"d_in": D, "d_sae": M, "dtype": "float32", "hook_point": "blocks.8.hook_resid_pre", "model_name": "gpt2",
              "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 5}, "apply_b_dec_to_input": True,
              "normalize_activations": False, "context_size": 128, "prepend_bos": True, "sae_lens_version": "3.12.0"}
    sae = from_saelens(legacy, tensors)
    assert sae.architecture == "topk" and sae.cfg.k == 5
    assert sae.imported_from["metadata"]["hook_name"] == "blocks.8.hook_resid_pre"
    x = data[:100] / data.std()
    assert torch.allclose(_x_hat(sae, x), saelens_forward(cfg, tensors, x), atol=1e-5, rtol=1e-4)
    # a 5.x standard SAE with its fine-tuning scale (decode(z ⊙ s)) folded into the decoder
    cfg_s, tensors_s = _random_saelens("standard")
    scale = torch.rand(M) + 0.5
    legacy_s = {"d_in": D, "d_sae": M, "dtype": "float32", "hook_point": "h", "activation_fn_str": "relu",
                "finetuning_scaling_factor": True}
    sae_s = from_saelens(legacy_s, {**tensors_s, "scaling_factor": scale})
    expected = saelens_forward(cfg_s, {**tensors_s, "W_dec": tensors_s["W_dec"] * scale[:, None]}, x)
    assert torch.allclose(_x_hat(sae_s, x), expected, atol=1e-5, rtol=1e-4)


def test_import_jumprelu_with_nonpositive_thresholds(data):
    cfg, tensors = _random_saelens("jumprelu")
    tensors["threshold"][:5] = 0.0
    tensors["threshold"][5:8] = -0.2
    sae = from_saelens(cfg, tensors)
    assert sae.imported_from["nonpositive_thresholds_replaced"] == 8
    x = data[:200] / data.std()
    assert torch.allclose(_x_hat(sae, x), saelens_forward(cfg, tensors, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("change, match", [
    ({"normalize_activations": "layer_norm"}, "layer_norm"),
    ({"normalize_activations": "constant_norm_rescale"}, "constant_norm_rescale"),
    ({"normalize_activations": "expected_average_only_in"}, "fold_activation_norm_scaling_factor"),
    ({"architecture": "jumprelu_transcoder"}, "no moesae equivalent"),
])
def test_import_refuses_what_has_no_exact_equivalent(change, match):
    cfg, tensors = _random_saelens("standard")
    with pytest.raises(ValueError, match=match):
        from_saelens({**cfg, **change}, tensors)


def test_import_checks_tensor_names_and_shapes():
    cfg, tensors = _random_saelens("standard")
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        from_saelens(cfg, {**tensors, "extra": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"missing \['b_enc'\]"):
        from_saelens(cfg, {k: v for k, v in tensors.items() if k != "b_enc"})
    with pytest.raises(ValueError, match=r"'W_enc' has shape \[48, 12\], expected \[12, 48\]"):
        from_saelens(cfg, {**tensors, "W_enc": tensors["W_enc"].T.contiguous()})


# ---- plain safetensors: every architecture, MoE ones with their expert layout -------------------------
@pytest.mark.parametrize("architecture, extra", [
    ("scale", {"feature_scaling": "mean"}),
    ("scale", {"feature_scaling": "learned", "active_experts": 1}),
    ("scale", {"feature_scaling": "none", "batch_topk": True}),
    ("switch", {}),
    ("switch", {"shared_expert": True}),
    ("topk", {}),
    ("gated", {}),
])
def test_plain_export_round_trip(architecture, extra, data, tmp_path):
    sae = _trained(architecture, data, **extra)
    out = write_plain(sae, tmp_path / "plain", {"hook_name": "blocks.2.hook_resid_post"})
    cfg = json.loads((out / "cfg.json").read_text())
    weights = load_file(str(out / "sae_weights.safetensors"))
    assert cfg["format"] == "moesae-safetensors" and cfg["format_version"] == 1
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"], cfg["k"]) == (sae.architecture, D, M, K)
    assert cfg["config"] == sae.config_dict() and cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post"
    assert cfg["forward"]
    assert set(cfg["tensors"]) == set(weights)
    assert all(cfg["tensors"][n]["shape"] == list(t.shape) and cfg["tensors"][n]["meaning"] for n, t in weights.items())
    assert "tokens_since_fired" not in weights and "tokens_since_fired" in cfg["left_out"]
    assert torch.equal(weights["W_dec"], sae.W_dec.detach()) and torch.equal(weights["W_enc"], sae.W_enc.detach())
    if type(sae).is_moe:
        N, m = sae.cfg.num_experts, M // sae.cfg.num_experts
        assert cfg["experts"]["num_experts"] == N and cfg["experts"]["expert_size"] == m
        assert f"i·{m} … (i+1)·{m} − 1" in cfg["experts"]["layout"]
        assert list(weights["W_enc"].shape) == [N, m, D] and list(weights["W_router"].shape) == [N, D]
        assert torch.equal(weights["expert_of_feature"], torch.arange(M) // m)
        if architecture == "scale" and extra["feature_scaling"] != "none":
            assert "omega" in weights and float(weights["omega"].abs().max()) > 0  # trained ω
            omega, W = weights["omega"], weights["W_enc"]
            low = weights["low_freq"] if extra["feature_scaling"] == "learned" else (W.mean(1) @ weights["T"].T)
            effective = W + omega[:, None, None] * (W - low[:, None, :])
            assert torch.allclose(weights["W_enc_effective"], effective, atol=1e-6)
        else:
            assert "W_enc_effective" not in weights
    x = data[:200]
    back = load_sae(out)
    assert back.architecture == sae.architecture and back.cfg == sae.cfg
    assert torch.allclose(_x_hat(back, x), _x_hat(sae, x), atol=1e-6)


def test_plain_import_detects_an_inconsistent_effective_encoder(data, tmp_path):
    sae = _trained("scale", data, feature_scaling="mean")
    out = write_plain(sae, tmp_path / "plain")
    weights = load_file(str(out / "sae_weights.safetensors"))
    weights["omega"] = weights["omega"] + 0.5
    save_file(weights, str(out / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match="W_enc_effective"):
        load_sae(out)


# ---- the CLI and the hook metadata --------------------------------------------------------------------
def _subject_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "subject.json").write_text(json.dumps({
        "name": "gpt2", "source": "pretrained", "hook_layer": 8, "hook_name": "blocks.8.hook_resid_post",
        "prepend_bos": True, "context_length": 1024, "d_model": D, "n_layers": 12, "vocab_size": 50257,
        "bos_token_id": 50256}))
    return path


def test_cli_export_reads_the_subject_model_and_params(trained, tmp_path, capsys):
    model_dir = trained["topk"].save(tmp_path / "models" / "topk_k4")
    subject = _subject_folder(tmp_path / "models" / "subject")
    params = tmp_path / "params.yaml"
    params.write_text(
        f"paths: {{subject_model: {subject}}}\n"
        "activations: {context_length: 128, exclude_bos: true}\n"
        "corpus: {source: hf, train_dataset: Skylion007/openwebtext}\n")
    out = tmp_path / "export"
    assert cli.main(["export", "--format", "saelens", "--params", str(params), str(model_dir), str(out)]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err and "load_from_disk" in captured.out
    meta = json.loads((out / "cfg.json").read_text())["metadata"]
    assert meta["model_name"] == "gpt2" and meta["hook_name"] == "blocks.8.hook_resid_post"
    assert meta["context_size"] == 128  # the activation cache's context, not the model's 1024 positions
    assert meta["prepend_bos"] is True and meta["exclude_special_tokens"] == [50256]
    assert meta["dataset_path"] == "Skylion007/openwebtext"
    assert meta["model_from_pretrained_kwargs"] == {"center_writing_weights": False}
    assert meta["hook_head_index"] is None
    # command-line values win
    assert cli.main(["export", "--subject", str(subject), "--hook-name", "blocks.8.hook_resid_pre",
                     "--model-name", "gpt2-small", str(model_dir), str(tmp_path / "e2")]) == 0
    meta2 = json.loads((tmp_path / "e2" / "cfg.json").read_text())["metadata"]
    assert (meta2["hook_name"], meta2["model_name"], meta2["context_size"]) == ("blocks.8.hook_resid_pre", "gpt2-small", 1024)


def test_cli_export_falls_back_with_a_warning(trained, tmp_path, capsys, monkeypatch):
    model_dir = trained["relu"].save(tmp_path / "relu_k4")
    monkeypatch.chdir(tmp_path)  # no models/subject here, no params
    assert cli.main(["export", str(model_dir), str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "hook_name" in err and "--params" in err
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert cfg["architecture"] == "standard"
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post" and cfg["metadata"]["context_size"] == 128


def test_cli_export_moe(data, tmp_path, capsys):
    model_dir = _trained("scale", data).save(tmp_path / "scale_k4")
    assert cli.main(["export", str(model_dir), str(tmp_path / "sl")]) == 1
    err = capsys.readouterr().err
    assert "mixture of experts" in err and "--format safetensors" in err
    assert not (tmp_path / "sl" / "cfg.json").exists()
    assert cli.main(["export", "--format", "safetensors", "--subject", str(_subject_folder(tmp_path / "subj")),
                     str(model_dir), str(tmp_path / "plain")]) == 0
    cfg = json.loads((tmp_path / "plain" / "cfg.json").read_text())
    assert cfg["experts"]["num_experts"] == 4 and cfg["metadata"]["hook_name"] == "blocks.8.hook_resid_post"
    with pytest.raises(ValueError, match="overwrite"):
        export_sae(model_dir, model_dir)


def test_evaluate_an_exported_saelens_folder(trained, tmp_path, monkeypatch, capsys):
    """A published (here: exported) SAELens SAE is evaluated by this pipeline: moesae evaluate --sae-dir."""
    from moesae import evaluate as ev
    from test_evaluate import CROSS, HELDOUT, MemoryReader, TinySubject, _cache

    subject = TinySubject(d=D)
    readers = {"heldout": MemoryReader(_cache(subject, HELDOUT)), "cross": MemoryReader(_cache(subject, CROSS))}
    monkeypatch.setattr(ev, "load_shared_inputs",
                        lambda params, device: {"subject": subject, "readers": readers, "texts": {"heldout": HELDOUT, "cross": CROSS}})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("evaluate: {batch_tokens: 256, loss_batches: 2, loss_batch_sequences: 4, "
                                          "max_probe_words: 10, redundancy_subsets: 2}\n")
    folder = write_saelens(trained["jumprelu"], tmp_path / "published_jumprelu")
    assert cli.main(["evaluate", "--sae-dir", str(folder), "--no-progress"]) == 0
    result = json.loads((tmp_path / "results" / "external" / "published_jumprelu.json").read_text())
    assert result["checkpoint_format"] == "saelens" and result["architecture"] == "jumprelu"
    cfg = ev.EvaluateConfig(batch_tokens=256, loss_batches=2, loss_batch_sequences=4, max_probe_words=10,
                            redundancy_subsets=2)
    direct = ev.evaluate_sae(trained["jumprelu"], subject, readers["heldout"], readers["cross"],
                             {"heldout": HELDOUT, "cross": CROSS}, cfg)
    for key in ("mse_heldout", "l0_cross", "kl_div_score_heldout", "explained_variance_cross"):
        assert result[key] == pytest.approx(direct[key], rel=1e-4, abs=1e-6), key
    assert math.isfinite(result["cossim_heldout"])
    # the grid's results and the pipeline's run times are not touched
    assert not (tmp_path / "results" / "eval").exists() and not (tmp_path / "results" / "timings").exists()
