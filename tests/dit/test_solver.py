"""ODE solvers against closed-form solutions, classifier-free guidance against separate forwards,
and generate()."""

from __future__ import annotations

import math

import pytest
import torch

from blip_toolkit.dit.config import DiTConfig
from blip_toolkit.dit.model import DiT
from blip_toolkit.dit.normalize import TokenNormalizer
from blip_toolkit.dit.solver import generate, guided_velocity, integrate, time_grid
from blip_toolkit.errors import UsageError


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_time_grid():
    torch.testing.assert_close(time_grid(4), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    shifted = time_grid(10, shift=3.0, dtype=torch.float64)
    assert float(shifted[0]) == 0.0 and float(shifted[-1]) == 1.0
    assert bool((shifted.diff() > 0).all())
    assert float(shifted[1]) < 0.1 / 2  # shift > 1 takes smaller steps near the noise end
    # t' = t / (s - (s - 1) t) is SD3's sigma shift, sigma' = s sigma / (1 + (s - 1) sigma), with t = 1 - sigma
    sigma = 1 - torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(shifted, 1 - 3 * sigma / (1 + 2 * sigma))
    with pytest.raises(UsageError):
        time_grid(0)


def test_euler_is_exact_on_a_constant_field():
    x_0 = torch.randn(3, 4, dtype=torch.float64)
    c = torch.randn(3, 4, dtype=torch.float64)
    for steps in (1, 7):
        torch.testing.assert_close(integrate(lambda x, t: c, x_0, steps=steps), x_0 + c)


def test_heun_is_exact_on_a_field_linear_in_t():
    x_0 = torch.randn(3, 4, dtype=torch.float64)
    a, b = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    result = integrate(lambda x, t: a + b * t[:, None], x_0, steps=3, solver="heun")
    torch.testing.assert_close(result, x_0 + a + b / 2)  # integral of a + b t over [0, 1]


def solve_error(solver: str, steps: int) -> float:
    """Error at t = 1 on dx/dt = -x t, whose solution is x(t) = x_0 exp(-t^2 / 2)."""
    x_0 = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    result = integrate(lambda x, t: -x * t[:, None], x_0, steps=steps, solver=solver)
    return float((result - x_0 * math.exp(-0.5)).abs().max())


def test_convergence_orders_on_a_nonlinear_ode():
    for solver, order in (("euler", 1), ("heun", 2)):
        errors = [solve_error(solver, steps) for steps in (20, 40, 80, 160)]
        ratios = [errors[i] / errors[i + 1] for i in range(3)]
        for ratio in ratios:
            assert abs(ratio - 2**order) < 0.15 * 2**order, (solver, errors, ratios)
    assert solve_error("heun", 20) < solve_error("euler", 20) / 10


def test_unknown_solver():
    with pytest.raises(UsageError, match="solver"):
        integrate(lambda x, t: x, torch.zeros(1, 1), steps=2, solver="rk4")


def tiny_model() -> DiT:
    cfg = DiTConfig(
        preset="tiny",
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        target_dim=6,
        cond_dim=10,
        num_tokens=9,
        num_cond_tokens=4,
    )
    model = DiT(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in model.blocks:
            block.modulation.weight.copy_(0.3 * torch.randn(block.modulation.weight.shape, generator=gen))
        model.output_proj.weight.copy_(torch.randn(model.output_proj.weight.shape, generator=gen))
        model.null_condition.copy_(torch.randn(model.null_condition.shape, generator=gen))
    return model.eval()


class CountingModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.batch_sizes = model, model.config, []

    def forward(self, *args, **kwargs):
        self.batch_sizes.append(args[0].shape[0])
        return self.model(*args, **kwargs)


@torch.no_grad()
def test_cfg_batched_equals_separate_forwards():
    model = CountingModel(tiny_model())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 9, 6, generator=gen)
    t = torch.rand(3, generator=gen)
    cond = torch.randn(3, 4, 10, generator=gen)
    mask = torch.tensor([[True, True, True, False]] * 3)
    scale = 3.0
    guided = guided_velocity(model, cond, cfg_scale=scale, cond_mask=mask)(x, t)
    assert model.batch_sizes == [6]  # one doubled forward
    v_cond = model.model(x, t, cond, mask)
    v_uncond = model.model(x, t, None)
    torch.testing.assert_close(guided, v_uncond + scale * (v_cond - v_uncond), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(guided, v_cond, atol=1e-3)
    model.batch_sizes.clear()
    plain = guided_velocity(model, cond, cfg_scale=1.0, cond_mask=mask)(x, t)
    assert model.batch_sizes == [3]  # no guidance, no doubled batch
    torch.testing.assert_close(plain, v_cond)


def test_generate_is_seeded_and_decodes():
    model = tiny_model()
    cond = torch.randn(2, 4, 10)
    first = generate(model, cond, steps=4, cfg_scale=2.0, generator=torch.Generator().manual_seed(7))
    second = generate(model, cond, steps=4, cfg_scale=2.0, generator=torch.Generator().manual_seed(7))
    assert first.shape == (2, 9, 6)
    assert torch.equal(first, second)
    other = generate(model, cond, steps=4, cfg_scale=2.0, generator=torch.Generator().manual_seed(8))
    assert not torch.allclose(first, other)
    # generate == integrate(guided velocity) from the same seeded noise
    x_0 = torch.randn(2, 9, 6, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        manual = integrate(guided_velocity(model, cond, cfg_scale=2.0), x_0, steps=4)
    torch.testing.assert_close(first, manual)
    normalizer = TokenNormalizer("standardize", mean=torch.arange(6.0), std=torch.full((6,), 2.0))
    decoded = generate(
        model, cond, steps=4, cfg_scale=2.0, generator=torch.Generator().manual_seed(7), normalizer=normalizer
    )
    torch.testing.assert_close(decoded, first * 2.0 + torch.arange(6.0))
    heun = generate(model, cond, steps=2, solver="heun", generator=torch.Generator().manual_seed(7))
    assert heun.shape == first.shape and torch.isfinite(heun).all()
    with pytest.raises(UsageError):
        generate(model, cond, cfg_scale=-1.0)
