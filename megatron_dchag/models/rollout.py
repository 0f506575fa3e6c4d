"""Forecasts at any lead from a forecaster: direct leads and autoregressive rollouts.

A forecaster is trained for a set of leads (``forecast.min_lead_hours``, ``lead_step_hours``,
``max_lead_hours``). A lead it was trained for is **direct**: one model call from the initial
state. A longer lead is an **autoregressive rollout**: the model's own output becomes the next
input, ``num_steps`` calls of ``step_hours`` each (a 6 h model to 10 days: 40 steps).

:func:`plan_leads` chooses, per requested lead, direct or rollout and the step (by default the
longest trained lead that divides it: the fewest calls). :func:`rollout_blockers` names the input
channels a rollout cannot feed back: a rollout needs every input to be a predicted output or a
constant field (land-sea mask, orography), whose values come from the data at every step.

:class:`Rollout` runs the plans on one rank's channels. It needs no communication: every
output is predicted by the tensor-parallel rank that owns its input channel
(:class:`~megatron_dchag.models.forecast.ForecastChannels`), so feeding outputs back stays on
the rank. Values are in the model's normalized units; the caller denormalizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

__all__ = ["LeadPlan", "RolloutError", "plan_leads", "rollout_blockers", "Rollout"]


class RolloutError(ValueError):
    """A requested lead that no direct forecast or rollout of this model gives."""


@dataclass(frozen=True)
class LeadPlan:
    """How one lead is forecast: ``num_steps`` model calls of ``step_hours`` (1 call: direct)."""

    lead_hours: int
    step_hours: int
    num_steps: int

    @property
    def direct(self) -> bool:
        return self.num_steps == 1

    def describe(self) -> str:
        """``"6h direct"`` or ``"72h rollout 12 x 6h"``."""
        if self.direct:
            return f"{self.lead_hours}h direct"
        return f"{self.lead_hours}h rollout {self.num_steps} x {self.step_hours}h"


def plan_leads(leads: Sequence[int], trained_leads: Sequence[int], step_hours: Optional[int] = None) -> List[LeadPlan]:
    """One :class:`LeadPlan` per lead (in the order given).

    A trained lead is direct. Any other lead is a rollout with ``step_hours`` (which must be a
    trained lead dividing it) or, by default, with the longest trained lead that divides it.
    Raises :class:`RolloutError` naming the lead when neither exists.
    """
    trained = sorted({int(x) for x in trained_leads})
    if step_hours is not None and int(step_hours) not in trained:
        raise RolloutError(f"rollout step {step_hours} h is not a lead the model was trained for ({_hours(trained)})")
    plans = []
    for lead in (int(x) for x in leads):
        if lead <= 0:
            raise RolloutError(f"lead {lead} h: leads must be positive")
        if lead in trained and step_hours is None:
            plans.append(LeadPlan(lead, lead, 1))
            continue
        steps = [int(step_hours)] if step_hours is not None else trained[::-1]
        step = next((s for s in steps if lead % s == 0), None)
        if step is None:
            raise RolloutError(
                f"lead {lead} h is neither a lead the model was trained for ({_hours(trained)}) nor a multiple of "
                + (f"the rollout step {step_hours} h" if step_hours is not None else "one of them (a rollout)")
            )
        plans.append(LeadPlan(lead, step, lead // step))
    return plans


def _hours(leads: Sequence[int]) -> str:
    shown = ", ".join(str(x) for x in leads[:8]) + (", ..." if len(leads) > 8 else "")
    return f"{shown} h"


def rollout_blockers(inputs: Sequence[str], outputs: Sequence[str]) -> List[str]:
    """Input channels a rollout cannot feed: neither a predicted output nor a constant field."""
    from megatron_dchag.data.era5.naming import parse_channel

    predicted = set(outputs)
    return [name for name in inputs if name not in predicted and not parse_channel(name).is_constant]


#: ``step(x, lead_hours, input_time_s) -> prediction``: ``x [B, C_in_local, H, W]`` (normalized),
#: ``lead_hours`` the step, ``input_time_s [B]`` the valid time of ``x`` (seconds since 1970);
#: the prediction is ``[B, C_out_local, H, W]`` (normalized).
StepFunction = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]


class Rollout:
    """Runs :class:`LeadPlan` s on one rank's channels.

    Args:
        step: the model call (see :data:`StepFunction`).
        output_input_index: ``[C_out_local]`` the local input position of each local output.
        constant_input_index: local input positions of constant fields; their values stay those
            of the data (the initial input, read from the store) at every step.
        num_inputs: ``C_in_local``.

    Raises :class:`RolloutError` when some local input is neither an output nor a constant and a
    plan needs more than one step.
    """

    def __init__(self, step: StepFunction, output_input_index: Sequence[int], constant_input_index: Sequence[int],
                 num_inputs: int):
        self.step = step
        self.output_input_index = torch.as_tensor(list(output_input_index), dtype=torch.long)
        self.constant_input_index = torch.as_tensor(list(constant_input_index), dtype=torch.long)
        fed = set(self.output_input_index.tolist()) | set(self.constant_input_index.tolist())
        self.unfed_inputs = [i for i in range(num_inputs) if i not in fed]

    def next_input(self, x: torch.Tensor, prediction: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
        """The input of the next step: the predicted outputs in their input positions, the
        constant fields from the data."""
        nxt = x.clone()
        nxt[:, self.output_input_index.to(x.device)] = prediction.to(x.dtype)
        if len(self.constant_input_index):
            index = self.constant_input_index.to(x.device)
            nxt[:, index] = initial[:, index]
        return nxt

    @torch.no_grad()
    def run(self, initial: torch.Tensor, initial_time_s: torch.Tensor, plans: Sequence[LeadPlan]) -> Dict[int, torch.Tensor]:
        """``{lead_hours: prediction [B, C_out_local, H, W]}`` for every plan; rollouts with the
        same step share their chain (a 12 h and a 72 h rollout of a 6 h model cost 12 calls)."""
        if any(not p.direct for p in plans) and self.unfed_inputs:
            raise RolloutError(f"a rollout needs every input channel predicted or constant; local inputs "
                               f"{self.unfed_inputs} are neither")
        out: Dict[int, torch.Tensor] = {}
        for plan in plans:
            if plan.direct:
                out[plan.lead_hours] = self.step(initial, plan.step_hours, initial_time_s)
        chains: Dict[int, List[LeadPlan]] = {}
        for plan in plans:
            if not plan.direct:
                chains.setdefault(plan.step_hours, []).append(plan)
        for step_hours, group in chains.items():
            wanted = {p.num_steps: p.lead_hours for p in group}
            x, valid = initial, initial_time_s
            for k in range(1, max(wanted) + 1):
                prediction = self.step(x, step_hours, valid)
                if k in wanted:
                    out[wanted[k]] = prediction
                x = self.next_input(x, prediction, initial)
                valid = valid + step_hours * 3600
        return out
