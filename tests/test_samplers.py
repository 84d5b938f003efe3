"""Sampler math: with the exact score of a Gaussian data distribution, every sampler must
reproduce that Gaussian."""
import pytest
import torch

from infd.diffusion.samplers import guided, sample, vp_timesteps
from infd.diffusion.schedule import DiffusionConfig, build_schedule, training_loss
from infd.keyed_random import KeyedRandom

MU = torch.tensor([1.0, -0.5], dtype=torch.float64)
SIGMA = torch.tensor([[0.5, 0.3], [0.3, 0.4]], dtype=torch.float64)


@pytest.mark.parametrize("objective,sampler,steps,eta,spacing", [
    ("epsilon", "ddpm", 1000, 1.0, "linspace"), ("epsilon", "ddim", 250, 0.0, "linspace"),
    ("epsilon", "ddim", 250, 1.0, "linspace"), ("epsilon", "dpmpp", 20, 0.0, "linspace"),
    ("v", "ddim", 250, 0.0, "linspace"), ("v", "dpmpp", 20, 0.0, "linspace"),
    ("rectified_flow", "euler", 200, 0.0, "linspace"), ("rectified_flow", "heun", 30, 0.0, "linspace"),
    # The paper's sampler: DDIM, eta 1, 200 steps at the official LDM stride; and diffusers' trailing.
    ("epsilon", "ddim", 200, 1.0, "leading"), ("epsilon", "ddim", 200, 1.0, "trailing")])
def test_samplers_reproduce_a_gaussian_from_its_exact_score(objective, sampler, steps, eta, spacing):
    schedule = build_schedule(DiffusionConfig(objective=objective))
    fn = exact_predictor(schedule, objective)
    x = sample(fn, schedule, (4000, 2), sampler, steps, generator=torch.Generator().manual_seed(0), eta=eta,
               spacing=spacing).double()
    mean, cov = x.mean(0), torch.cov(x.t())
    assert torch.allclose(mean, MU, atol=0.05), (mean, MU)
    assert torch.allclose(cov, SIGMA, atol=0.05), (cov, SIGMA)


def test_timestep_spacings_for_1000_training_steps():
    schedule = build_schedule(DiffusionConfig())
    # CompVis make_ddim_timesteps('uniform', 200, 1000): range(0, 1000, 5) + 1, sampled descending.
    leading = vp_timesteps(schedule, 200, "leading")
    assert leading == list(range(996, 0, -5)) and len(leading) == 200
    trailing = vp_timesteps(schedule, 200, "trailing")
    assert trailing[0] == 999 and trailing[-1] == 4 and len(set(trailing)) == 200
    assert vp_timesteps(schedule, 3, "trailing") == [999, 666, 332]  # diffusers' list for 3 of 1000
    linspace = vp_timesteps(schedule, 250)  # the default, unchanged: both ends
    assert linspace[0] == 999 and linspace[-1] == 0 and len(linspace) == 250
    assert vp_timesteps(schedule, 1000) == list(range(999, -1, -1))
    # Official stride with steps not dividing T: ceil(T / c) steps, as the official code has it.
    assert vp_timesteps(schedule, 30, "leading") == list(range(991, 0, -33))
    with pytest.raises(ValueError, match="would need t = 1000"):  # range(0, 1000, 3) + 1 ends at 1000
        vp_timesteps(schedule, 300, "leading")


def test_bad_spacing_and_options_a_sampler_lacks_are_refused():
    schedule = build_schedule(DiffusionConfig())
    fn = exact_predictor(schedule, "epsilon")
    with pytest.raises(ValueError, match=r"'bogus' is not one of \['linspace', 'leading', 'trailing'\]"):
        sample(fn, schedule, (8, 2), "ddim", 10, spacing="bogus")
    with pytest.raises(ValueError, match="'dpmpp'"):
        sample(fn, schedule, (8, 2), "dpmpp", 10, spacing="leading")
    with pytest.raises(ValueError, match="'dpmpp' has no eta"):
        sample(fn, schedule, (8, 2), "dpmpp", 10, eta=1.0)
    with pytest.raises(ValueError, match="'ddpm' is eta = 1"):
        sample(fn, schedule, (8, 2), "ddpm", 10, eta=0.5)
    with pytest.raises(ValueError, match="expected 1 to 1000"):
        sample(fn, schedule, (8, 2), "ddim", 1001)


