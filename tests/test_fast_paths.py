"""The fast training paths give the reference results (issue #7).

- expert dispatch of only the selected experts (``grouped``, ``loop``, ``auto``) equals the
  authors' all-experts-then-mask design (``all``) in the forward pass and in every gradient;
- Feature Scaling applied to the expert outputs equals the materialised effective encoder Ŵ;
- the sparse encoder backward (only the k kept latents per token, ``kept_dot``) gives the
  gradients of dense autograd through the full pre-activations, for TopK (with AuxK) and for the
  MoE SAEs (the fast dispatch modes against ``all``, which is dense end to end);
- sparse decoding (``embedding_bag``) equals dense ``z @ W_dec`` with gradients;
- bf16 autocast on CPU stays within a stated tolerance of fp32;
- a short training with ``dispatch="grouped"`` ends with the weights of ``dispatch="all"``;
- the benchmark script runs end to end at a toy size.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moesae import build_sae
from moesae.precision import autocast_context, make_adam, resolve_autocast
from moesae.saes.base import kept_dot, sparse_decode
from moesae.saes.topk import auxk_loss
from moesae.saes.moe import dispatch_experts
from moesae.training import TrainConfig, TrainingRun, tensor_batches, train_saes

torch.set_grad_enabled(True)
FAST_MODES = ("grouped", "loop", "auto")
ROOT = Path(__file__).resolve().parents[1]


def _perturb(sae, seed: int = 0) -> None:
    """Move every parameter off its initial value so ω, T, biases and the router all matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            scale = {"omega": 0.5, "T": 0.05, "W_router": 1.0}.get(name, 0.1)
            p.add_(scale * noise)


