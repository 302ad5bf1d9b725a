"""Tests for the reaching demo / conditional denoisers (issue 16), against the prototype names in code_to_add.py.
In ldns_minimal.py: X = ldns_minimal for both `X` and `base` below."""
import os
import subprocess
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
import code_to_add as X  # noqa: E402
import ldns_base as base  # noqa: E402


def angle_c(theta):
    th = torch.tensor(theta, dtype=torch.float32)
    return torch.stack([torch.cos(th), torch.sin(th)], 1)     # (B,2)


def test_untrained_conditional_model_ignores_c_then_one_step_uses_it():
    torch.manual_seed(0)
    dn = X.Denoiser(4, 16, 2, 8, d_cond=2)
    ddpm = X.DDPM(1000)
    z, t = torch.randn(2, 4, 24), torch.tensor([500, 500])
    c1, c2 = angle_c([0.0, 0.0]), angle_c([2.0, 2.0])
    with torch.no_grad():
        assert torch.equal(dn(z, t, c=c1), dn(z, t, c=c2))    # zero-init adaLN: c cannot reach the output
    opt = torch.optim.AdamW(dn.parameters(), lr=1e-3)
    loss = ddpm.loss(dn, torch.randn(8, 4, 24), c=angle_c(np.linspace(-3, 3, 8)))
    loss.backward()
    opt.step()
    with torch.no_grad():
        diff = (dn(z, t, c=c1) - dn(z, t, c=c2)).abs().max()
    assert diff > 1e-6                                         # same noise, different angles -> different outputs


def test_velocity_channels_excluded_from_loss():
    torch.manual_seed(0)
    d = 4
    dn = X.Denoiser(d, 16, 1, 8, d_extra=2)
    assert dn.conv_out.out_channels == d + 2
    ddpm = X.DDPM(1000)
    x0, extra = torch.randn(6, d, 24), torch.randn(6, 2, 24)
    torch.manual_seed(1)
    loss = ddpm.loss(dn, x0, extra=extra)
    loss.backward()
    assert dn(x0, torch.zeros(6, dtype=torch.long), extra=extra).shape == (6, d, 24)
    assert torch.count_nonzero(dn.conv_out.weight.grad[d:]) == 0   # the velocity outputs get no gradient
    assert torch.count_nonzero(dn.conv_out.bias.grad[d:]) == 0
    with torch.no_grad():                                      # changing what the velocity outputs predict ...
        dn.conv_out.weight[d:] += 5.0
        dn.conv_out.bias[d:] -= 3.0
    torch.manual_seed(1)
    assert torch.equal(ddpm.loss(dn, x0, extra=extra), loss.detach())  # ... changes nothing


def test_extra_channels_reach_the_output_and_grouping_rule():
    torch.manual_seed(0)
    dn = X.Denoiser(8, 64, 1, 8, d_extra=2)
    assert dn.conv_in.groups == 1                              # 64 % 10 != 0 -> ungrouped (official rule)
    assert X.Denoiser(8, 64, 1, 8).conv_in.groups == 8
    z, t = torch.randn(2, 8, 16), torch.tensor([10, 10])
    with torch.no_grad():
        assert not torch.equal(dn(z, t, extra=torch.zeros(2, 2, 16)), dn(z, t, extra=torch.ones(2, 2, 16)))


def test_unconditional_denoiser_and_loss_unchanged():
    torch.manual_seed(0)
    old = base.Denoiser(8, 64, 2, 16)
    torch.manual_seed(0)
    new = X.Denoiser(8, 64, 2, 16)
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))
    x0 = torch.randn(4, 8, 32)
    torch.manual_seed(3)
    l_old = base.DDPM(1000).loss(old, x0)
    torch.manual_seed(3)
    l_new = X.DDPM(1000).loss(new, x0)
    assert torch.equal(l_old, l_new)


def test_sample_passes_condition_at_every_step():
    seen = []

    def model(x, t, c=None, extra=None):
        seen.append((c is not None, extra is not None))
        return torch.zeros_like(x)
    X.DDPM(1000).sample(model, (3, 2, 8), 5, 1.0, c=torch.zeros(3, 2), extra=torch.zeros(3, 2, 8))
    assert seen == [(True, True)] * 5


def test_decoder_recovers_known_linear_map():
    rng = np.random.default_rng(0)
    rates = rng.gamma(2.0, 0.1, (40, 20, 30))                 # (K,N,T) positive synthetic rates
    W_true, b_true = rng.standard_normal((20, 2)), np.array([0.3, -0.2])
    v = X.decode_velocity(rates, W_true, b_true)               # (K,2,T)
    W, b = X.fit_ridge(X.bins_as_rows(rates), X.bins_as_rows(v), 1e-6)
    np.testing.assert_allclose(W, W_true, atol=1e-5)
    np.testing.assert_allclose(b, b_true, atol=1e-5)
    assert X.r2_score(v, X.decode_velocity(rates, W, b)) > 1 - 1e-9
    assert X.r2_score(v, np.zeros_like(v) + v.mean((0, 2), keepdims=True)) < 1e-9


def test_reach_data_and_conditions():
    d = X.make_reach_data(50, 64, 20, np.random.default_rng(0))
    assert d["spikes"].shape == (50, 20, 64) and d["velocity"].shape == (50, 2, 64)
    assert d["spikes"].dtype == np.int64 and (d["spikes"] >= 0).all()
    speed = np.hypot(*d["velocity"].transpose(1, 0, 2))        # (K,T)
    assert (speed[:, 0] == 0).all() and (speed[:, -1] == 0).all()   # at rest before onset and after the reach
    assert (speed[:, 25] > 0).all()                            # bin 0.39 T lies inside every reach
    theta, c = X.reach_condition(torch.tensor(d["velocity"]), 25)
    assert X.angular_error_deg(theta.numpy(), d["angle"]).max() < 1e-3   # straight reaches
    assert X.angular_error_deg(X.reach_direction(d["velocity"]), d["angle"]).max() < 1e-3
    np.testing.assert_allclose(c.norm(dim=1).numpy(), 1, atol=1e-6)
    again = X.make_reach_data(50, 64, 20, np.random.default_rng(0))
    assert all(np.array_equal(d[k], again[k]) for k in d)     # its own seeded generator


def test_angular_error_wraps():
    np.testing.assert_allclose(X.angular_error_deg(np.array([np.pi - 0.1]), np.array([-np.pi + 0.1])),
                               np.degrees(0.2), atol=1e-9)


def test_quick_demo_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "run_demo.py"), "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    s = np.load(tmp_path / "samples.npz")
    assert {"real", "generated", "generated_velocity", "angle_requested", "velocity_requested"} <= set(s.files)
    assert (tmp_path / "metrics.json").exists()
    assert {f"{i}_reach_{n}.png" for i, n in ((6, "angle_fan"), (7, "velocity"), (8, "raster"))} <= set(
        os.listdir(tmp_path / "figures"))