def exact_predictor(schedule, objective):
    """The network output that is exactly right for data ~ N(MU, SIGMA), for a batch at one t.

    VP: x_t ~ N(a MU, a^2 SIGMA + s^2 I), E[eps | x_t] = s C^-1 (x_t - a MU),
    E[x0 | x_t] = MU + a SIGMA C^-1 (x_t - a MU); flow: the same with a = 1 - t, s = t.
    """
    eye = torch.eye(2, dtype=torch.float64)

    def fn(x, t):
        x = x.double()
        if objective == "rectified_flow":
            ti = float(t[0])
            cov = (1 - ti) ** 2 * SIGMA + ti**2 * eye
            resid = torch.linalg.solve(cov, (x - (1 - ti) * MU).t()).t()
            return (ti * resid - (MU + (1 - ti) * resid @ SIGMA.t())).float()
        a, s = (float(c.flatten()[0]) for c in schedule.coefficients(t[:1], x[:1]))
        cov = a**2 * SIGMA + s**2 * eye
        resid = torch.linalg.solve(cov, (x - a * MU).t()).t()
        eps = s * resid
        if objective == "epsilon":
            return eps.float()
        return (a * eps - s * (MU + a * resid @ SIGMA.t())).float()

    return fn


def test_same_seed_same_samples_and_sampler_objective_mismatch_is_refused():
    schedule = build_schedule(DiffusionConfig())
    fn = exact_predictor(schedule, "epsilon")
    a = sample(fn, schedule, (8, 2), "ddim", 10, generator=torch.Generator().manual_seed(3), eta=1.0)
    b = sample(fn, schedule, (8, 2), "ddim", 10, generator=torch.Generator().manual_seed(3), eta=1.0)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="does not fit"):
        sample(fn, schedule, (8, 2), "euler", 10)


def test_classifier_free_guidance_combines_branches():
    def model(x, t, cond):
        return x * 0 + cond

    fn = guided(model, torch.full((2, 1), 3.0), torch.full((2, 1), 1.0), scale=2.5)
    assert torch.allclose(fn(torch.zeros(2, 1), torch.zeros(2)), torch.full((2, 1), 1 + 2.5 * 2))


def test_paper_schedule_and_training_targets():
    cfg = DiffusionConfig()
    vp = build_schedule(cfg)
    assert vp.betas[0] == pytest.approx(0.0015) and vp.betas[-1] == pytest.approx(0.0195)
    x0 = torch.randn(4, 3, 8, 8)
    # A model that returns the exact target has zero loss; a wrong one does not. KeyedRandom gives
    # the same draws for the same (seed, step, indices, purpose), so the test can redraw them.
    rand = KeyedRandom(0, 0, range(4))
    loss_zero, _ = training_loss(lambda x, t: torch.zeros_like(x), vp, x0, rand)
    assert loss_zero > 0.5
    for objective in ("epsilon", "v", "rectified_flow"):
        sched = build_schedule(DiffusionConfig(objective=objective))
        noise = rand.randn(x0.shape[1:], "noise")
        t = rand.rand("t") if objective == "rectified_flow" else rand.randint(1000, "t")
        xt = sched.add_noise(x0, noise, t)
        target = sched.target(x0, noise, t)
        loss, t_used = training_loss(lambda x, tt: target if torch.equal(x, xt) else x * 0, sched, x0, rand)
        assert loss < 1e-10 and torch.equal(t_used, t)
        if objective != "rectified_flow":
            x0_hat, eps_hat = sched.to_x0_eps(target, xt, t)
            assert torch.allclose(x0_hat, x0, atol=1e-3) and torch.allclose(eps_hat, noise, atol=1e-3)
