"""Temporary part of test_minimal.py (spikegan); merged back into test_minimal.py by the lead."""
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
# Spike-GAN
# =====================================================================================================================
SG_TINY = ["--n-train", "256", "--n-test", "128", "--n-gen", "256", "--iters", "4", "--eval-every", "2",
           "--d-features", "4", "--g-features", "4", "--window", "16", "--neurons", "8"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread in this module (small ops on a shared CPU), restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Linear(torch.nn.Module):
    """A linear critic D(x) = <w, x> that records its inputs."""

    def __init__(self, w):
        super().__init__()
        self.w = w
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach())
        return (x * self.w).flatten(1).sum(1)


# -----------------------------------------------------------------------------
# WGAN-GP objective
# -----------------------------------------------------------------------------
def test_sg_gradient_penalty_norm_over_all_non_batch_dims():
    torch.manual_seed(0)
    w = torch.randn(3, 5)                                  # (N, T): grad of a linear critic is w for every sample
    x, xf = torch.rand(4, 3, 5), torch.rand(4, 3, 5)
    gp = sg.gradient_penalty(Linear(w), x, xf)
    assert torch.allclose(gp, (w.norm() - 1) ** 2)         # Frobenius norm of the whole sample, not per row
    assert not torch.allclose(gp, ((w.norm(dim=1) - 1) ** 2).mean())


def test_sg_gradient_penalty_zero_for_unit_norm_linear_critic_and_interpolates_on_segment():
    torch.manual_seed(1)
    w = torch.randn(3, 5)
    D = Linear(w / w.norm())
    x, xf = torch.rand(6, 3, 5), torch.rand(6, 3, 5)
    alpha = torch.rand(6, 1, 1)
    assert sg.gradient_penalty(D, x, xf, alpha).abs() < 1e-10
    assert torch.allclose(D.seen[-1], x + alpha * (xf - x))    # one alpha per sample
    sg.gradient_penalty(D, x, xf)                               # random alpha: still between x and x_fake
    t = (D.seen[-1] - x) / (xf - x)                            # (B, N, T), constant within a sample
    assert torch.allclose(t, t[:, :1, :1].expand_as(t), atol=1e-4)
    assert (t >= 0).all() and (t <= 1).all()


def test_sg_fused_critic_pass_equals_separate_passes():
    torch.manual_seed(0)
    D = sg.init_weights(sg.Critic(N=8, T=16, F_=4))
    x, x_fake = (torch.rand(6, 8, 16) < 0.2).float(), torch.rand(6, 8, 16)
    torch.manual_seed(1)                                       # same interpolation weights alpha in both
    fused = sg.critic_loss(D, x, x_fake)
    torch.manual_seed(1)
    separate = D(x_fake).mean() - D(x).mean() + 10.0 * sg.gradient_penalty(D, x, x_fake)
    assert torch.allclose(fused, separate, atol=1e-6)


# -----------------------------------------------------------------------------
# Model and training
# -----------------------------------------------------------------------------
def test_sg_generator_shape_range_and_init():
    torch.manual_seed(0)
    G = sg.init_weights(sg.Generator(16, 32, 8))
    p = G(torch.randn(5, 128))
    assert p.shape == (5, 16, 32) and (p > 0).all() and (p < 1).all()
    assert sg.Critic(16, 32, 8)(p).shape == (5,)
    for name, prm in G.named_parameters():
        if name.endswith("bias"):
            assert (prm == 0).all()
        else:
            assert prm.abs().max() <= 0.02 * math.sqrt(3)


def test_sg_one_training_iteration_changes_both_nets():
    cfg = sg.Config(iters=1, d_features=4, g_features=4, batch=16)
    x = np.random.default_rng(0).random((64, 8, 16)) < 0.2
    torch.manual_seed(0)
    G, D = sg.make_models(cfg, 8, 16)
    before = [p.detach().clone() for p in [*G.parameters(), *D.parameters()]]
    assert sg.train(cfg, G, D, x, torch.device("cpu")) == []  # no monitor, no history
    changed = [not torch.equal(a, b) for a, b in zip(before, [*G.parameters(), *D.parameters()])]
    n_G = len(list(G.parameters()))
    assert any(changed[:n_G]) and any(changed[n_G:])