def _skewed_batch(n: int = 96, d: int = 16, seed: int = 1) -> torch.Tensor:
    """Inputs whose routing leaves some experts without tokens and overloads others."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[: n // 2] += 3 * torch.randn(d, generator=g)  # half the tokens in one cluster
    return x


def _forward_and_grads(sae, x):
    out = sae(x)
    sae.zero_grad(set_to_none=True)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in sae.named_parameters() if p.grad is not None}
    return out, grads


MOE_CONFIGS = [
    ("switch", {"num_experts": 8}),
    ("scale", {"num_experts": 8, "active_experts": 2, "feature_scaling": "mean"}),
    ("scale", {"num_experts": 8, "active_experts": 3, "feature_scaling": "identity"}),
    ("scale", {"num_experts": 8, "active_experts": 2, "feature_scaling": "learned", "gate": "logit_softmax"}),
    ("scale", {"num_experts": 8, "active_experts": 4, "feature_scaling": "none"}),
    ("authors_switch", {"num_experts": 8}),
    ("switch", {"num_experts": 8, "shared_expert": True}),
    ("scale", {"num_experts": 8, "active_experts": 2, "shared_expert": True}),
    ("scale", {"num_experts": 8, "active_experts": 2, "batch_topk": True}),
    ("scale", {"num_experts": 8, "active_experts": 2, "router": "moex"}),
]


@pytest.mark.parametrize("mode", FAST_MODES)
@pytest.mark.parametrize("architecture,extra", MOE_CONFIGS)
def test_fast_dispatch_equals_all_experts_forward_and_gradients(architecture, extra, mode):
    common = dict(d_in=16, num_latents=128, k=6, seed=3, **extra)
    reference = build_sae(architecture, dispatch="all", **common)
    fast = build_sae(architecture, dispatch=mode, **common)
    _perturb(reference)
    fast.load_state_dict(reference.state_dict())
    x = _skewed_batch()
    ref_out, ref_grads = _forward_and_grads(reference, x)
    out, grads = _forward_and_grads(fast, x)
    assert torch.equal(out.top_indices.sort(1).values, ref_out.top_indices.sort(1).values)
    torch.testing.assert_close(out.x_hat, ref_out.x_hat, rtol=1e-5, atol=1e-5)
    for name in ref_out.losses:
        torch.testing.assert_close(out.losses[name], ref_out.losses[name], rtol=1e-5, atol=1e-5)
    assert set(grads) == set(ref_grads)
    learned_router = {"W_router", "b_router"} if extra.get("router") != "moex" else set()
    assert {"W_enc", "W_dec", "b_dec"} | learned_router <= set(grads)
    if extra.get("feature_scaling") in ("mean", "identity", "learned"):
        assert "omega" in grads and grads["omega"].abs().sum() > 0
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")


def test_dispatch_hand_computed_with_feature_scaling():
    # d = 2, N = 2 experts of m = 1 feature. Token 0 → expert 0, token 1 → expert 1.
    W = torch.tensor([[[1.0, 2.0]], [[0.0, 1.0]]])  # [N, m, d]
    bias = torch.tensor([[0.5], [0.0]])
    omega = torch.tensor([0.5, -1.0])
    low = torch.tensor([[1.0, 0.0], [2.0, 2.0]])
    x = torch.tensor([[1.0, 1.0], [3.0, -1.0]])
    experts = torch.tensor([[0], [1]])
    # token 0: Ŵ_0 = W_0 + 0.5 (W_0 − L_0) = [1, 3]; Ŵ_0 x = 4; + 0.5 = 4.5
    # token 1: Ŵ_1 = W_1 − (W_1 − L_1) = L_1 = [2, 2]; Ŵ_1 x = 4; + 0 = 4
    for mode in ("all", "grouped", "loop"):
        pre = dispatch_experts(x, experts, W, bias, 2, mode, omega=omega, low_freq=low)
        assert torch.allclose(pre, torch.tensor([[[4.5]], [[4.0]]])), mode


@pytest.mark.parametrize("mode", ("grouped", "loop"))
def test_output_space_feature_scaling_equals_materialised_encoder(mode):
    g = torch.Generator().manual_seed(0)
    N, m, d, B, e = 6, 5, 8, 40, 2
    W = torch.randn(N, m, d, generator=g, requires_grad=True)
    bias = torch.randn(N, m, generator=g, requires_grad=True)
    omega = torch.randn(N, generator=g, requires_grad=True)
    low = torch.randn(N, d, generator=g, requires_grad=True)
    x = torch.randn(B, d, generator=g, requires_grad=True)
    experts = torch.stack([torch.randperm(N - 1, generator=g)[:e] for _ in range(B)])  # expert N−1 unused
    target = torch.randn(B, e, m, generator=g)

    def grads(pre):
        leaves = (W, bias, omega, low, x)
        return torch.autograd.grad((pre * target).sum(), leaves)

    # the reference: materialise Ŵ and evaluate every expert (callable interface, like the models)
    ref = dispatch_experts(x, experts, lambda ids: (W + omega[:, None, None] * (W - low[:, None, :]))[ids], bias, N, "all")
    fast = dispatch_experts(x, experts, W, bias, N, mode, omega=omega, low_freq=low)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads(fast), grads(ref)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_dispatch_rejects_bad_mode_and_half_feature_scaling():
    x, experts, W = torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.long), torch.randn(2, 2, 3)
    with pytest.raises(ValueError, match="dispatch"):
        dispatch_experts(x, experts, W, None, 2, "fastest")
    with pytest.raises(ValueError, match="omega and low_freq"):
        dispatch_experts(x, experts, W, None, 2, "grouped", omega=torch.zeros(2))


def test_kept_dot_hand_computed_and_gradcheck():
    # W rows r0 = [1, 2], r1 = [0, 1], r2 = [3, -1]; token 0 keeps (r2, r0), token 1 keeps (r1, r1)
    W = torch.tensor([[1.0, 2.0], [0.0, 1.0], [3.0, -1.0]], requires_grad=True)
    x = torch.tensor([[1.0, 1.0], [2.0, -1.0]], requires_grad=True)
    indices = torch.tensor([[2, 0], [1, 1]])
    out = kept_dot(x, W, indices)
    torch.testing.assert_close(out, torch.tensor([[2.0, 3.0], [-1.0, -1.0]]))
    out.backward(torch.tensor([[1.0, 10.0], [100.0, 1000.0]]))
    # dW[r] = Σ over (t, j) with indices[t, j] = r of grad[t, j] · x[t]
    torch.testing.assert_close(W.grad, torch.tensor([[10.0, 10.0], [2200.0, -1100.0], [1.0, 1.0]]))
    torch.testing.assert_close(x.grad, torch.tensor([[13.0, 19.0], [0.0, 1100.0]]))
    # precomputed values are passed through, and the gradients do not depend on them
    same = kept_dot(x, W, indices, out.detach())
    torch.testing.assert_close(same, out)
    g = torch.Generator().manual_seed(0)
    W64 = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    x64 = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 9, (4, 3), generator=g)
    assert torch.autograd.gradcheck(lambda a, b: kept_dot(a, b, ids), (x64, W64))


def _topk_reference_forward(sae, x):
    """The TopK SAE with dense autograd through all M pre-activations (the code before issue #7)."""
    pre = sae.pre_activations(x)
    values, indices = pre.topk(sae.cfg.k, dim=-1, sorted=False)
    x_hat = sparse_decode(values, indices, sae.W_dec, sae.b_dec)
    losses = {"mse": (x - x_hat).pow(2).sum(-1).mean()}
    dead = sae.dead_mask()
    aux_k = min(sae.cfg.aux_k or sae.cfg.d_in // 2, int(dead.sum()))
    masked = torch.where(dead[None, :], pre, torch.full_like(pre, -torch.inf))
    aux_values, aux_ids = masked.topk(aux_k, dim=-1, sorted=False)
    losses["auxk"] = sae.cfg.aux_coefficient * auxk_loss(x, x_hat, aux_values, aux_ids, sae.W_dec)
    return values, indices, x_hat, losses


def test_topk_sparse_backward_equals_dense_autograd_with_auxk():
    sae = build_sae("topk", d_in=16, num_latents=96, k=5, aux_k=7, seed=2)
    _perturb(sae)
    with torch.no_grad():
        sae.tokens_since_fired[::3] = sae.cfg.dead_tokens_threshold  # a third of the latents are dead
    x = _skewed_batch()
    sae.train()
    ref_values, ref_indices, ref_x_hat, ref_losses = _topk_reference_forward(sae, x)
    sae.zero_grad(set_to_none=True)
    sum(ref_losses.values()).backward()
    ref_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    out, grads = _forward_and_grads(sae, x)
    assert out.losses["auxk"] > 0
    assert torch.equal(out.top_indices.sort(1).values, ref_indices.sort(1).values)
    torch.testing.assert_close(out.x_hat, ref_x_hat, rtol=1e-5, atol=1e-5)
    for name, value in ref_losses.items():
        torch.testing.assert_close(out.losses[name], value, rtol=1e-5, atol=1e-6)
    assert set(grads) == set(ref_grads) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")
    # the encoder gradient lives on the kept (and AuxK-selected) rows only
    assert (grads["W_enc"].abs().sum(1) > 0).sum() < sae.cfg.num_latents


@pytest.mark.parametrize("training", [True, False])
def test_batchtopk_sparse_paths_equal_dense_autograd(training):
    from moesae.saes.batchtopk import batch_topk_mask

    sae = build_sae("batchtopk", d_in=16, num_latents=96, k=5, aux_k=7, seed=4)
    _perturb(sae)
    with torch.no_grad():
        sae.tokens_since_fired[::4] = sae.cfg.dead_tokens_threshold
        sae.threshold.fill_(0.3)
    sae.train(training)
    reference = copy.deepcopy(sae)  # the forward updates θ: both start from the same state
    x = _skewed_batch()
    # the code before issue #7: dense pre-activations with autograd, dense code, dense decode
    pre = reference.pre_activations(x)
    keep = batch_topk_mask(pre.detach(), 5 * x.shape[0]) if training else pre.detach() > 0.3
    z = pre * keep
    ref_x_hat = z @ reference.W_dec + reference.b_dec
    ref_loss = (x - ref_x_hat).pow(2).sum(-1).mean()
    if training:
        ref_loss = ref_loss + reference.aux_loss(x, ref_x_hat, pre, reference.dead_mask())
    ref_loss.backward()
    out, grads = _forward_and_grads(sae, x)
    torch.testing.assert_close(out.dense_code(96), z.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.x_hat, ref_x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert out.l0() == keep.sum(1).float().mean()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")


def test_sparse_decode_equals_dense_decode_with_gradients():
    g = torch.Generator().manual_seed(0)
    B, M, d, k = 7, 50, 6, 4
    W_dec = torch.randn(M, d, generator=g, requires_grad=True)
    b_dec = torch.randn(d, generator=g, requires_grad=True)
    values = torch.rand(B, k, generator=g, requires_grad=True)
    indices = torch.stack([torch.randperm(M, generator=g)[:k] for _ in range(B)])
    target = torch.randn(B, d, generator=g)
    sparse = sparse_decode(values, indices, W_dec, b_dec)
    dense = torch.zeros(B, M).scatter(1, indices, values) @ W_dec + b_dec
    torch.testing.assert_close(sparse, dense)
    g_sparse = torch.autograd.grad((sparse * target).sum(), (values, W_dec, b_dec))
    g_dense = torch.autograd.grad((dense * target).sum(), (values, W_dec, b_dec))
    for a, b in zip(g_sparse, g_dense):
        torch.testing.assert_close(a, b)
    # hand check: the decoder gradient is non-zero only on the k·B used rows
    used = torch.zeros(M, dtype=torch.bool)
    used[indices.flatten()] = True
    assert torch.all(g_sparse[1][~used] == 0) and torch.all(g_sparse[1][used].abs().sum(1) > 0)


# bf16 keeps ~3 significant digits; the top-k selection may swap near-tied latents.
BF16_RELATIVE_MSE_TOLERANCE = 0.02


@pytest.mark.parametrize(
    "architecture,extra",
    [("topk", {}), ("switch", {"num_experts": 4}), ("scale", {"num_experts": 8, "active_experts": 2})],
)
def test_bf16_autocast_matches_fp32_on_cpu(architecture, extra):
    sae = build_sae(architecture, d_in=32, num_latents=256, k=8, seed=0, **extra)
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(0)) * 2 + 1
    sae.init_from_batch(x)
    with torch.no_grad():
        ref = sae(x)
        with autocast_context("cpu", torch.bfloat16):
            low = sae(x)
    assert low.losses["mse"].dtype == torch.float32 or low.losses["mse"].dtype == torch.bfloat16
    mse_ref, mse_low = ref.losses["mse"].float(), low.losses["mse"].float()
    relative_mse_difference = abs(mse_low - mse_ref) / mse_ref
    assert relative_mse_difference < BF16_RELATIVE_MSE_TOLERANCE
    # reconstructions agree to within the same tolerance relative to the reconstruction error
    drift = (low.x_hat.float() - ref.x_hat).pow(2).sum(-1).mean() / mse_ref
    assert 0 < drift < BF16_RELATIVE_MSE_TOLERANCE  # > 0: bf16 really ran
    # and bf16 really was used (otherwise the test would pass trivially)
    overlap = (low.top_indices.sort(1).values == ref.top_indices.sort(1).values).float().mean()
    assert overlap > 0.9


@pytest.mark.parametrize("architecture,extra", [("scale", {"active_experts": 2}), ("switch", {})])
def test_training_grouped_equals_all_after_steps(architecture, extra):
    data = _skewed_batch(n=512, d=16, seed=5)
    common = dict(d_in=16, num_latents=64, k=4, num_experts=4, seed=0, **extra)
    runs = [
        TrainingRun(mode, build_sae(architecture, dispatch=mode, **common), TrainConfig(steps=6, log_every=1, checkpoint_every=0))
        for mode in ("all", "grouped")
    ]
    train_saes(runs, tensor_batches(data, 128, seed=0), progress=False)
    ref, fast = (r.sae.state_dict() for r in runs)
    moved = (ref["W_enc"] - build_sae(architecture, **common).state_dict()["W_enc"]).abs().max()
    assert moved > 1e-4, "training must change the weights for the comparison to mean anything"
    for name, tensor in ref.items():
        torch.testing.assert_close(fast[name], tensor, rtol=1e-4, atol=1e-5, msg=f"weights {name}")


def test_fused_adam_matches_reference_adam():
    g = torch.Generator().manual_seed(0)
    start, grad = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    results = []
    for make in (lambda p: make_adam([p], 1e-2), lambda p: torch.optim.Adam([p], lr=1e-2)):
        p = torch.nn.Parameter(start.clone())
        opt = make(p)
        for _ in range(3):
            p.grad = grad.clone()
            opt.step()
        results.append(p.detach())
    torch.testing.assert_close(results[0], results[1])
    # first Adam step moves every coordinate by lr · sign(grad) (bias-corrected m/√v = ±1)
    p = torch.nn.Parameter(start.clone())
    opt = make_adam([p], 1e-2)
    p.grad = grad.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), start - 1e-2 * grad.sign(), rtol=0, atol=1e-6)


