"""Lead plans and autoregressive rollouts (megatron_dchag.models.rollout) with a stand-in model.

The stand-in step is an affine map whose result depends on the input, the step length and the
input's valid time, so a rollout that fed back the wrong channels, skipped the constants, reused
the initial state or the initial time at a later step, or mixed up chains gives other values.
"""

import pytest
import torch

from megatron_dchag.models.rollout import LeadPlan, Rollout, RolloutError, plan_leads, rollout_blockers


def test_trained_leads_are_direct_longer_leads_use_the_longest_dividing_step():
    plans = plan_leads([6, 24, 30, 240], trained_leads=[6, 12, 18, 24])
    assert plans == [LeadPlan(6, 6, 1), LeadPlan(24, 24, 1), LeadPlan(30, 6, 5), LeadPlan(240, 24, 10)]
    assert [p.describe() for p in plans[1:3]] == ["24h direct", "30h rollout 5 x 6h"]
    assert plan_leads([240], trained_leads=[6]) == [LeadPlan(240, 6, 40)]  # a 6 h model to 10 days
    assert plan_leads([12, 24], [6, 12, 24], step_hours=6) == [LeadPlan(12, 6, 2), LeadPlan(24, 6, 4)]


@pytest.mark.parametrize("leads, trained, step, message", [
    ([9], [6], None, "lead 9 h is neither a lead the model was trained for (6 h) nor a multiple"),
    ([30], [12, 24], None, "lead 30 h is neither"),
    ([24], [6, 12], 18, "rollout step 18 h is not a lead the model was trained for (6, 12 h)"),
    ([0], [6], None, "lead 0 h: leads must be positive"),
])
def test_impossible_leads_are_refused(leads, trained, step, message):
    with pytest.raises(RolloutError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_leads(leads, trained, step)


def test_blockers_are_inputs_neither_predicted_nor_constant():
    inputs = ["z_500", "t_850", "t2m", "lsm", "orography"]
    assert rollout_blockers(inputs, inputs) == []
    assert rollout_blockers(inputs, ["z_500", "t2m"]) == ["t_850"]  # lsm, orography come from the data


def _stand_in(calls):
    # inputs [B, 3, H, W]: channels 0 and 2 predicted (outputs 0, 1), channel 1 constant
    def step(x, lead_hours, input_time_s):
        calls.append((lead_hours, input_time_s.tolist()))
        t = input_time_s.double()[:, None, None, None] / 3600.0
        return 0.9 * x[:, [0, 2]] + 0.1 * x[:, [1, 1]] + lead_hours + 0.01 * t
    return step


def test_a_rollout_chains_the_predictions_with_constants_from_the_data():
    torch.manual_seed(0)
    x0 = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    t0 = torch.tensor([0, 86400])
    calls = []
    rollout = Rollout(_stand_in(calls), output_input_index=[0, 2], constant_input_index=[1], num_inputs=3)
    out = rollout.run(x0, t0, plan_leads([6, 12, 18, 24], trained_leads=[6, 12]))
    step = _stand_in([])
    expected = {6: step(x0, 6, t0), 12: step(x0, 12, t0)}
    x, t = x0, t0  # 18 h: three 6 h steps; 24 h: two 12 h steps
    for _ in range(3):
        y = step(x, 6, t)
        x, t = torch.stack([y[:, 0], x0[:, 1], y[:, 1]], dim=1), t + 6 * 3600
    expected[18] = y
    x, t = x0, t0
    for _ in range(2):
        y = step(x, 12, t)
        x, t = torch.stack([y[:, 0], x0[:, 1], y[:, 1]], dim=1), t + 12 * 3600
    expected[24] = y
    assert sorted(out) == [6, 12, 18, 24]
    for lead in out:
        torch.testing.assert_close(out[lead], expected[lead], rtol=0, atol=0)
    # 6 h and 12 h direct, 18 h = 3 x 6 h, 24 h = 2 x 12 h: 7 calls, each at its input's valid time
    assert sorted(calls) == sorted([(6, [0, 86400]), (12, [0, 86400]), (6, [0, 86400]), (6, [21600, 108000]),
                                    (6, [43200, 129600]), (12, [0, 86400]), (12, [43200, 129600])])


def test_a_rollout_of_a_model_that_does_not_predict_an_input_is_refused():
    rollout = Rollout(_stand_in([]), output_input_index=[0], constant_input_index=[], num_inputs=3)
    x0, t0 = torch.zeros(1, 3, 2, 2), torch.zeros(1, dtype=torch.int64)
    assert sorted(rollout.run(x0, t0, [LeadPlan(6, 6, 1)])) == [6]  # direct: fine
    with pytest.raises(RolloutError, match=r"local inputs \[1, 2\] are neither"):
        rollout.run(x0, t0, [LeadPlan(12, 6, 2)])
