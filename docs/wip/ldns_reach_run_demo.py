"""End-to-end prototype of `--demo reach` (issue 16): data -> AE -> angle- and velocity-conditioned denoisers ->
sampling -> behaviour evaluation -> figures -> samples.npz / metrics.json. Prints the metrics and the time per stage.

  python run_demo.py [--out DIR] [--threads 1] [--condition both|angle|velocity] [--quick] [key=value ...]
"""
import argparse
import json
import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ldns_base as base  # noqa: E402
import code_to_add as X  # noqa: E402

DEFAULTS = dict(seed=0, n_trials=1500, n_bins=128, n_neurons=128, ae_channels=64, ae_blocks=2, d_latent=8,
                d_state=64, ae_steps=400, ae_batch=64, ae_lr=2e-3, mask_p=0.2, beta_lat=0.01, beta_td=0.01,
                dn_channels=64, dn_blocks=2, dn_steps=600, dn_batch=64, dn_lr=2e-3, n_diffusion=1000,
                sample_steps=40, eta=1.0, angle_bin=50, n_angles=8, n_per_angle=32, n_vel=128, ridge_alpha=1e-6,
                condition="both")
QUICK = dict(n_trials=60, n_bins=32, n_neurons=32, ae_channels=16, ae_blocks=1, d_state=16, ae_steps=100,
             dn_channels=16, dn_blocks=1, dn_steps=100, sample_steps=10, angle_bin=12, n_per_angle=2, n_vel=8)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/reach/out")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--condition", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("kv", nargs="*")
    a = p.parse_args()
    cfg = dict(DEFAULTS, **(QUICK if a.quick else {}))
    for kv in a.kv:
        k, v = kv.split("=")
        cfg[k] = type(DEFAULTS[k])(v)
    if a.condition:
        cfg["condition"] = a.condition
    cfg = SimpleNamespace(**cfg)
    torch.set_num_threads(a.threads)
    base.set_seed(cfg.seed)
    os.makedirs(os.path.join(a.out, "figures"), exist_ok=True)
    timing, cpu = {}, {}
    t0, c0 = time.time(), time.process_time()

    def lap(stage):
        nonlocal t0, c0
        timing[stage] = round(time.time() - t0, 2)
        cpu[stage] = round(time.process_time() - c0, 2)
        t0, c0 = time.time(), time.process_time()

    # 1) data
    rng = np.random.default_rng(cfg.seed)
    data = X.make_reach_data(cfg.n_trials, cfg.n_bins, cfg.n_neurons, rng)
    K, N, T = data["spikes"].shape
    tr, va, te = base.split_trials(K, rng)
    print(f"[data] {K} trials x {N} neurons x {T} bins, train/val/test {len(tr)}/{len(va)}/{len(te)}, "
          f"mean count {data['spikes'].mean():.3f}")
    x = torch.tensor(data["spikes"], dtype=torch.float32)
    v = torch.tensor(data["velocity"])                             # (K,2,T) m/s
    x_tr = x[tr]
    lap("data")

    # 2) autoencoder (shared by both conditional models)
    ae = base.AutoEncoder(N, cfg.ae_channels, cfg.d_latent, cfg.ae_blocks, cfg.d_state)
    base.fit(ae, lambda idx: base.ae_loss(ae, x_tr[idx], cfg), len(tr), cfg.ae_batch, cfg.ae_steps, cfg.ae_lr, 2.0,
             "AE")
    ae.eval()
    z_all = base.batched(ae.encode, x)
    rates_hat = base.batched(ae.decode, z_all)
    lap("autoencoder")

    # 3) one latent normalisation for both conditional denoisers (base pipeline: train statistics, clamp +-5)
    z_tr = z_all[tr]
    mu, sigma = z_tr.mean((0, 2), keepdim=True), z_tr.std((0, 2), keepdim=True)
    zn_tr = ((z_tr - mu) / sigma).clamp(-5, 5)
    ddpm = X.DDPM(cfg.n_diffusion)
    lap("latent_normalisation")
    models, v_scale = X.train_reach_denoisers(cfg, ddpm, zn_tr, v[tr], base.fit, lap)

    # 4) conditioned sampling: the angle grid, and the held-out velocity traces
    v_req = data["velocity"][te[:cfg.n_vel]]
    gen = X.sample_reach(cfg, ddpm, models, ae, mu, sigma, T, v_req, v_scale, lap)

    # 5) evaluation
    rh = rates_hat.cpu().numpy()
    res, dec = X.reach_metrics(cfg, data, tr, te, rh, gen)
    lap("evaluation")
    X.make_reach_figures(os.path.join(a.out, "figures"), data, te, dec, gen["angles_req"], gen["rates_angle"],
                         gen["spikes_angle"], v_req, gen["rates_vel"])
    real = data["spikes"][tr]
    spikes_angle, spikes_vel, angles_req = gen["spikes_angle"], gen["spikes_vel"], gen["angles_req"]
    out = dict(real=real.astype(np.int16))
    if spikes_angle is not None:
        out.update(generated=spikes_angle.astype(np.int16), angle_requested=angles_req)
    if spikes_vel is not None:
        out.update(generated_velocity=spikes_vel.astype(np.int16), velocity_requested=v_req,
                   velocity_requested_trials=te[:cfg.n_vel])
    np.savez_compressed(os.path.join(a.out, "samples.npz"), **out)
    lap("figures_and_outputs")
    timing["total"] = round(sum(timing.values()), 2)
    cpu["total"] = round(sum(cpu.values()), 2)
    with open(os.path.join(a.out, "metrics.json"), "w") as f:
        json.dump(res, f, indent=2, sort_keys=True)
    with open(os.path.join(a.out, "timing.json"), "w") as f:
        json.dump(dict(wall_s=timing, cpu_s=cpu), f, indent=2)
    for k, val in res.items():
        print(f"  {k:<50} {val:.4g}" if isinstance(val, float) else f"  {k:<50} {val}")
    print("wall time per stage (s):", timing)
    print("CPU time per stage (s):", cpu)


if __name__ == "__main__":
    main()