def test_resolve_autocast():
    assert resolve_autocast("off", "cpu") is None
    assert resolve_autocast("auto", "cpu") is None
    assert resolve_autocast("bf16", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="'autocast'"):
        resolve_autocast("fp8", "cpu")


def test_benchmark_runs_at_toy_size(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("throughput", ROOT / "benchmarks" / "throughput.py")
    throughput = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "throughput", throughput)  # dataclasses look their module up
    spec.loader.exec_module(throughput)
    out = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--sizes", "toy:16:128", "--k", "4", "--batch-size", "64", "--steps", "1",
            "--warmup", "0", "--in-process", "--allocator", "default", "--out", str(out)]
    throughput.main(argv)
    result = json.loads(out.read_text())
    rows = result["cases"]
    assert len(rows) == 12  # 4 dense TopK rows, 4 MoE configurations × (fast, naive)
    assert {r["implementation"] for r in rows} == {"fast", "naive", "dense"}
    assert all(r["tokens_per_s"] > 0 for r in rows)
    scale = next(r for r in rows if r["name"] == "scale-16-2" and r["implementation"] == "fast")
    # forward MACs per token: router N·d + e·m·d + k·d = 16·16 + 2·8·16 + 4·16
    assert scale["flops_per_token"] == 16 * 16 + 2 * 8 * 16 + 4 * 16
    # executed training FLOPs: forward + sparse backward (4·k·d) + router backward (2·N·d), 2 FLOPs per MAC
    assert scale["train_flops_per_token"] == 2 * (scale["flops_per_token"] + 2 * 16 * 16 + 4 * 4 * 16)
    naive = next(r for r in rows if r["name"] == "scale-16-2" and r["implementation"] == "naive")
    assert naive["train_flops_per_token"] == 2 * 3 * (16 * 16 + 128 * 16 + 4 * 16)  # dense autograd, all M·d
    assert set(result["summary"]["toy"]["ratios"]) >= {"scale-16-2 / topk-M", "scale-16-2 / scale-16-2 naive"}
    with pytest.raises(SystemExit):
        throughput.main(["--sizes", "huge", "--out", str(out)])


