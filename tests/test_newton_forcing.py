"""Newton-CG's forcing term (codegen/hypergrad/lower/newton.py `Forcing`, docs/solvers.md 1):
Eisenstat and Walker's choice 1 with their safeguard, capped at 1/2 and at L_A ||g|| / (2 mu^2).
That loop_newton computes the same steps in C is tests/test_fused_loops.py's."""
import math

import pytest

from codegen.hypergrad.lower.newton import SAFEGUARD_FLOOR, SAFEGUARD_POWER, Forcing


def test_the_first_direction_is_solved_to_one_half_or_the_quadratic_term():
    assert Forcing(mu=1.0, L_A=math.inf).eta(3.0) == 0.5
    assert Forcing(mu=1.0, L_A=0.0).eta(3.0) == 0.0  # quadratic g: one exact step
    assert Forcing(mu=2.0, L_A=1.0).eta(0.4) == pytest.approx(0.4 / 8)


def test_eta_is_how_far_the_last_linear_model_missed():
    forcing = Forcing(mu=1.0, L_A=math.inf)
    forcing.eta(1.0)       # first direction at ||g|| = 1: eta 1/2
    forcing.solved(0.3)    # its CG predicted ||g(x + d)|| = 0.3
    # the step reached 0.35: the model missed by 0.05 of ||g||, but the safeguard keeps
    # 0.5^1.618 = 0.326 (above 0.1)
    assert forcing.eta(0.35) == pytest.approx(0.5 ** SAFEGUARD_POWER)
    forcing.solved(0.01)
    # 0.326^1.618 = 0.163: still above the floor; the model missed by (0.02 - 0.01) / 0.35
    second = (0.5 ** SAFEGUARD_POWER) ** SAFEGUARD_POWER
    assert forcing.eta(0.02) == pytest.approx(second, rel=1e-12)
    forcing.solved(1e-4)
    # 0.163^1.618 = 0.053 < SAFEGUARD_FLOOR: choice 1 alone, (1.01e-4 - 1e-4) / 0.02
    assert second ** SAFEGUARD_POWER < SAFEGUARD_FLOOR
    assert forcing.eta(1.01e-4) == pytest.approx(1e-6 / 0.02, rel=1e-9)


def test_a_model_that_missed_badly_is_not_solved_tighter_than_one_half():
    forcing = Forcing(mu=1.0, L_A=math.inf)
    forcing.eta(1.0)
    forcing.solved(0.1)
    assert forcing.eta(0.9) == 0.5  # a backtracked step: the model missed by 0.8


def test_the_quadratic_term_caps_eta_near_the_solution():
    forcing = Forcing(mu=1.0, L_A=2.0)
    forcing.eta(0.01)
    forcing.solved(0.0)
    assert forcing.eta(0.009) == pytest.approx(2.0 * 0.009 / 2)  # choice 1 and 1/2 ask for 0.5
