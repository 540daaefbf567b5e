"""The fast samplers against cases with known answers, on tiny sizes."""
import pytest
import torch
import torch.nn as nn

from ddpm import Diffusion
from modules import UNet, UNet_conditional


class GaussianDenoiser(nn.Module):
    """The exact noise prediction when every pixel of the data is N(mu, s^2), independently:
    E[x0 | x_t] = mu + a s^2 / (a^2 s^2 + sig^2) (x_t - a mu), with a = sqrt(alpha_hat), sig = sqrt(1 - alpha_hat)."""

    def __init__(self, diffusion, mu=0.2, s=0.3):
        super().__init__()
        self.alpha_hat, self.mu, self.s, self.c_in = diffusion.alpha_hat, mu, s, 1
        self.dummy = nn.Parameter(torch.zeros(()))  # sample() reads the device off the parameters

    def forward(self, x, t, y=None):
        ah = self.alpha_hat[t].view(-1, 1, 1, 1).double()
        a, sig = ah.sqrt(), (1 - ah).sqrt()
        x = x.double()
        x0 = self.mu + a * self.s**2 / (a**2 * self.s**2 + sig**2) * (x - a * self.mu)
        return ((x - a * x0) / sig).float()


def exact_ode_end(d, xT, mu=0.2, s=0.3):
    """The probability-flow ODE keeps (x_t - a_t mu) / sqrt(a_t^2 s^2 + sig_t^2) fixed: its end at level 0."""
    def scale(t):
        ah = d.alpha_hat[t].double()
        return ah.sqrt(), (ah * s**2 + 1 - ah).sqrt()

    aT, vT = scale(d.noise_steps - 1)
    a0, v0 = scale(0)
    return a0 * mu + v0 * (xT.double() - aT * mu) / vT


def tiny(conditional):
    torch.manual_seed(0)
    if conditional:
        return UNet_conditional(c_in=1, c_out=1, num_classes=3, base_width=8).eval()
    return UNet(c_in=3, c_out=3, base_width=8).eval()


def test_ddim_eta0_is_deterministic_for_fixed_noise():
    d = Diffusion(noise_steps=50, img_size=8, device="cpu")
    model = tiny(True)
    xT = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    kw = dict(labels=torch.tensor([0, 2]), sampler="ddim", steps=5, eta=0.0, noise=xT, progress=False, raw=True)
    a = d.sample(model, 2, generator=torch.Generator().manual_seed(2), **kw)
    b = d.sample(model, 2, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a, b)
    # with eta=1 the generator's noise enters: the same start gives different images
    kw["eta"] = 1.0
    c = d.sample(model, 2, generator=torch.Generator().manual_seed(2), **kw)
    e = d.sample(model, 2, generator=torch.Generator().manual_seed(3), **kw)
    assert not torch.allclose(c, e)


@pytest.mark.parametrize("t", [1, 2, 10, 500, 998, 999])
def test_ddim_eta1_single_step_gives_ddpm_mean(t):
    d = Diffusion(noise_steps=1000, img_size=8, device="cpu")
    g = torch.Generator().manual_seed(t)
    x, eps = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    tt = torch.full((3,), t)
    ddim = d.ddim_step(x, tt, tt - 1, eps, eta=1.0, noise=None)
    ddpm = d.ddpm_step(x, tt, eps, noise=None)
    assert torch.allclose(ddim, ddpm, atol=1e-4, rtol=1e-4)
    # and eta=0 does not (the means differ by the noise the deterministic step keeps)
    if t > 1:
        assert not torch.allclose(d.ddim_step(x, tt, tt - 1, eps, eta=0.0, noise=None), ddpm, atol=1e-4)


def test_ddim_eta1_with_all_steps_walks_the_ddpm_timesteps():
    d = Diffusion(noise_steps=1000, img_size=8, device="cpu")
    ts, prev = d.timesteps(999)
    assert ts == list(range(999, 0, -1)) and prev == list(range(998, -1, -1))
    ts, prev = d.timesteps(20)
    assert len(ts) == 20 and ts[0] == 999 and prev[-1] == 0 and ts[1:] == prev[:-1]
    assert all(a > b for a, b in zip(ts, prev))


def test_dpm_solver_first_order_step_is_ddim_eta0():
    d = Diffusion(noise_steps=1000, img_size=8, device="cpu")
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    for t, tp in [(999, 949), (500, 300), (40, 0)]:
        t_, tp_ = torch.full((2,), t), torch.full((2,), tp)
        dpm, _, _ = d.dpm_solver_step(x, t_, tp_, eps, None, None, first_order=True)
        assert torch.allclose(dpm, d.ddim_step(x, t_, tp_, eps, 0.0, None), atol=1e-5)