def test_keep_freed_cpu_memory_in_a_fresh_process():
    # process-wide allocator setting: checked in a child so the test process keeps glibc's default
    code = "from moesae.precision import keep_freed_cpu_memory as k; print(k(), k())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    expected = "True" if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc" else "False"
    assert out == [expected, expected]


@pytest.mark.slow
def test_compiled_forward_matches_eager():
    from moesae.precision import maybe_compile

    common = dict(d_in=32, num_latents=256, k=8, num_experts=8, active_experts=2, seed=0)
    eager, compiled = build_sae("scale", **common), build_sae("scale", **common)
    maybe_compile(compiled, True)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoint names unchanged
    x = torch.randn(128, 32, generator=torch.Generator().manual_seed(0))
    ref_out, ref_grads = _forward_and_grads(eager, x)
    out, grads = _forward_and_grads(compiled, x)
    torch.testing.assert_close(out.x_hat, ref_out.x_hat, rtol=1e-5, atol=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")


# ---- the faster formulations of the dense-code SAEs and the batch-level selections ----------
def _dense_reference_losses(sae, x):
    """The coefficient-sparsity SAEs as they were written before the pass-count work: product
    and row sum for the penalty, bool masks converted to float, separate bias adds."""
    from moesae.saes.jumprelu import jumprelu, step

    arch = sae.architecture
    coef = sae.sparsity_coefficient() * sae.input_scale
    if arch == "relu":
        z = torch.relu(sae.encoder_projection(x) + sae.b_enc)
        x_hat = sae.decode(z)
        losses = {"l1": coef * (z * sae.decoder_norms()).sum(1).mean()}
    elif arch == "gated":
        projection = sae.encoder_projection(x)
        pi_gate = projection + sae.b_gate
        pi_mag = sae.r_mag.exp() * projection + sae.b_mag
        z = (pi_gate > 0).to(x.dtype) * torch.relu(pi_mag)
        x_hat = sae.decode(z)
        gate_acts = torch.relu(pi_gate)
        losses = {"l1": coef * (gate_acts * sae.decoder_norms()).sum(1).mean(),
                  "aux_gate": (x - (gate_acts @ sae.W_dec.detach() + sae.b_dec.detach())).pow(2).sum(-1).mean()}
    else:
        pre = sae.encoder_projection(x) + sae.b_enc
        eps = sae.cfg.bandwidth * float(sae.input_scale)
        z = jumprelu(pre, sae.threshold(), eps)
        x_hat = sae.decode(z)
        losses = {"l0": sae.sparsity_coefficient() * sae.input_scale**2 * step(pre, sae.threshold(), eps).sum(1).mean()}
    losses["mse"] = (x - x_hat).pow(2).sum(-1).mean()
    return z, x_hat, losses


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse-step", "dense-step"])
@pytest.mark.parametrize("architecture", ["relu", "gated", "jumprelu"])
def test_dense_code_saes_equal_their_reference_formulation(architecture, sparse, monkeypatch):
    """Both training formulations (the CPU sparse step and the dense one GPUs use) give the
    reference's code, reconstruction, losses and gradients."""
    sae = build_sae(architecture, d_in=16, num_latents=96, k=6, seed=1, sparsity_coefficient=0.3)
    taken = []
    real_sparse_forward = type(sae).sparse_forward
    monkeypatch.setattr(type(sae), "sparse_step", lambda self, x: sparse)
    monkeypatch.setattr(type(sae), "sparse_forward", lambda self, x: taken.append(1) or real_sparse_forward(self, x))
    x = _skewed_batch()
    sae.init_from_batch(x)
    _perturb(sae, seed=2)
    if architecture == "jumprelu":  # thresholds near the pre-activations: the pseudo-gradient band matters
        with torch.no_grad():
            sae.log_threshold.copy_(torch.log(torch.rand(96, generator=torch.Generator().manual_seed(3)) * 0.6 + 0.1))
            sae.input_scale.fill_(4.0)
    reference = copy.deepcopy(sae)
    z, ref_x_hat, ref_losses = _dense_reference_losses(reference, x)
    sum(ref_losses.values()).backward()
    out, grads = _forward_and_grads(sae, x)
    torch.testing.assert_close(out.latents, z.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.x_hat, ref_x_hat, rtol=1e-5, atol=1e-5)
    assert set(out.losses) == set(ref_losses)
    for name, value in ref_losses.items():
        torch.testing.assert_close(out.losses[name], value, rtol=1e-5, atol=1e-6, msg=name)
    for name, p in reference.named_parameters():
        assert (p.grad is None) == (name not in grads), name
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")
    if architecture == "jumprelu":
        assert grads["log_threshold"].abs().sum() > 0  # the band was hit: the test compares something
    assert bool(taken) == sparse  # the formulation under test is the one that ran


def test_fused_jumprelu_equals_jumprelu_and_step():
    from moesae.saes.jumprelu import jumprelu, jumprelu_with_count, step

    g = torch.Generator().manual_seed(0)
    pre = (torch.rand(64, 40, generator=g) * 2).requires_grad_()
    theta = (torch.rand(40, generator=g) + 0.5).requires_grad_()
    upstream, weight = torch.randn(64, 40, generator=g), 0.37
    z, count = jumprelu_with_count(pre, theta, 0.2)
    ((z * upstream).sum() + weight * count).backward()
    fused = (z.detach(), count.detach(), pre.grad.clone(), theta.grad.clone())
    pre.grad = theta.grad = None
    z_ref = jumprelu(pre, theta, 0.2)
    count_ref = step(pre, theta, 0.2).sum()
    ((z_ref * upstream).sum() + weight * count_ref).backward()
    torch.testing.assert_close(fused[0], z_ref.detach())
    assert fused[1] == count_ref
    torch.testing.assert_close(fused[2], pre.grad)
    torch.testing.assert_close(fused[3], theta.grad, rtol=1e-5, atol=1e-5)
    assert theta.grad.abs().sum() > 0


@pytest.mark.parametrize("capacity", ["uniform", "zipf"])
def test_feature_choice_mask_equals_a_full_sort(capacity):
    from moesae.saes.feature_choice import capacity_weights, feature_capacities, feature_choice_mask

    g = torch.Generator().manual_seed(0)
    pre = torch.relu(torch.randn(256, 300, generator=g))  # continuous values: no ties but the zeros
    caps = feature_capacities(capacity_weights(300, capacity, 1.0), 6, 256)
    keep, threshold = feature_choice_mask(pre, caps)
    # the reference: every column sorted, its m_j largest positive entries kept
    values, order = pre.sort(dim=0, descending=True)
    kept_sorted = (torch.arange(256)[:, None] < caps[None, :]) & (values > 0)
    reference = torch.zeros_like(kept_sorted).scatter(0, order, kept_sorted)
    assert keep.dtype == torch.bool and torch.equal(keep, reference)
    torch.testing.assert_close(threshold, values.gather(0, (caps - 1)[None, :])[0].clamp_min(0), rtol=0, atol=0)
    as_float, _ = feature_choice_mask(pre, caps, as_float=True)
    assert as_float.dtype == pre.dtype and torch.equal(as_float.bool(), keep)


@pytest.mark.parametrize("shape,budget", [((512, 600), 2048), ((64, 40), 100), ((8, 8), 64), ((300, 1000), 9000)])
def test_batch_topk_is_exact(shape, budget):
    from moesae.saes.batchtopk import batch_topk

    scores = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    positions, values = batch_topk(scores, budget)
    ref_values = scores.flatten().topk(min(budget, scores.numel())).values
    assert positions.unique().numel() == positions.numel() == min(budget, scores.numel())
    torch.testing.assert_close(values.sort(descending=True).values, ref_values, rtol=0, atol=0)
    torch.testing.assert_close(scores.flatten()[positions], values, rtol=0, atol=0)


def test_batch_topk_falls_back_when_the_sample_misleads():
    from moesae.saes.batchtopk import batch_topk

    scores = torch.zeros(64, 1024)
    scores.view(-1)[1::17] = torch.arange(1, 3856, dtype=torch.float32)  # the sample sees only zeros
    positions, values = batch_topk(scores, 1024)
    assert torch.equal(values.sort().values, torch.arange(2832, 3856, dtype=torch.float32))
    assert torch.equal(scores.view(-1)[positions], values)
    # fewer positive entries than the budget: the zeros fill it (the full topk)
    positions, values = batch_topk(scores, 4000)
    assert int((values > 0).sum()) == 3855 and positions.unique().numel() == 4000


def test_batch_topk_sample_sees_every_column():
    """Features that fire often but sit in the columns a power-of-two stride skips: the sampled
    cut still finds enough candidates (the odd stride walks through all columns)."""
    from moesae.saes import batchtopk

    g = torch.Generator().manual_seed(0)
    scores = torch.relu(torch.randn(1024, 2048, generator=g) - 2.0)
    scores[:, 1::16] += 3.0  # the strong features: none in columns 0, 16, 32, ...
    calls = []
    real = torch.Tensor.topk
    full = scores.numel()
    with torch.no_grad():
        import unittest.mock as mock
        with mock.patch.object(torch.Tensor, "topk", lambda self, *a, **k: calls.append(self.numel()) or real(self, *a, **k)):
            positions, values = batchtopk.batch_topk(scores, 32 * 1024)
    assert full not in calls  # no topk over every entry
    assert calls[-1] < int((scores > 0).sum())  # the sampled cut, not the positive entries, gave the candidates
    torch.testing.assert_close(values.sort(descending=True).values, scores.flatten().topk(32 * 1024).values, rtol=0, atol=0)


def test_padded_rows_use_distinct_unkept_columns():
    from moesae.saes.batchtopk import rows_of_positions

    g = torch.Generator().manual_seed(0)
    keep_mask = torch.rand(50, 30, generator=g) < torch.rand(50, 1, generator=g)  # rows of very different counts
    positions, keep = rows_of_positions(keep_mask.flatten().nonzero().squeeze(1), (50, 30))
    assert keep.shape == positions.shape and torch.equal(keep.sum(1), keep_mask.sum(1))
    for b in range(50):
        row = positions[b]
        assert row.unique().numel() == row.numel()  # no column twice: a dense scatter loses nothing
        assert torch.equal(keep_mask[b, row], keep[b])  # real entries are kept ones, padding is not


def test_auxk_select_equals_the_masked_topk():
    from moesae.saes.topk import auxk_select

    g = torch.Generator().manual_seed(0)
    pre = torch.randn(32, 200, generator=g)
    for dead_share in (0.0, 0.02, 0.3, 1.0):
        dead = torch.rand(200, generator=g) < dead_share
        ids = auxk_select(pre, dead, 16)
        if not dead.any():
            assert ids is None
            continue
        masked = torch.where(dead[None, :], pre, torch.full_like(pre, -torch.inf))
        ref = masked.topk(min(16, int(dead.sum())), dim=-1).indices
        assert torch.equal(ids.sort(1).values, ref.sort(1).values)


def test_flat_kept_dot_and_decode_equal_the_padded_forms():
    """A variable count per token, flat (offsets), gives the padded computation's values and gradients."""
    g = torch.Generator().manual_seed(0)
    B, M, d = 6, 20, 5
    counts = torch.tensor([3, 0, 1, 4, 2, 2])
    columns = torch.cat([torch.randperm(M, generator=g)[:c] for c in counts.tolist()])
    offsets = torch.cumsum(counts, 0) - counts
    width = int(counts.max())
    padded = torch.zeros(B, width, dtype=torch.long)
    keep = torch.arange(width)[None, :] < counts[:, None]
    padded[keep] = columns
    x = torch.randn(B, d, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(M, d, generator=g, dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn(M, d, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(d, dtype=torch.float64)
    flat = sparse_decode(torch.relu(kept_dot(x, W, columns, offsets=offsets)), columns, W_dec, b, offsets)
    ref = sparse_decode(torch.relu(kept_dot(x, W, padded)) * keep, padded, W_dec, b)
    torch.testing.assert_close(flat, ref)
    target = torch.randn(B, d, generator=g, dtype=torch.float64)
    for a, r in zip(torch.autograd.grad((flat * target).sum(), (x, W, W_dec)),
                    torch.autograd.grad((ref * target).sum(), (x, W, W_dec))):
        torch.testing.assert_close(a, r)
    assert torch.autograd.gradcheck(lambda a, w: kept_dot(a, w, columns, offsets=offsets), (x, W))


def test_family_benchmark_runs_on_one_small_family(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("throughput", ROOT / "benchmarks" / "throughput.py")
    throughput = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "throughput", throughput)
    spec.loader.exec_module(throughput)
    monkeypatch.chdir(ROOT)  # the default profile is read from profiles/
    out = tmp_path / "families.json"
    result = throughput.main(["--device", "cpu", "--families", "switch_n32_moex", "--steps", "3", "--batch-size", "64",
                              "--workers", "2", "--threads", "1", "--allocator", "default", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["mode"] == "families" and saved["workers"] == 2 and saved["threads"] == 1
    (family,) = saved["families"]
    assert family["family"] == "switch_n32_moex" and family["variants"] == len(family["rows"]) >= 1
    assert family["ms_per_sae_step"] > 0 and family["cpu_ms_per_sae_step"] > 0
    assert all(r["cpu_ms_per_step"] > 0 and r["tokens_per_cpu_s"] > 0 for r in family["rows"])
    assert result["summary"]["sae_steps"] == 3 * family["variants"]
    with pytest.raises(SystemExit, match="no family"):
        throughput.main(["--device", "cpu", "--families", "nope", "--out", str(out)])


@pytest.mark.parametrize("capacity", ["uniform", "zipf"])
def test_feature_choice_sparse_step_equals_the_dense_one(capacity, monkeypatch):
    """The CPU training step on the kept entries gives the dense step's code, losses (aux_zipf
    on under-firing features included), gradients and running statistics."""
    from moesae.saes.feature_choice import FeatureChoiceSAE

    sae = build_sae("feature_choice", d_in=16, num_latents=96, k=4, seed=1, capacity=capacity, aux_coefficient=1 / 32)
    x = _skewed_batch()
    sae.init_from_batch(x)
    _perturb(sae, seed=2)
    with torch.no_grad():  # some features under-fire: aux_zipf has candidates
        sae.firing_density[::3] = 0.0
    dense = copy.deepcopy(sae)
    monkeypatch.setattr(FeatureChoiceSAE, "sparse_step", lambda self, x: self is sae)
    out, grads = _forward_and_grads(sae, x)
    ref, ref_grads = _forward_and_grads(dense, x)
    assert out.losses["aux_zipf"] > 0
    torch.testing.assert_close(out.latents, ref.latents.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.x_hat, ref.x_hat, rtol=1e-5, atol=1e-5)
    for name, value in ref.losses.items():
        torch.testing.assert_close(out.losses[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")
    for name in ("thresholds", "firing_density"):
        torch.testing.assert_close(getattr(sae, name), getattr(dense, name), msg=name)
    assert torch.equal(out.extras["fired"], ref.extras["fired"])
