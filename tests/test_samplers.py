"""Sampler math: with the exact score of a Gaussian data distribution, every sampler must
reproduce that Gaussian."""
import pytest
import torch

from infd.diffusion.samplers import guided, sample
from infd.diffusion.schedule import DiffusionConfig, build_schedule, training_loss

MU = torch.tensor([1.0, -0.5], dtype=torch.float64)
SIGMA = torch.tensor([[0.5, 0.3], [0.3, 0.4]], dtype=torch.float64)


@pytest.mark.parametrize("objective,sampler,steps,eta", [
    ("epsilon", "ddpm", 1000, 1.0), ("epsilon", "ddim", 250, 0.0), ("epsilon", "ddim", 250, 1.0),
    ("epsilon", "dpmpp", 20, 0.0), ("v", "ddim", 250, 0.0), ("v", "dpmpp", 20, 0.0),
    ("rectified_flow", "euler", 200, 0.0), ("rectified_flow", "heun", 30, 0.0)])
def test_samplers_reproduce_a_gaussian_from_its_exact_score(objective, sampler, steps, eta):
    schedule = build_schedule(DiffusionConfig(objective=objective))
    fn = exact_predictor(schedule, objective)
    x = sample(fn, schedule, (4000, 2), sampler, steps, generator=torch.Generator().manual_seed(0), eta=eta).double()
    mean, cov = x.mean(0), torch.cov(x.t())
    assert torch.allclose(mean, MU, atol=0.05), (mean, MU)
    assert torch.allclose(cov, SIGMA, atol=0.05), (cov, SIGMA)


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
    # A model that returns the exact target has zero loss; a wrong one does not.
    gen = torch.Generator().manual_seed(0)
    noise_state = gen.get_state()
    loss_zero = training_loss(lambda x, t: torch.zeros_like(x), vp, x0, gen)
    assert loss_zero > 0.5
    for objective in ("epsilon", "v", "rectified_flow"):
        sched = build_schedule(DiffusionConfig(objective=objective))
        gen.set_state(noise_state)
        noise = torch.randn(x0.shape, generator=gen)
        if objective == "rectified_flow":
            t = torch.rand(4, generator=gen)
        else:
            t = torch.randint(0, 1000, (4,), generator=gen)
        xt = sched.add_noise(x0, noise, t)
        target = sched.target(x0, noise, t)
        gen.set_state(noise_state)
        assert training_loss(lambda x, tt: target if torch.equal(x, xt) else x * 0, sched, x0, gen) < 1e-10
        if objective != "rectified_flow":
            x0_hat, eps_hat = sched.to_x0_eps(target, xt, t)
            assert torch.allclose(x0_hat, x0, atol=1e-3) and torch.allclose(eps_hat, noise, atol=1e-3)