def test_dpm_solver_follows_the_exact_ode_of_gaussian_data():
    d = Diffusion(noise_steps=1000, img_size=8, device="cpu")
    model = GaussianDenoiser(d)
    xT = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    exact = exact_ode_end(d, xT)

    def err(sampler, steps, spacing):
        x = d.sample(model, 4, sampler=sampler, steps=steps, eta=0.0, noise=xT, progress=False, raw=True,
                     spacing=spacing, clip=False)
        return (x.double() - exact).abs().max().item()

    # the default (logSNR) spacing: 20 steps land close, far closer than first-order DDIM on the same steps
    assert err("dpm++", 20, None) < 0.03
    assert err("dpm++", 20, "logsnr") < 0.2 * err("ddim", 20, "logsnr")
    # second order: halving the step size cuts the error about 4x (DDIM, first order: about 2x)
    dpm = err("dpm++", 200, "time") / err("dpm++", 400, "time")
    ddim = err("ddim", 200, "time") / err("ddim", 400, "time")
    assert dpm > 3 and 1.5 < ddim < 2.5


def test_ancestral_samplers_reach_the_data_distribution():
    # with the exact denoiser, DDPM and DDIM eta=1 on all steps, and the ODE samplers on few, must end at
    # N(a0 mu, a0 s^2 + 1 - a0). (DDIM eta=1 on few steps does not: the posterior mean alone underdisperses.)
    d = Diffusion(noise_steps=1000, img_size=8, device="cpu")
    model = GaussianDenoiser(d)
    a0 = d.alpha_hat[0]
    want_mean, want_std = a0.sqrt() * 0.2, (a0 * 0.09 + 1 - a0).sqrt()
    for sampler, steps, eta in [("ddpm", None, 1.0), ("ddim", 999, 1.0), ("ddim", 300, 0.0), ("dpm++", 20, 0.0)]:
        x = d.sample(model, 256, sampler=sampler, steps=steps, eta=eta, progress=False, raw=True, clip=False,
                     generator=torch.Generator().manual_seed(0))
        assert abs(x.mean() - want_mean) < 0.01, sampler
        assert abs(x.std() - want_std) < 0.01, sampler


@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddim", 4), ("dpm++", 4)])
@pytest.mark.parametrize("conditional", [True, False])
def test_shapes_and_dtypes(sampler, steps, conditional):
    d = Diffusion(noise_steps=10, img_size=8, device="cpu")  # ddpm walks all 9 steps
    model = tiny(conditional)
    labels = torch.tensor([0, 1, 2]) if conditional else None
    out = d.sample(model, 3, labels, sampler=sampler, steps=steps, progress=False,
                   generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 1 if conditional else 3, 8, 8) and out.dtype == torch.uint8
    assert not model.training


def test_batched_cfg_matches_two_passes_and_scalar_label_broadcasts():
    d = Diffusion(noise_steps=50, img_size=8, device="cpu")
    model = tiny(True)
    xT = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for sampler in ("ddim", "dpm++"):
        kw = dict(cfg_scale=3.0, sampler=sampler, steps=4, eta=0.0, noise=xT, progress=False, raw=True)
        one = d.sample(model, 2, torch.tensor([1, 1]), batched_cfg=True, **kw)
        two = d.sample(model, 2, torch.tensor([1, 1]), batched_cfg=False, **kw)
        scalar = d.sample(model, 2, 1, **kw)
        assert torch.allclose(one, two, atol=1e-4)
        assert torch.allclose(one, scalar)
    with pytest.raises(ValueError):
        d.sample(model, 2, torch.tensor([0, 1, 2]), sampler="ddim", steps=2, progress=False)
    with pytest.raises(ValueError):
        d.sample(model, 2, None, sampler="ddpm", steps=5, progress=False)


def test_clipping_keeps_each_x0_prediction_in_the_data_range():
    d = Diffusion(noise_steps=1000, img_size=8, device="cpu")
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    for t in (999, 500, 10):
        tt = torch.full((2,), t)
        a = d.alpha_hat[t]
        x0 = (x - (1 - a).sqrt() * d.clip_eps(x, tt, eps)) / a.sqrt()
        raw = (x - (1 - a).sqrt() * eps) / a.sqrt()
        assert torch.allclose(x0, raw.clamp(-1, 1), atol=1e-3)
        assert raw.abs().max() > 1  # so the clip did something