def test_sg_lr_schedule_linear_decay_and_constant():
    cfg = sg.Config(lr=4e-3, iters=100)
    assert sg.lr_at(cfg, 0) == 4e-3 and math.isclose(sg.lr_at(cfg, 50), 2e-3) and sg.lr_at(cfg, 100) == 0
    assert sg.lr_at(dataclasses.replace(cfg, lr_decay=False), 99) == 4e-3


def test_sg_real_batches_cover_the_training_set_once_per_epoch():
    torch.manual_seed(0)
    data = torch.arange(10, dtype=torch.uint8).view(10, 1, 1)            # (S, N, T) = (10, 1, 1), sample i holds i
    it = sg.real_batches(data, 3)
    epochs = [torch.cat([next(it).flatten() for _ in range(3)]) for _ in range(2)]   # 3 full batches per epoch
    for e in epochs:
        assert e.dtype == torch.float32 and len(set(e.tolist())) == 9   # no sample twice within an epoch
    assert not torch.equal(epochs[0], epochs[1])                        # reshuffled


def test_sg_sample_and_binarize_draw_on_the_cpu_from_their_generator():
    torch.manual_seed(0)
    G = sg.init_weights(sg.Generator(4, 8, 2))
    p = sg.sample(G, 5, 128, torch.Generator().manual_seed(7), chunk=2)
    with torch.no_grad():
        assert torch.equal(p, G(torch.randn(5, 128, generator=torch.Generator().manual_seed(7))))
    x = sg.binarize(p, torch.Generator().manual_seed(1))
    u = torch.rand(p.shape, generator=torch.Generator().manual_seed(1))
    assert x.dtype == bool and (x == (p > u).numpy()).all()


def test_sg_training_stops_at_a_non_finite_loss():
    cfg = sg.Config(iters=3, d_features=4, g_features=4, batch=16, lr=1e10)
    x = np.random.default_rng(0).random((64, 8, 16)) < 0.2
    torch.manual_seed(0)
    G, D = sg.make_models(cfg, 8, 16)
    with pytest.raises(FloatingPointError, match=r"Spike-GAN (critic|generator): the training loss became .* step 1"):
        sg.train(cfg, G, D, x, torch.device("cpu"))


# -----------------------------------------------------------------------------
# --paper: the paper's Fig 2 configuration at full size
# -----------------------------------------------------------------------------
def paper_cfg():
    return sg.parse_args(["--paper"])


def test_sg_paper_preset_is_the_fig2_configuration():
    cfg = paper_cfg()
    assert cfg.preset == "paper" and cfg.demo == "uniform"
    assert (cfg.neurons, cfg.window, cfg.n_train, cfg.d_features, cfg.g_features) == (16, 128, 8192, 128, 128)
    assert (cfg.lr, cfg.lr_decay, cfg.batch, cfg.critic_iters, cfg.iters) == (1e-4, False, 64, 5, 300000)
    assert (cfg.lambd, cfg.layers, cfg.kernel, cfg.z_dim) == (10.0, 2, 5, 128)
    assert all(sg.lr_at(cfg, t) == 1e-4 for t in (0, 150000, 299999))


