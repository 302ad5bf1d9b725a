"""Temporary part of test_minimal.py (gnocchi); merged back into test_minimal.py by the lead."""
import ast
import copy
import dataclasses
import importlib
import json
import math
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.abspath(__file__))
MODEL_FILES = ["ldns_minimal.py", "gnocchi_minimal.py", "spikegan_minimal.py"]
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import gnocchi_minimal as gn  # noqa: E402
import ldns_minimal as ldns  # noqa: E402
import spikegan_minimal as sg  # noqa: E402

MODULES = {"ldns_minimal.py": ldns, "gnocchi_minimal.py": gn, "spikegan_minimal.py": sg}
# a --quick run of each file's default demo, fixed threads (float sums must run in the same order in both runs)
QUICK = {"ldns_minimal.py": ["--quick", "--threads", "1", "--seed", "3"],
         "gnocchi_minimal.py": ["--quick", "--threads", "1"],
         "spikegan_minimal.py": ["--quick", "--threads", "1"]}
# flags that make the first training stage diverge (a non-finite loss)
DIVERGE = {"ldns_minimal.py": ["--ae-lr", "1e12"], "gnocchi_minimal.py": ["--lr", "1e12"],
           "spikegan_minimal.py": ["--lr", "1e12"]}


def run_cli(args, cwd, timeout=300):
    """Run `python <args>` in cwd with the repo on PYTHONPATH; returns the CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONDONTWRITEBYTECODE="1", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)



# =====================================================================================================================
# GNOCCHI
# =====================================================================================================================
GN_TINY = ["--quick", "--threads", "1"]  # fixed thread count: float sums run in the same order in both runs


# -----------------------------------------------------------------------------
# Components: MMD, AdaGN, attention, U-Net layouts, schedule and DDIM
# -----------------------------------------------------------------------------
def test_gn_mmd_zero_symmetric_positive():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 8, generator=g), torch.randn(128, 8, generator=g)
    assert gn.mmd(x, x).abs() < 1e-6                                   # biased V-statistic: exactly 0 on one set
    assert torch.allclose(gn.mmd(x, y), gn.mmd(y, x), rtol=0, atol=1e-6)  # up to float32 summation order
    assert gn.mmd(x, y + 1.5) > 10 * gn.mmd(x, y) > 0                   # a shifted set is far, two draws are close

    def kernel(a, b):  # utils.py compute_kernel written out: exp(-mean_l (a_l - b_l)^2 / L)
        return torch.exp(-((a[:, None] - b[None]) ** 2).mean(2) / 8)
    ref = kernel(x, x).mean() + kernel(y, y).mean() - 2 * kernel(x, y).mean()
    assert torch.allclose(gn.mmd(x, y), ref, atol=1e-5)


def test_gn_adagn_uses_code_and_output_layer_is_zero():
    torch.manual_seed(0)
    blk = gn.AuxResBlock(16, 32, 64, dropout=0.0)
    x, temb = torch.randn(4, 16, 12), torch.randn(4, 64)
    assert not torch.allclose(blk(x, temb, torch.randn(4, 64)), blk(x, temb, torch.randn(4, 64)))
    net = gn.UNet1D(N=10, C=16, L=4, T_diff=20, dropout=0.0)
    eps_hat = net(torch.randn(3, 10, 12), torch.tensor([0, 5, 19]), torch.randn(3, 4))
    assert eps_hat.shape == (3, 10, 12) and (eps_hat == 0).all()     # zero-initialised output conv
    torch.nn.init.normal_(net.tail[-1].weight)                        # once trained, the code changes eps_hat
    x, i = torch.randn(2, 10, 13), torch.tensor([3, 3])              # odd T is padded and cropped back
    assert not torch.allclose(net(x, i, torch.zeros(2, 4)), net(x, i, torch.ones(2, 4)))


def test_gn_attention_equals_scaled_dot_product_attention():
    torch.manual_seed(0)
    att, x = gn.AttnBlock(16, groups=8), torch.randn(3, 16, 11)
    h = att.norm(x)
    q, k, v = (p(h).transpose(1, 2) for p in (att.proj_q, att.proj_k, att.proj_v))  # (B, T, C)
    ref = x + att.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2))
    assert torch.allclose(att(x), ref, atol=1e-5)


def test_gn_unet_paper_layout_block_counts_and_any_length(T=13):  # T = 13 is padded to 16 for 3 downsamples
    net = gn.UNet1D(N=5, C=32, L=3, T_diff=10, dropout=0.1, ch_mult=(1, 2, 2, 2), res_blocks=2, attention=True,
                    skip_all=True, groups=32)
    blocks = [m for m in net.modules() if isinstance(m, gn.AuxResBlock)]
    assert len(blocks) == 4 * 2 + 2 + 4 * 3                           # models.py AuxiliaryUNet: 2 down, 3 up per level
    assert sum(isinstance(m, gn.AttnBlock) for m in net.modules()) == 2 + 1 + 3  # level 2 down, middle, level 2 up
    assert all(m.num_groups == 32 for m in net.modules() if isinstance(m, torch.nn.GroupNorm))
    torch.nn.init.normal_(net.tail[-1].weight)
    net.eval()
    out = net(torch.randn(2, 5, T), torch.tensor([0, 9]), torch.randn(2, 3))
    assert out.shape == (2, 5, T) and torch.isfinite(out).all() and out.abs().sum() > 0


def test_gn_schedule_ends_near_zero_and_ddim_oracle_recovers_x0():
    model = gn.GNOCCHI(gn.Config(), N=6, T=10)
    ab = model.alpha_bar
    assert (ab[1:] < ab[:-1]).all() and ab[0] < 1 and ab[-1] < 0.01    # abar_T ~ 0: x_T is almost white noise
    ref = torch.cumprod(1 - torch.linspace(1e-5, 1e-2, 1000, dtype=torch.float64), 0)[-1]  # InfoDiffusion's
    assert abs(ab[-1].item() - ref.item()) < 1e-3                        # 1000-step schedule ends at the same abar
    paper = gn.GNOCCHI(gn.parse_args(["--paper"]), N=6, T=10).alpha_bar
    assert len(paper) == 1000 and abs(paper[-1].item() - ref.item()) < 1e-5
    x0, x_T = torch.randn(5, 6, 10), torch.randn(5, 6, 10)

    def oracle(x, i):  # the exact eps for data that is the single point x0
        return (x - ab[i].sqrt()[:, None, None] * x0) / (1 - ab[i]).sqrt()[:, None, None]
    assert torch.allclose(gn.ddim_sample(oracle, x_T, ab, steps=7), x0, atol=1e-4)
    noisy = gn.ddim_sample(oracle, x_T, ab, steps=7, eta=1.0, gen=torch.Generator().manual_seed(0))
    assert torch.allclose(noisy, x0, atol=1e-4)                        # the last step has sigma = 0 and lands on x0
    q = model.q_sample(x0, torch.full((5,), 10), x_T)                 # forward process closed form
    assert torch.allclose(oracle(q, torch.full((5,), 10)), x_T, atol=1e-5)


def test_gn_lr_factor_is_warmup_to_two_then_cosine_to_zero():
    cfg = gn.Config(steps=100, warmup=10)
    f = [gn.lr_factor(s, cfg) for s in range(101)]
    assert f[0] == 1 and f[5] == 1.5 and f[10] == 2 and abs(f[55] - 1) < 1e-12 and abs(f[100]) < 1e-12
    assert all(a < b for a, b in zip(f[:10], f[1:11])) and all(a > b for a, b in zip(f[10:100], f[11:]))


# -----------------------------------------------------------------------------
# Data: held-out hygiene and the --data checks
# -----------------------------------------------------------------------------
def test_gn_heldout_targets_never_in_training_or_normalisation():
    cfg = gn.Config(trials_per_target=6, n_neurons=8)
    d = gn.make_data(cfg)
    ho_cm = {tuple(2.0 * np.array(t)) for t in gn.HELDOUT}
    assert {tuple(t) for t in d["targets"][d["heldout"]]} == ho_cm
    d1 = gn.prepare(dict(d), cfg.seed)
    assert not (d1["train"] & d["heldout"]).any() and not (d1["val"] & d["heldout"]).any()
    assert not ho_cm & {tuple(t) for t in d["targets"][d1["train"] | d1["val"]]}
    d2 = dict(d, rates=d["rates"].copy())
    d2["rates"][d["heldout"]] *= 10.0                                  # change held-out data only
    d2 = gn.prepare(d2, cfg.seed)
    assert np.array_equal(d1["x"][~d["heldout"]], d2["x"][~d["heldout"]])  # normalisation ignores held-out trials


GN_GOOD = np.random.default_rng(0).poisson(2.0, (20, 5, 12))
GN_BAD_DATA = {  # name -> (arrays saved with np.savez, or a callable writing the file; the message fragment expected)
    "nofile": (None, "no such file"),
    "nokey": (dict(counts=GN_GOOD), r"exactly one of the arrays 'rates' or 'spikes'.*\['counts'\]"),
    "both": (dict(rates=GN_GOOD * 1.0, spikes=GN_GOOD), "exactly one of the arrays"),
    "2d": (dict(rates=GN_GOOD[0] * 1.0), r"shaped \(trials >= 8, neurons, bins >= 4\), found the shape \(5, 12\)"),
    "fewtrials": (dict(spikes=GN_GOOD[:5]), r"trials >= 8.*\(5, 5, 12\)"),
    "nan": (dict(rates=np.full((20, 5, 12), np.nan)), r"finite 'rates', found 1200 NaN"),
    "inf": (dict(spikes=np.where(GN_GOOD > 3, np.inf, GN_GOOD)), r"finite 'spikes', found 0 NaN and \d+ infinite"),
    "neg": (dict(spikes=-GN_GOOD), r"non-negative integer spike counts.*found values such as \[-"),
    "fraction": (dict(spikes=GN_GOOD + 0.5), r"integer spike counts.*found values such as \[\d+\.5"),
    "npyfloat": (lambda p: np.save(p, GN_GOOD * 0.3 + 0.1), r"a \.npy file is read as spikes"),
    "toomany": (dict(spikes=np.where(GN_GOOD > 5, 501, GN_GOOD)), r"at most 500 spikes per neuron per bin.*re-bin.*501"),
    "hugerates": (dict(rates=np.full((20, 5, 12), 1e12)), r"\|rates\| <= 10000.*found a value of 1e\+12"),
    "overflow": (dict(rates=np.full((20, 5, 12), 1e200)), r"overflow float32.*1e\+200"),
    "tlen": (dict(spikes=GN_GOOD, targets=np.zeros((19, 2))), r"'targets' \(x, y\) shaped \(20, 2\).*\(19, 2\)"),
    "tnan": (dict(spikes=GN_GOOD, targets=np.full((20, 2), np.nan)), r"finite numeric 'targets'"),
    "hobool": (dict(spikes=GN_GOOD, targets=np.zeros((20, 2)), heldout=np.zeros(20)), r"'heldout' as a bool.*float64"),
    "honotargets": (dict(spikes=GN_GOOD, heldout=np.ones(20, bool)), r"'targets' with 'heldout'"),
    "hoall": (dict(spikes=GN_GOOD, targets=np.zeros((20, 2)), heldout=np.arange(20) > 2), r">= 8 training.*found 3"),
}


@pytest.mark.parametrize("name", list(GN_BAD_DATA))
def test_gn_bad_data_raises_value_error_naming_the_file_before_output(tmp_path, name):
    arrays, match = GN_BAD_DATA[name]
    path = str(tmp_path / (f"{name}.npy" if callable(arrays) else f"{name}.npz"))
    if callable(arrays):
        arrays(path)
    elif arrays is not None:
        np.savez(path, **arrays)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match) as e:
        gn.main(["--data", path, *GN_TINY, "--out", str(out)])
    assert str(e.value).startswith(f"--data {path}: expected ")
    assert not out.exists(), "outputs written before validation"


def test_gn_own_data_spikes_are_smoothed_counts_and_rates_pass_through(tmp_path):
    spikes = GN_GOOD.astype(np.float32)                                   # integer-valued floats are counts too
    np.save(tmp_path / "s.npy", spikes)
    cfg = gn.Config(smooth_bins=1.5)
    d = gn.load_data(str(tmp_path / "s.npy"), cfg)
    assert np.allclose(d["rates"], spikes @ gn.smooth_matrix(12, 1.5)) and not d["heldout"].any()
    assert np.allclose(np.full(12, 3.0) @ gn.smooth_matrix(12, 1.5), 3.0)  # a weighted mean per bin, also at edges
    np.savez(tmp_path / "r.npz", rates=-spikes, targets=np.ones((20, 2)), heldout=np.arange(20) < 4)
    d = gn.load_data(str(tmp_path / "r.npz"), cfg)
    assert np.array_equal(d["rates"], -spikes) and d["heldout"].sum() == 4 and d["targets"].shape == (20, 2)


# -----------------------------------------------------------------------------
# Training watches itself; the LFADS-like baseline
# -----------------------------------------------------------------------------
def _tiny_data(scale=1.0):
    d = gn.prepare(gn.make_data(gn.Config(n_neurons=6, trials_per_target=2)), 0)
    d["x"] = d["x"] * scale
    return d


def test_gn_gnocchi_training_stops_on_a_non_finite_loss(tmp_path):
    with pytest.raises(FloatingPointError, match=r"GNOCCHI: the training loss became nan at step \d+; likely cause"):
        gn.main([*GN_TINY, "--lr", "1e6", "--out", str(tmp_path)])
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "samples.npz").exists()


def test_gn_lfads_training_stops_on_a_non_finite_loss():
    cfg = gn.Config(code_dim=2, lfads_steps=3, batch=4)
    with pytest.raises(FloatingPointError, match="LFADS-like: the training loss became inf at step 1"):
        gn.lfads_baseline(_tiny_data(scale=1e30), cfg, torch.device("cpu"))


def test_gn_lfads_kl_matches_torch_and_generator_is_an_autonomous_gru():
    torch.manual_seed(0)
    vae, x = gn.SeqVAE(N=6, L=3, H=8, n_fac=4), torch.randn(5, 6, 9)
    mu, logvar = vae.posterior(x)
    _, kl = vae.loss(x)                                                # the posterior is deterministic given x
    q, p = torch.distributions.Normal(mu, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)
    assert abs(kl - torch.distributions.kl_divergence(q, p).sum(1).mean().item()) < 1e-5   # oracle: closed form
    g0 = torch.randn(2, 3)
    out = vae.decode(g0, 9)
    assert out.shape == (2, 6, 9) and not torch.allclose(out, vae.decode(-g0, 9))
    # oracle: the GRU equations unrolled by hand from h_0 = tanh(W g0 + b) with zero inputs
    W_hh, b_ih, b_hh = vae.generator.weight_hh_l0, vae.generator.bias_ih_l0, vae.generator.bias_hh_l0
    h, ref = torch.tanh(vae.to_h0(g0)), []
    for _ in range(9):
        a_i, a_h = b_ih.chunk(3), (h @ W_hh.T + b_hh).chunk(3, dim=1)
        r, z = torch.sigmoid(a_i[0] + a_h[0]), torch.sigmoid(a_i[1] + a_h[1])
        h = (1 - z) * torch.tanh(a_i[2] + r * a_h[2]) + z * h
        ref.append(vae.readout(vae.to_fac(h)))
    assert torch.allclose(out, torch.stack(ref, 2), atol=1e-5)
    assert torch.allclose(vae.decode(g0, 4), out[..., :4], atol=1e-6)   # shorter unroll = prefix: no look-ahead


# -----------------------------------------------------------------------------
# --paper: InfoDiffusion's scale built in full, one optimiser step at the paper's shapes
# -----------------------------------------------------------------------------
def test_gn_paper_preset_models_at_full_size_take_one_step(capsys):
    cfg = gn.parse_args(["--paper"])
    assert (cfg.preset, cfg.channels, cfg.ch_mult, cfg.res_blocks, cfg.code_dim) == ("paper", 64, "1,2,2,2", 2, 32)
    assert (cfg.diff_steps, cfg.beta_1, cfg.beta_T, cfg.lr, cfg.dropout, cfg.ddim_steps, cfg.ddim_eta) == (
        1000, 1e-5, 1e-2, 1e-4, 0.1, 1000, 0.01)
    N, T = gn.Config().n_neurons, 36                                   # the reach demo's shapes
    torch.manual_seed(0)
    model = gn.GNOCCHI(cfg, N, T)
    n_enc = sum(p.numel() for p in model.encoder.parameters())
    n_eps = sum(p.numel() for p in model.eps_model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    params = {id(p) for p in model.parameters()}
    saved = []

    def pack(t):  # bytes of the activations autograd keeps for the backward pass (parameters excluded)
        saved.append(0 if id(t) in params or t._base is not None and id(t._base) in params else t.nbytes)
        return t
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, parts = model.loss(torch.randn(2, N, T))
    loss.backward()
    opt.step()
    assert np.isfinite(loss.item()) and all(np.isfinite(v) for v in parts.values())
    assert model.eps_model.tail[-1].weight.abs().sum() > 0              # the zero output conv moved first
    loss, _ = model.loss(torch.randn(2, N, T))                         # from now on every layer gets a gradient
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert sum(not torch.equal(a, p) for a, p in zip(before, model.parameters())) > 0.9 * len(before)
    model.eval()
    x = model.sample(torch.randn(2, cfg.code_dim), torch.Generator().manual_seed(0), steps=3)
    assert x.shape == (2, N, T) and torch.isfinite(x).all()
    n = n_enc + n_eps
    with capsys.disabled():
        print(f"\n--paper GNOCCHI: encoder {n_enc:,} + eps_theta U-Net {n_eps:,} = {n:,} parameters; "
              f"activations {sum(saved) / 2 / 2**20:.2f} MiB per trial in training; params + grads + AdamW "
              f"{16 * n / 2**20:.0f} MiB")
    gn.report_size(model, cfg, torch.device("cpu"))
    text = capsys.readouterr().out
    assert "WARNING: --paper" in text and f"{n / 1e6:.2f}M parameters" in text and "20000 training steps" in text


def test_gn_paper_lfads_like_baseline_takes_one_step():
    cfg = gn.parse_args(["--paper", "--lfads-steps", "1", "--batch", "2"])
    codes, gen, kl = gn.lfads_baseline(_tiny_data(), cfg, torch.device("cpu"))
    assert codes.shape[1] == 32 and gen(codes[:2]).shape == (2, 6, 36) and np.isfinite(kl)


# -----------------------------------------------------------------------------
# One --quick run end to end: gnocchi's own outputs; the same seed gives the same metrics
# -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gnocchi_quick")
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONDONTWRITEBYTECODE="1", MPLBACKEND="Agg")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "gnocchi_minimal.py"), *GN_TINY, "--out", str(out)], cwd=out,
                       env=env, capture_output=True, text=True, timeout=600)
    return r, out


def test_gn_quick_end_to_end(quick_run):
    r, out = quick_run
    assert r.returncode == 0, r.stderr
    for f in ("config.json", "metrics.json", "timing.json", "samples.npz", "codes.npz", "gnocchi.pt"):
        assert (out / f).exists(), f
    assert {p.name for p in (out / "figures").glob("*.png")} == {
        "task.png", "latents.png", "heldout_prediction.png", "traversal.png", "psth.png", "summary.png"}
    metrics = json.loads((out / "metrics.json").read_text())
    for prefix in ("gnocchi", "pca", "lfads"):
        for k in ("heldout_r2", "psth_r2", "cos_wx_wy", "snr_train", "unwanted", "gen_endpoint_err_cm"):
            assert np.isfinite(metrics[f"{prefix}_{k}"]), (prefix, k)
    assert 0 <= metrics["gnocchi_cos_wx_wy"] <= 1 and "targets" not in metrics
    with np.load(out / "codes.npz") as c, np.load(out / "samples.npz") as s:
        M = len(c["codes"])
        assert c["codes"].shape == (M, 4) and c["baseline_codes"].shape == c["lfads_codes"].shape == (M, 4)
        assert c["targets"].shape == (M, 2) and c["heldout"].dtype == bool and c["heldout"].shape == (M,)
        assert list(s.keys())[:2] == ["real", "generated"] and s["real"].shape[1:] == s["generated"].shape[1:]
        assert len(s["real"]) == c["heldout"].sum() and len(s["generated"]) == 3 * 4   # 3 held-out targets x K
        assert s["real"].min() >= 0                                      # in the data's units (Hz), not z units
    sd = torch.load(out / "gnocchi.pt", weights_only=True)
    assert any(k.startswith("encoder.") for k in sd) and any(k.startswith("eps_model.down.") for k in sd)