def test_guidance_interval_guides_only_above_cfg_min_sigma():
    d = Diffusion(noise_steps=50, img_size=8, device="cpu")
    sigma = ((1 - d.alpha_hat) / d.alpha_hat).sqrt()  # the noise level of each timestep
    model = tiny(True)
    calls = []  # (timestep, batch size) of every network pass
    model.register_forward_pre_hook(lambda m, args: calls.append((int(args[1][0]), len(args[0]))))
    xT = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))

    def sample(cfg_scale=3, **kw):
        calls.clear()
        return d.sample(model, 2, torch.tensor([0, 2]), cfg_scale=cfg_scale, sampler="ddim", steps=5, eta=0.0,
                        noise=xT, progress=False, raw=True, **kw)

    everywhere = sample()
    assert all(n == 4 for _, n in calls)  # conditional and unconditional halves at every step
    assert torch.equal(sample(cfg_min_sigma=0.0), everywhere)
    level = float(sigma[25])  # halfway along this short schedule
    interval = sample(cfg_min_sigma=level)
    assert calls and all(n == (4 if sigma[t] > level else 2) for t, n in calls)
    assert {n for _, n in calls} == {2, 4}  # one pass, not two, where unguided
    unguided = sample(cfg_scale=0)
    assert torch.equal(sample(cfg_min_sigma=1e9), unguided)
    assert not torch.allclose(interval, everywhere) and not torch.allclose(interval, unguided)
    # on the original's 1000-step schedule sigma_t passes 1 between t = 258 and 259, as the docs say
    full = Diffusion(img_size=8, device="cpu")
    assert int((((1 - full.alpha_hat) / full.alpha_hat).sqrt() > 1).nonzero()[0]) == 259


def test_langevin_corrector_steps_keep_the_marginal_they_are_run_at():
    """Data at a single point: x_t ~ N(0, 1 - alpha_hat_t) and the exact eps is x / sqrt(1 - alpha_hat_t).
    Started twice too wide (or too narrow), corrector steps alone must bring the spread back to the marginal's
    (at snr 0.3 within the step's own bias, about 5% too wide)."""
    d = Diffusion(img_size=8, device="cpu")
    t = torch.full((500,), 300)
    sigma = float((1 - d.alpha_hat[300]).sqrt())
    g = torch.Generator().manual_seed(0)
    for start in (2.0, 0.5):
        x = start * sigma * torch.randn(500, 1, 16, 16, generator=g)
        for _ in range(100):
            x = d.langevin_step(x, t, x / sigma, 0.3, torch.randn(x.shape, generator=g))
        assert abs(float(x.std()) / sigma - 1) < 0.1, (start, float(x.std()) / sigma)


def test_the_corrector_runs_between_the_steps_at_the_level_reached():
    d = Diffusion(noise_steps=50, img_size=8, device="cpu")
    model = tiny(False)
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(int(args[1][0])))
    xT = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))

    def sample(**kw):
        calls.clear()
        return d.sample(model, 2, sampler="ddim", steps=4, noise=xT, progress=False, raw=True,
                        generator=torch.Generator().manual_seed(3), **kw)

    plain = sample()
    steps = list(calls)
    assert torch.equal(sample(corrector_snr=0.0), plain)
    corrected = sample(corrector_snr=0.3)
    ts, ts_prev = d.timesteps(4)
    # each step at t, then the corrector at the level it reached; none after the last step
    assert steps == ts and calls == [t for pair in zip(ts, ts_prev) for t in pair][:-1]
    assert not torch.allclose(corrected, plain)


@pytest.mark.parametrize("conditional", [False, True])
def test_autoguided_output_extrapolates_from_the_guide(conditional):
    from modules import Autoguided

    def net(seed):
        torch.manual_seed(seed)
        return (UNet_conditional(1, 1, num_classes=3, base_width=8) if conditional else UNet(1, 1, base_width=8)).eval()

    model, guide = net(0), net(1)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([5, 50, 500, 900])
    labels = (torch.tensor([0, 1, 2, -1]),) if conditional else ()
    with torch.no_grad():
        m, g = model(x, t, *labels), guide(x, t, *labels)
        assert torch.allclose(Autoguided(model, guide, 1.0)(x, t, *labels), m)
        assert torch.allclose(Autoguided(model, guide, 2.5)(x, t, *labels), g + 2.5 * (m - g), atol=1e-5)