def test_sg_paper_models_full_size_and_one_optimiser_step_at_batch_2(capsys):
    cfg = paper_cfg()
    torch.manual_seed(0)
    G, D = sg.make_models(cfg, cfg.neurons, cfg.window)
    n_G = sum(p.numel() for p in G.parameters())
    n_D = sum(p.numel() for p in D.parameters())
    with capsys.disabled():
        print(f"\n  --paper: generator {n_G} parameters, critic {n_D} parameters")
    N, T, Fc = 16, 128, 128                                    # paper Fig 1: critic channels 256, 512
    assert n_D == (N * 2 * Fc * 5 + 2 * Fc) + (2 * Fc * 4 * Fc * 5 + 4 * Fc) + (4 * Fc * T // 4 + 1) == 692993
    assert n_G == (128 * 4 * Fc * T // 4 + 4 * Fc * T // 4) + (4 * Fc * 2 * Fc * 5 + 2 * Fc) + (2 * Fc * N * 5 + N)
    assert round(n_D / 1e6, 2) == 0.69 and round(n_G / 1e6, 2) == 2.79   # the repo's paper-time counts
    before = [p.detach().clone() for p in [*G.parameters(), *D.parameters()]]
    x = np.random.default_rng(0).random((4, N, T)) < 0.1
    step = dataclasses.replace(cfg, iters=1, critic_iters=1, batch=2)    # one critic step (with GP), one G step
    sg.train(step, G, D, x, torch.device("cpu"))
    after = [*G.parameters(), *D.parameters()]
    assert all(torch.isfinite(p).all() for p in after)
    changed = [not torch.equal(a, b) for a, b in zip(before, after)]
    n_G = len(list(G.parameters()))
    assert all(changed[:n_G]) and any(changed[n_G:])


def test_sg_paper_on_cpu_warns_with_the_size_of_the_job(capsys):
    cfg = paper_cfg()
    G, D = sg.make_models(dataclasses.replace(cfg, g_features=2, d_features=2), 16, 128)  # counts only
    sg.warn_if_paper_on_cpu(cfg, G, D, torch.device("cpu"))
    err = capsys.readouterr().err
    assert "WARNING" in err and "300000 generator iterations" in err and "GPU" in err
    sg.warn_if_paper_on_cpu(cfg, G, D, torch.device("cuda"))          # no warning on a GPU, nor without --paper
    sg.warn_if_paper_on_cpu(sg.parse_args([]), G, D, torch.device("cpu"))
    assert capsys.readouterr().err == ""


def test_sg_quick_preset_caps_importance_maps():
    assert sg.parse_args(["--quick", "--demo", "packets"]).importance == 32
    assert sg.parse_args(["--demo", "packets"]).importance == 512


# -----------------------------------------------------------------------------
# Data generators
# -----------------------------------------------------------------------------
def test_sg_uniform_data_rates_correlations_and_refractory_dip():
    cfg = sg.Config()
    rng = np.random.default_rng(0)
    prm = sg.make_params(cfg, rng)
    x = sg.make_uniform(cfg, 2048, prm, rng)
    st = sg.spike_stats(x)
    assert x.shape == (2048, 16, 32) and 0.08 < x.mean() < 0.15          # ~0.119 at T 32 (sim_pop_activity.py)
    ratio = st["acg"][11:14] / x.mean()                                  # lags 1, 2, 3
    assert ratio[0] < 0.2 and ratio[0] < ratio[1] < ratio[2] < 1.0      # ~.12 .37 .64
    r = np.corrcoef(x.transpose(1, 0, 2).reshape(16, -1))               # (N, S*T) -> (N, N)
    first = [np.where(prm["perm"] == 2 * g)[0][0] for g in range(8)]
    second = [np.where(prm["perm"] == 2 * g + 1)[0][0] for g in range(8)]
    r_pair = r[first, second]
    assert r_pair.min() > 0.03 and np.abs(r[np.triu_indices(16, 1)]).sum() - r_pair.sum() < 0.02 * 112


def test_sg_refractory_rules():
    rng = np.random.default_rng(0)
    x = rng.random((4000, 30)) < 0.3
    h = sg.refractory_hard(x.copy(), 0.3, 3, rng)
    assert all((np.diff(np.flatnonzero(row)) > 3).all() for row in h) and h.sum() > 0
    s = sg.refractory_soft(x.copy(), np.full(4000, 0.3), 2.0, rng)
    assert (s <= x).all()                                               # only deletes spikes
    assert (s[:, :-1] & s[:, 1:]).mean() < 0.2 * s.mean() ** 2         # strong lag-1 suppression


def test_sg_packet_test_set_onsets_in_window():
    cfg = sg.Config(demo="packets", rate=1e-9, group=8, neurons=16, window=32)
    rng = np.random.default_rng(0)
    prm = sg.make_params(cfg, rng)
    x = sg.make_packets(cfg, 200, prm, rng, test=True)[:, np.argsort(prm["perm"])]   # undo the permutation
    assert x[:, 8:].sum() == 0                                          # only group 0 carries packets
    on = x[:, 0]                                                        # neuron 0 fires at the onsets
    assert on[:, :8].sum() == 0 and on[:, 17:].sum() == 0 and on.sum() > 50
    assert (x[:, 3, 3:] == on[:, :-3]).all()                            # neuron k fires at t0 + k


# -----------------------------------------------------------------------------
# Baseline, statistics, importance
# -----------------------------------------------------------------------------
def test_sg_phi2_matches_closed_form():
    rho = torch.tensor([-0.9, -0.3, 0.0, 0.5, 0.95], dtype=torch.float64)
    z = torch.zeros_like(rho)
    assert torch.allclose(sg.Phi2(z, z, rho), 0.25 + torch.arcsin(rho) / (2 * math.pi), atol=1e-6)


def test_sg_dg_fit_reproduces_rates_and_covariances():
    rng = np.random.default_rng(0)
    N, T, S = 3, 4, 20000                                               # a true DG with lag-0 and lag-1 structure
    u = rng.standard_normal((S, N, T + 1))
    u = u[..., 1:] + 0.6 * u[..., :-1] + 0.5 * u[:, :1, 1:]             # temporal + shared input
    x = u > np.array([1.0, 0.5, 1.2])[:, None] * u.std()
    gamma, A = sg.fit_dg(x)
    y = sg.sample_dg(gamma, A, 40000, torch.Generator().manual_seed(0))
    sx, sy = sg.spike_stats(x, 2), sg.spike_stats(y, 2)
    assert np.abs(x.mean((0, 2)) - y.mean((0, 2))).max() < 0.01
    assert np.abs(sx["cov"] - sy["cov"]).max() < 0.01 and np.abs(sx["lag_cov"] - sy["lag_cov"]).max() < 0.01


def test_sg_importance_is_zero_where_there_is_no_spike():
    torch.manual_seed(0)
    D = sg.init_weights(sg.Critic(6, 16, 4))
    x = (torch.rand(10, 6, 16) < 0.3).float()
    I = sg.importance_map(D, x, P=4, reps=2, gen=torch.Generator().manual_seed(0))
    assert I.shape == (10, 6, 16) and (I[x.numpy() == 0] == 0).all() and (I[x.numpy() == 1] > 0).mean() > 0.9


def test_sg_spike_stats_on_a_known_pattern():
    x = np.zeros((1, 2, 8), bool)
    x[0, 0, [0, 2, 4]] = True                                           # period-2 train: lag-1 never, lag-2 often
    st = sg.spike_stats(x, 3)
    assert np.allclose(st["acg"], [0, 2 / 3, 0, 0, 0, 2 / 3, 0]) and st["lag1_ratio"] == 0
    assert np.allclose(st["k_probs"], [5 / 8, 3 / 8, 0]) and np.allclose(st["mean"], [3, 0])


# -----------------------------------------------------------------------------
# End to end: the metrics describe Spike-GAN's own samples
# -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sg_tiny")
    return out, sg.main([*SG_TINY, "--out", str(out)])


def test_sg_end_to_end_metrics_are_spike_gans_samples(tiny_run):
    out, metrics = tiny_run
    with np.load(out / "samples.npz") as z:
        real, gen, probs, dg = z["real"], z["generated"], z["generated_probs"], z["dg"]
    assert real.shape == (128, 8, 16) and gen.shape == probs.shape == dg.shape == (256, 8, 16)
    assert set(np.unique(gen)) <= {0, 1} and ((probs > 0) & (probs < 1)).all()
    assert not np.array_equal(gen, dg)
    assert abs(gen.mean() - probs.mean()) < 0.02                        # Bernoulli draws of the probabilities
    ours = sg.compare(sg.spike_stats(gen.astype(bool)), sg.spike_stats(real.astype(bool)))
    for k, v in ours.items():                                           # metrics["Spike-GAN"] is these samples'
        assert metrics["Spike-GAN"][k] == pytest.approx(v, nan_ok=True), k
    assert metrics["Spike-GAN"] != metrics["DG"]
    assert [h["iter"] for h in metrics["history"]] == [2, 4] and json.loads((out / "metrics.json").read_text())
    G = sg.Generator(8, 16, 4)
    G.load_state_dict(torch.load(out / "generator.pt", weights_only=True))
    assert "targets" not in metrics


def test_sg_long_series_is_cut_into_windows(tmp_path):
    x = (np.random.default_rng(0).random((1000, 5)) < 0.1).astype(np.uint8)
    np.savez(tmp_path / "s.npz", spikes=x)
    cfg = sg.Config(data=str(tmp_path / "s.npz"), window=16, stride=8, batch=8)
    tr, te = sg.load_spikes(cfg, np.random.default_rng(0))
    assert tr.shape == ((800 - 16) // 8 + 1, 5, 16) and te.shape == ((200 - 16) // 8 + 1, 5, 16)
    assert (tr[1] == x[8:24].T).all() and (te[0] == x[800:816].T).all()


def test_sg_own_data_runs_and_same_seed_gives_identical_metrics(tmp_path):
    x = np.random.default_rng(0).random((400, 8, 16)) < 0.1
    np.save(tmp_path / "x.npy", x)
    runs = []
    for name in ("a", "b"):
        sg.main(["--data", str(tmp_path / "x.npy"), "--out", str(tmp_path / name), *SG_TINY])
        runs.append((tmp_path / name / "metrics.json").read_text())
    assert runs[0] == runs[1]
    assert json.loads(runs[0])["data"]["shape"] == [320, 8, 16]


# -----------------------------------------------------------------------------
# --data checks: each bad file stops with the intended ValueError before anything is written
# -----------------------------------------------------------------------------
def _binary(shape, p=0.1, seed=0):
    return np.random.default_rng(seed).random(shape) < p


def _always_on():
    x = _binary((300, 4, 8))
    x[:, 2] = True
    return x


SG_BAD_DATA = [
    ("counts.npy", lambda: np.full((300, 4, 8), 2),
     r"expected binary spikes \(0 or 1 in every bin\), found the values \[2\]"),
    ("nan.npy", lambda: np.where(np.eye(8)[None].repeat(300, 0) > 0, np.nan, 0.0), "found 2400 NaN or inf values"),
    ("4d.npy", lambda: np.zeros((10, 4, 8, 2)), r"\(trials, neurons, bins\) or \(time, neurons\) array, found shape"),
    ("empty.npy", lambda: np.zeros((0, 4, 8)), r"non-empty .* found shape \(0, 4, 8\)"),
    ("silent.npy", lambda: np.zeros((300, 4, 8)), r"expected some spikes, found none"),
    ("always.npy", _always_on, r"found neurons \[2\] spiking in every bin"),
    ("full.npy", lambda: np.ones((300, 4, 8)), r"found neurons \[0, 1, 2, 3\] spiking in every bin"),
    ("few.npy", lambda: _binary((20, 4, 8)), r"at least 128 training and 16 held-out samples, found 16 and 4"),
    ("odd_bins.npy", lambda: _binary((300, 4, 6)), r"multiple of 2\^layers = 4, found 6"),
    ("transposed.npy", lambda: _binary((8, 5000)), r"transpose it"),
    ("late_spikes.npy", lambda: np.concatenate([np.zeros((5000, 4)), _binary((1000, 4), 0.3)]), "training part"),
]


@pytest.mark.parametrize("fname, make, match", SG_BAD_DATA, ids=[b[0] for b in SG_BAD_DATA])
def test_sg_bad_data_raises_the_intended_value_error_before_output(tmp_path, fname, make, match):
    np.save(tmp_path / fname, make())
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match) as e:
        sg.main(["--data", str(tmp_path / fname), "--out", str(out), "--quick", "--window", "32"])
    assert str(tmp_path / fname) in str(e.value)                        # the message names the file
    assert not out.exists()


def test_sg_bad_data_files_and_keys(tmp_path):
    out = tmp_path / "out"
    np.savez(tmp_path / "y.npz", counts=_binary((300, 4, 8)))
    with pytest.raises(ValueError, match=r"expected an array named 'spikes', found \['counts'\]"):
        sg.main(["--data", str(tmp_path / "y.npz"), "--out", str(out), "--quick"])
    (tmp_path / "x.txt").write_text("0 1 0\n")
    with pytest.raises(ValueError, match=r"expected a \.npy file or a \.npz archive .* found a file with the ext"):
        sg.main(["--data", str(tmp_path / "x.txt"), "--out", str(out), "--quick"])
    (tmp_path / "bad.npz").write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match=r"bad\.npz: expected a \.npy file or a \.npz archive"):
        sg.main(["--data", str(tmp_path / "bad.npz"), "--out", str(out), "--quick"])
    assert not out.exists()
