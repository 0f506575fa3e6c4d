r"""Latitude-weighted forecast metrics: MSE, RMSE, ACC, and persistence / climatology references.

All metrics take fields ``[..., H, W]`` with latitude on axis ``-2`` (any order of latitudes, as
long as ``lat_weights`` follows the same order) in **physical units** (denormalize first), and
accept torch tensors or numpy arrays (numpy in, numpy out; computed in float64).

Latitude weights (:func:`latitude_weights`), normalized to mean 1 over the latitude rows:

* ``kind="cos"`` (default, as in ClimaX / WeatherBench 1): :math:`w_i = \cos\phi_i / \overline{\cos\phi}`.
* ``kind="area"`` (as in WeatherBench 2): :math:`w_i \propto \sin\phi_i^{+} - \sin\phi_i^{-}`,
  the area of the grid cell between the latitude bounds :math:`\phi_i^{\pm}` (midpoints between
  neighbouring rows, the outer bounds clipped to ±90°). On a grid of cell centres (e.g. 5.625°)
  the two are nearly equal; on a grid that includes the poles (0.25°, 721 rows) the pole rows get
  a small positive weight instead of zero.

With :math:`\langle x\rangle = \sum_{i,j} w_i x_{ij} / \sum_{i,j} w_i` the weighted spatial mean
over latitude :math:`i` and longitude :math:`j`, for each sample (and channel):

* :math:`\mathrm{MSE} = \langle (f - o)^2 \rangle`
* :math:`\mathrm{RMSE} = \sqrt{\mathrm{MSE}}` — computed **per sample, then averaged over
  samples** (as ClimaX's ``lat_weighted_rmse``; WeatherBench 2 instead takes the square root of
  the time-mean MSE; :class:`ForecastMetrics` reports both as ``rmse`` and ``rmse_of_mean_mse``).
* :math:`\mathrm{ACC} = \dfrac{\langle f' o' \rangle}{\sqrt{\langle f'^2 \rangle \langle o'^2 \rangle}}`
  with anomalies against the climatology :math:`c`: :math:`f' = f - c`, :math:`o' = o - c`;
  with ``centered=True`` (default; the Pearson correlation, as in ClimaX / WeatherBench 1) the
  weighted spatial mean of each anomaly field is removed first
  (:math:`f' \leftarrow f' - \langle f' \rangle`); ``centered=False`` is WeatherBench 2's
  uncentered ACC. ACC is computed per sample and averaged over samples. When a denominator is
  zero (e.g. the climatology itself as forecast: :math:`f' \equiv 0`) ACC is defined as 0.

``reduction="mean"`` averages the per-sample values over axis 0 (the batch); ``"none"`` keeps
them (shape ``[...]``, the input without its last two axes).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

__all__ = [
    "latitude_weights",
    "weighted_mean",
    "weighted_mse",
    "weighted_rmse",
    "weighted_acc",
    "persistence_forecast",
    "climatology_forecast",
    "persistence_rmse",
    "climatology_rmse",
    "ForecastMetrics",
]

Array = Union[torch.Tensor, np.ndarray]


def _to_torch(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def _returns_numpy(*xs: Any) -> bool:
    return not any(isinstance(x, torch.Tensor) for x in xs)


def _out(x: torch.Tensor, numpy: bool) -> Array:
    if numpy:
        return x.detach().cpu().numpy() if x.ndim else np.float64(x.item())
    return x


def latitude_weights(lats: Array, kind: str = "cos") -> Array:
    """Per-latitude weights with mean 1 (``kind`` ``"cos"`` or ``"area"``; see the module docstring)."""
    numpy = not isinstance(lats, torch.Tensor)
    lat = np.asarray(lats.detach().cpu().numpy() if isinstance(lats, torch.Tensor) else lats, dtype=np.float64)
    if lat.ndim != 1 or lat.size == 0:
        raise ValueError(f"latitudes must be a non-empty 1-D array, got shape {lat.shape}")
    if np.any(np.abs(lat) > 90.0 + 1e-9):
        raise ValueError("latitudes must be in degrees within [-90, 90]")
    if kind == "cos":
        w = np.cos(np.deg2rad(lat))
        w = np.clip(w, 0.0, None)
    elif kind == "area":
        if lat.size == 1:
            w = np.ones(1)
        else:
            order = np.argsort(lat)
            s = lat[order]
            mids = (s[1:] + s[:-1]) / 2.0
            lower = np.concatenate([[max(s[0] - (s[1] - s[0]) / 2.0, -90.0)], mids])
            upper = np.concatenate([mids, [min(s[-1] + (s[-1] - s[-2]) / 2.0, 90.0)]])
            lower, upper = np.clip(lower, -90.0, 90.0), np.clip(upper, -90.0, 90.0)
            area = np.sin(np.deg2rad(upper)) - np.sin(np.deg2rad(lower))
            w = np.empty_like(area)
            w[order] = area
    else:
        raise ValueError(f"latitude weighting kind must be 'cos' or 'area', got {kind!r}")
    if w.sum() <= 0:
        raise ValueError("latitude weights sum to zero (all rows at the poles?)")
    w = w / w.mean()
    return w if numpy else torch.as_tensor(w, dtype=lats.dtype if lats.is_floating_point() else torch.float64)


def _weights_2d(weights: Optional[Array], like: torch.Tensor) -> torch.Tensor:
    h, w = like.shape[-2:]
    if weights is None:
        return torch.ones(h, w, dtype=like.dtype, device=like.device)
    wt = _to_torch(weights).to(device=like.device, dtype=like.dtype)
    if wt.ndim == 1:
        if wt.shape[0] != h:
            raise ValueError(f"lat_weights has {wt.shape[0]} rows but the fields have {h} latitudes")
        wt = wt[:, None].expand(h, w)
    elif tuple(wt.shape) != (h, w):
        raise ValueError(f"weights of shape {tuple(wt.shape)} do not match fields [..., {h}, {w}]")
    return wt


def _spatial_mean(x: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return (x * w2).sum(dim=(-2, -1)) / w2.sum()


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none" or x.ndim == 0:
        return x
    if reduction == "mean":
        return x.mean(dim=0)
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _prepare(*xs: Any) -> List[torch.Tensor]:
    ts = [_to_torch(x) for x in xs]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32
    if any(not t.is_floating_point() for t in ts):
        dtype = torch.float64
    return [t.to(dtype) for t in ts]


def weighted_mean(x: Array, lat_weights: Optional[Array] = None, reduction: str = "none") -> Array:
    """Weighted spatial mean :math:`\\langle x\\rangle` over the last two axes."""
    numpy = _returns_numpy(x)
    (xt,) = _prepare(x)
    return _out(_reduce(_spatial_mean(xt, _weights_2d(lat_weights, xt)), reduction), numpy)


def weighted_mse(pred: Array, target: Array, lat_weights: Optional[Array] = None, reduction: str = "mean") -> Array:
    """Latitude-weighted MSE per sample :math:`\\langle (f-o)^2\\rangle`, averaged over axis 0 by default."""
    numpy = _returns_numpy(pred, target)
    p, t = _prepare(pred, target)
    if p.shape != t.shape:
        raise ValueError(f"pred {tuple(p.shape)} and target {tuple(t.shape)} differ in shape")
    mse = _spatial_mean((p - t) ** 2, _weights_2d(lat_weights, p))
    return _out(_reduce(mse, reduction), numpy)


def weighted_rmse(pred: Array, target: Array, lat_weights: Optional[Array] = None, reduction: str = "mean") -> Array:
    """Latitude-weighted RMSE: square root per sample, then the mean over axis 0 (ClimaX)."""
    numpy = _returns_numpy(pred, target)
    mse = weighted_mse(_to_torch(pred), _to_torch(target), lat_weights, reduction="none")
    return _out(_reduce(torch.sqrt(mse), reduction), numpy)


def weighted_acc(
    pred: Array,
    target: Array,
    climatology: Array,
    lat_weights: Optional[Array] = None,
    *,
    centered: bool = True,
    reduction: str = "mean",
) -> Array:
    """Latitude-weighted anomaly correlation coefficient per sample (see the module docstring).

    ``climatology`` broadcasts against ``pred`` (e.g. ``[C, H, W]`` or ``[B, C, H, W]``).
    """
    numpy = _returns_numpy(pred, target, climatology)
    p, t, c = _prepare(pred, target, climatology)
    if p.shape != t.shape:
        raise ValueError(f"pred {tuple(p.shape)} and target {tuple(t.shape)} differ in shape")
    w2 = _weights_2d(lat_weights, p)
    fa, oa = p - c, t - c
    if centered:
        fa = fa - _spatial_mean(fa, w2)[..., None, None]
        oa = oa - _spatial_mean(oa, w2)[..., None, None]
    num = _spatial_mean(fa * oa, w2)
    den = torch.sqrt(_spatial_mean(fa * fa, w2) * _spatial_mean(oa * oa, w2))
    tiny = torch.finfo(den.dtype).tiny
    acc = torch.where(den > tiny, num / den.clamp_min(tiny), torch.zeros_like(num))
    return _out(_reduce(acc, reduction), numpy)


def persistence_forecast(initial_state: Array) -> Array:
    """The persistence forecast: the state at the initial time, unchanged, at every lead."""
    return initial_state


def climatology_forecast(climatology: Array, like: Array) -> Array:
    """The climatology forecast, broadcast to the shape of ``like``."""
    if isinstance(like, torch.Tensor):
        return _to_torch(climatology).to(like.device, like.dtype).expand_as(like)
    return np.broadcast_to(np.asarray(climatology), np.shape(like))


def persistence_rmse(initial_state: Array, target: Array, lat_weights: Optional[Array] = None, reduction: str = "mean") -> Array:
    """RMSE of the persistence forecast (reference a model must beat at short leads)."""
    return weighted_rmse(persistence_forecast(initial_state), target, lat_weights, reduction)


def climatology_rmse(climatology: Array, target: Array, lat_weights: Optional[Array] = None, reduction: str = "mean") -> Array:
    """RMSE of the climatology forecast (reference a model must beat at long leads)."""
    return weighted_rmse(climatology_forecast(climatology, target), target, lat_weights, reduction)


class ForecastMetrics:
    """Accumulates per-(lead, channel) metrics over evaluation batches.

    State is one dense float64 tensor ``[num_leads, num_channels, len(FIELDS)]`` of sums over
    samples plus the sample count, so data-parallel ranks combine it with one all-reduce
    (:meth:`all_reduce`). Tensor-parallel ranks hold different channels; gather their
    :meth:`compute` dicts instead. Inputs are in physical units.

    ``compute()`` -> ``{lead_hours: {channel: {"mse", "rmse", "rmse_of_mean_mse", "acc",
    "persistence_rmse", "climatology_rmse", "num_samples"}}}`` (reference and ACC entries only
    when their inputs were given to :meth:`update`).
    """

    FIELDS = ("mse", "rmse", "acc", "persistence_rmse", "climatology_rmse", "count", "acc_count", "pers_count", "clim_count")

    def __init__(
        self,
        channel_names: Sequence[str],
        lead_times_hours: Sequence[int],
        lat_weights: Optional[Array] = None,
        *,
        centered_acc: bool = True,
    ):
        self.channel_names = list(channel_names)
        self.lead_times_hours = [int(x) for x in lead_times_hours]
        self.lat_weights = None if lat_weights is None else _to_torch(lat_weights).to(torch.float64)
        self.centered_acc = centered_acc
        self.sums = torch.zeros(len(self.lead_times_hours), len(self.channel_names), len(self.FIELDS), dtype=torch.float64)

    def update(
        self,
        pred: Array,
        target: Array,
        lead_time_hours: Union[int, float, Array],
        *,
        climatology: Optional[Array] = None,
        initial_state: Optional[Array] = None,
    ) -> None:
        """Add a batch ``[B, C, H, W]`` (physical units). ``lead_time_hours``: one value or ``[B]``.

        ``initial_state`` (the input state of the same channels) adds the persistence reference,
        ``climatology`` (``[C, H, W]`` or ``[B, C, H, W]``) adds ACC and the climatology reference.
        """
        p, t = _prepare(pred, target)
        p, t = p.detach().to("cpu", torch.float64), t.detach().to("cpu", torch.float64)
        if p.ndim != 4 or p.shape[1] != len(self.channel_names):
            raise ValueError(f"expected pred [B, {len(self.channel_names)}, H, W], got {tuple(p.shape)}")
        leads = torch.as_tensor(np.asarray(lead_time_hours.detach().cpu() if isinstance(lead_time_hours, torch.Tensor) else lead_time_hours))
        leads = leads.reshape(-1).expand(p.shape[0]) if leads.numel() == 1 else leads.reshape(-1)
        w = self.lat_weights
        mse = weighted_mse(p, t, w, reduction="none")  # [B, C]
        per: Dict[int, torch.Tensor] = {0: mse, 1: torch.sqrt(mse)}
        if climatology is not None:
            c = _to_torch(climatology).detach().to("cpu", torch.float64)
            per[2] = weighted_acc(p, t, c, w, centered=self.centered_acc, reduction="none")
            per[4] = weighted_rmse(c.expand_as(t), t, w, reduction="none")
        if initial_state is not None:
            per[3] = weighted_rmse(_to_torch(initial_state).detach().to("cpu", torch.float64), t, w, reduction="none")
        for b in range(p.shape[0]):
            lead = int(round(float(leads[b])))
            if lead not in self.lead_times_hours:
                raise ValueError(f"lead {lead} h is not one of the declared evaluation leads {self.lead_times_hours}")
            row = self.sums[self.lead_times_hours.index(lead)]
            for k, v in per.items():
                row[:, k] += v[b]
            row[:, 5] += 1
            if 2 in per:
                row[:, 6] += 1
                row[:, 8] += 1
            if 3 in per:
                row[:, 7] += 1

    def all_reduce(self, group: Any = None) -> None:
        """Sum the state over a (data-parallel) process group."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.sums, group=group)

    def compute(self) -> Dict[int, Dict[str, Dict[str, float]]]:
        out: Dict[int, Dict[str, Dict[str, float]]] = {}
        for i, lead in enumerate(self.lead_times_hours):
            per_lead: Dict[str, Dict[str, float]] = {}
            for j, name in enumerate(self.channel_names):
                s = self.sums[i, j]
                n = float(s[5])
                if n == 0:
                    continue
                entry = {
                    "mse": float(s[0]) / n,
                    "rmse": float(s[1]) / n,
                    "rmse_of_mean_mse": (float(s[0]) / n) ** 0.5,
                    "num_samples": int(n),
                }
                if s[6] > 0:
                    entry["acc"] = float(s[2]) / float(s[6])
                    entry["climatology_rmse"] = float(s[4]) / float(s[8])
                if s[7] > 0:
                    entry["persistence_rmse"] = float(s[3]) / float(s[7])
                per_lead[name] = entry
            if per_lead:
                out[lead] = per_lead
        return out

    def flat(self, prefix: str = "") -> Dict[str, float]:
        """``{"<prefix>rmse/z_500/72h": value, ...}`` for logging (e.g. to ``metrics.jsonl``)."""
        flat: Dict[str, float] = {}
        for lead, per in self.compute().items():
            for name, entry in per.items():
                for key, value in entry.items():
                    if key != "num_samples":
                        flat[f"{prefix}{key}/{name}/{lead}h"] = value
        return flat
