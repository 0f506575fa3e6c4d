"""The ERA5 forecasting dataset: ``(state at t, state at t + Δ)`` pairs for one rank's channels.

:class:`ERA5Dataset` is a map-style dataset of ``(input at t, target at t + Δ)`` pairs. A tensor
-parallel rank loads only its input channels (``channel_range``) and the output channels it owns
(``output_channel_range``). Training leads come from :mod:`megatron_dchag.data.era5.leads`;
evaluation uses fixed lead times (``lead_times_hours``). The batch samplers that pick the pairs
are :class:`~megatron_dchag.data.sampler.ERA5TrainBatchSampler` and
:class:`~megatron_dchag.data.sampler.ERA5EvalBatchSampler`.

Sample dict (one item; the default collate stacks them into a batch)::

    input            float32 [C_in_local, H, W]    normalized state at t
    target           float32 [C_out_local, H, W]   normalized state at t + Δ
    lead_time_hours  float32 []                    Δ in hours
    time             int64 []                      t, seconds since 1970-01-01 UTC
    target_time      int64 []                      t + Δ, seconds since 1970-01-01 UTC
    time_index       int64 []                      index of t on the data's time axis
    climatology      float32 [C_out_local, H, W]   only with return_climatology=True (physical units)

Row 0 of every ``[H, W]`` field is the southernmost latitude (see :attr:`ERA5Dataset.latitudes`).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import xarray as xr

from megatron_dchag.data.era5.leads import sample_lead_hours, train_lead_hours
from megatron_dchag.data.era5.canonical import EnsembleMember, parse_ensemble_member
from megatron_dchag.data.era5.naming import DEFAULT_ERA5_CHANNELS, LAT_DIM, LON_DIM, TIME_DIM, ChannelSpec, parse_channels
from megatron_dchag.data.era5.splits import split_window
from megatron_dchag.data.era5.statistics import ERA5Stats, load_era5_stats
from megatron_dchag.data.era5.store import ChannelReader, PathLike, describe_dataset, format_time, open_era5

__all__ = ["ERA5Dataset"]


def _resolve_range(rng: Optional[Sequence[int]], n: int, what: str, allow_empty: bool = False) -> Tuple[int, int]:
    if rng is None:
        return 0, n
    if len(rng) != 2:
        raise ValueError(f"{what} must be (start, stop), got {rng!r}")
    start, stop = int(rng[0]), int(rng[1])
    if not (0 <= start <= stop <= n if allow_empty else 0 <= start < stop <= n):
        raise ValueError(f"{what}=({start}, {stop}) is not a {'' if allow_empty else 'non-empty '}range within [0, {n}]")
    return start, stop


class ERA5Dataset(torch.utils.data.Dataset):
    """Forecasting pairs ``(state at t, state at t + Δ)`` from ERA5 data, for one rank's channels.

    Args:
        path: anything :func:`open_era5` accepts.
        channels: the model's input channel list (global, all ranks), e.g. ``DEFAULT_ERA5_CHANNELS``.
        channel_range: ``(start, stop)`` into ``channels``: the input channels this rank loads
            (default all).
        output_channels: the predicted channel list (global); default ``channels``.
        output_channel_range: ``(start, stop)`` into ``output_channels``: the outputs this rank
            owns. Default: ``channel_range`` when ``output_channels`` is ``None`` (each rank
            predicts its own input channels), else all outputs.
        time_range: ``(start, end)`` time labels (inclusive; strings such as ``"2018-01-01"`` or
            ``"2018"``), applied before the split. Must lie within the data.
        max_lead_hours, lead_step_hours, min_lead_hours: training leads are
            ``min, min + step, ..., max`` (``min`` defaults to ``step``).
        lead_times_hours: fixed evaluation leads. When given, every index covers the initial
            times valid for *all* of them (the same initial times for every lead).
        stats_file: statistics from ``tools/compute_era5_stats.py`` (or an :class:`ERA5Stats`);
            inputs and targets are normalized with them. ``None``: values stay in physical units.
        split: ``"train"`` (the first ``1 - val_fraction`` of the time steps), ``"val"`` (the rest)
            or ``"all"``. Targets never cross the split boundary.
        seed: used by integer indexing in training mode (per-sample lead, see ``__getitem__``).
        cache: load this rank's channels for the whole time window into memory at construction
            (``None``: when that takes at most ``cache_max_bytes``).
        return_climatology: add each target's climatology (physical units) to the sample.
        ensemble_member: for data with an ensemble dimension, the member index or ``"mean"``.
    """

    def __init__(
        self,
        path: Union[PathLike, Sequence[PathLike]],
        channels: Sequence[str] = DEFAULT_ERA5_CHANNELS,
        channel_range: Optional[Tuple[int, int]] = None,
        output_channels: Optional[Sequence[str]] = None,
        output_channel_range: Optional[Tuple[int, int]] = None,
        time_range: Optional[Tuple[Any, Any]] = None,
        max_lead_hours: int = 72,
        lead_step_hours: int = 6,
        min_lead_hours: Optional[int] = None,
        lead_times_hours: Optional[Sequence[int]] = None,
        stats_file: Optional[Union[PathLike, ERA5Stats]] = None,
        split: str = "all",
        val_fraction: float = 0.1,
        seed: int = 0,
        cache: Optional[bool] = None,
        cache_max_bytes: int = 2 << 30,
        return_climatology: bool = False,
        ensemble_member: EnsembleMember = None,
    ):
        super().__init__()
        self.path = path
        self.ensemble_member = parse_ensemble_member(ensemble_member)
        self.source = str(path) if isinstance(path, (str, os.PathLike)) else f"{len(path)} paths"
        self.seed = int(seed)
        self._ds: Optional[xr.Dataset] = None
        self._pid: Optional[int] = None
        ds = self.dataset

        # Channels.
        self.channel_specs = parse_channels(channels)
        self.channel_range = _resolve_range(channel_range, len(self.channel_specs), "channel_range")
        if output_channels is None:
            self.output_specs = list(self.channel_specs)
            default_out = self.channel_range
        else:
            self.output_specs = parse_channels(output_channels)
            default_out = (0, len(self.output_specs))
        self.output_channel_range = (
            default_out if output_channel_range is None
            # empty: a rank that predicts none of a subset of outputs (it still reads its inputs)
            else _resolve_range(output_channel_range, len(self.output_specs), "output_channel_range", allow_empty=True)
        )
        # Validate the *global* lists (metadata only) so every rank fails with the same message.
        ChannelReader(ds, self.channel_specs, self.source)
        ChannelReader(ds, self.output_specs, self.source)
        self.input_specs = self.channel_specs[slice(*self.channel_range)]
        self.local_output_specs = self.output_specs[slice(*self.output_channel_range)]
        union: List[ChannelSpec] = list(dict.fromkeys(self.input_specs + self.local_output_specs))
        self._reader = ChannelReader(ds, union, self.source)
        pos = {s.name: i for i, s in enumerate(union)}
        self._input_pos = np.array([pos[s.name] for s in self.input_specs], dtype=np.int64)
        self._output_pos = np.array([pos[s.name] for s in self.local_output_specs], dtype=np.int64)

        # Times: range, split, leads, valid initial times.
        if TIME_DIM not in ds.coords or ds.sizes.get(TIME_DIM, 0) == 0:
            raise ValueError(f"{self.source}: the data has no time axis; {describe_dataset(ds)}")
        all_times = ds[TIME_DIM].values.astype("datetime64[s]")
        if np.any(np.diff(all_times.astype(np.int64)) <= 0):
            raise ValueError(f"{self.source}: time coordinate is not strictly increasing")
        lo, hi = self._time_window(all_times, time_range)
        lo, hi = split_window(lo, hi, split, val_fraction)
        if split != "all":
            if hi - lo < 2:
                raise ValueError(f"split={split!r} of {self.source} has {hi - lo} time steps; it needs at least 2")
        self.split = split
        self.window = (lo, hi)  # absolute time indices [lo, hi)
        self._times_s = all_times.astype(np.int64)

        self.max_lead_hours, self.lead_step_hours, self.min_lead_hours = max_lead_hours, lead_step_hours, min_lead_hours
        self.lead_times_hours = None if lead_times_hours is None else [int(x) for x in lead_times_hours]
        if self.lead_times_hours is not None:
            if not self.lead_times_hours or any(x <= 0 for x in self.lead_times_hours):
                raise ValueError(f"lead_times_hours must be positive, got {lead_times_hours!r}")
            self.active_leads = sorted(set(self.lead_times_hours))
        else:
            self.active_leads = train_lead_hours(max_lead_hours, lead_step_hours, min_lead_hours)
        self._starts = self._valid_starts(self.active_leads)

        # Statistics.
        self.stats: Optional[ERA5Stats] = None
        if stats_file is not None:
            full = stats_file if isinstance(stats_file, ERA5Stats) else load_era5_stats(stats_file)
            src = "statistics" if isinstance(stats_file, ERA5Stats) else f"statistics file {stats_file}"
            if full.latitude is not None and (
                len(full.latitude) != ds.sizes[LAT_DIM] or not np.allclose(full.latitude, ds[LAT_DIM].values, atol=1e-4)
            ):
                raise ValueError(f"{src} was computed on a different latitude grid ({len(full.latitude)} rows) than {self.source} ({ds.sizes[LAT_DIM]})")
            self.stats = full.select([s.name for s in union], src)
            std = np.where(self.stats.std > 0, self.stats.std, 1.0)
            self._mean = self.stats.mean.astype(np.float32)[:, None, None]
            self._std = std.astype(np.float32)[:, None, None]
        else:
            self._mean = np.zeros((len(union), 1, 1), np.float32)
            self._std = np.ones((len(union), 1, 1), np.float32)
        self.return_climatology = return_climatology
        if return_climatology and (self.stats is None or (self.stats.climatology is None and self.stats.climatology_doy is None)):
            raise ValueError("return_climatology=True needs a stats_file with a climatology")

        # Cache.
        n_bytes = (hi - lo) * len(union) * ds.sizes[LAT_DIM] * ds.sizes[LON_DIM] * 4
        self._cache: Optional[np.ndarray] = None
        if cache or (cache is None and n_bytes <= cache_max_bytes):
            self._cache = self._reader.read(slice(lo, hi))

    # -- opening (per process: file handles must not cross a fork) ------------------------------
    @property
    def dataset(self) -> xr.Dataset:
        if self._ds is None or self._pid != os.getpid():
            self._ds = open_era5(self.path, ensemble_member=self.ensemble_member)
            self._pid = os.getpid()
            if getattr(self, "_reader", None) is not None:
                self._reader.ds = self._ds
        return self._ds

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_ds"] = None
        state["_pid"] = None
        if state.get("_reader") is not None:
            reader = ChannelReader.__new__(ChannelReader)
            reader.__dict__.update(self._reader.__dict__)
            reader.ds = None  # type: ignore[assignment]
            state["_reader"] = reader
        return state

    # -- time bookkeeping -------------------------------------------------------------------------
    def _time_window(self, times: np.ndarray, time_range: Optional[Tuple[Any, Any]]) -> Tuple[int, int]:
        if time_range is None:
            return 0, len(times)
        import pandas as pd

        if len(time_range) != 2:
            raise ValueError(f"time_range must be (start, end), got {time_range!r}")
        index = pd.DatetimeIndex(times.astype("datetime64[ns]"))
        start, end = pd.Timestamp(time_range[0]), pd.Timestamp(time_range[1])
        have = f"the data covers {format_time(times[0])} .. {format_time(times[-1])} ({len(times)} steps)"
        if start > end:
            raise ValueError(f"time_range {time_range!r}: start is after end")
        if start < index[0] or end > index[-1]:
            raise ValueError(f"time_range {tuple(map(str, time_range))} is not within the data: {have} ({self.source})")
        sl = index.slice_indexer(time_range[0], time_range[1])
        lo, hi = int(sl.start or 0), int(sl.stop if sl.stop is not None else len(times))
        if hi - lo < 2:
            raise ValueError(f"time_range {tuple(map(str, time_range))} selects {hi - lo} time steps; {have}")
        return lo, hi

    def _valid_starts(self, leads: Sequence[int]) -> np.ndarray:
        lo, hi = self.window
        t = self._times_s[lo:hi]
        ok = np.ones(len(t), dtype=bool)
        for lead in leads:
            target = t + int(lead) * 3600
            j = np.searchsorted(t, target)
            found = (j < len(t)) & (t[np.minimum(j, len(t) - 1)] == target)
            if not found.any():
                raise ValueError(f"lead time {lead} h: no initial time in {self._describe_axis(t)} has a target at "
                                 f"+{lead} h inside the same window{self._lead_hint(t)}")
            ok &= found
        if not ok.any():
            raise ValueError(f"no initial time in {self._describe_axis(t)} has targets at all lead times {list(leads)} "
                             f"at once{self._lead_hint(t)}")
        return np.flatnonzero(ok) + lo

    def _describe_axis(self, t: np.ndarray) -> str:
        """``2018-01-01T00:00 .. 2018-01-05T18:00 (split='val', 114 h, 6-hourly)``, saying when the
        axis is irregular and its smallest and largest steps."""
        span_h = (t[-1] - t[0]) / 3600.0
        steps = np.diff(t) / 3600.0
        if len(steps) == 0:
            spacing = "one time step"
        elif np.all(steps == steps[0]):
            spacing = f"{steps[0]:g}-hourly"
        else:
            spacing = (f"an irregular time axis: steps from {steps.min():g} h to {steps.max():g} h, "
                       f"{len(np.unique(steps))} different steps")
        return f"{format_time(t[0])} .. {format_time(t[-1])} (split={self.split!r}, {span_h:g} h, {spacing})"

    @staticmethod
    def _lead_hint(t: np.ndarray, reach: int = 4, shown: int = 8) -> str:
        """The shortest leads (hours) that do have targets from some initial time (leads must match
        exactly: a target 23 h after its initial time is not a 24 h forecast)."""
        if len(t) < 2:
            return ""
        diffs = np.unique(np.concatenate([t[k:] - t[:-k] for k in range(1, min(reach, len(t) - 1) + 1)])) / 3600.0
        leads = ", ".join(f"{d:g}" for d in diffs[:shown])
        return f"; leads with targets in this window: {leads}{', ...' if len(diffs) > shown else ''} h"

    def target_index(self, time_index: int, lead_hours: int) -> int:
        """Absolute index of ``time[time_index] + lead_hours`` (``KeyError`` if outside the window)."""
        lo, hi = self.window
        if not lo <= time_index < hi:
            raise KeyError(f"time index {time_index} is outside this dataset's window [{lo}, {hi})")
        target = self._times_s[time_index] + int(lead_hours) * 3600
        j = int(np.searchsorted(self._times_s[lo:hi], target)) + lo
        if j >= hi or self._times_s[j] != target:
            raise KeyError(f"no target at {format_time(target)} (+{lead_hours} h) in the window")
        return j

    # -- public properties ------------------------------------------------------------------------
    @property
    def latitudes(self) -> np.ndarray:
        """Latitudes in degrees, ascending (south-to-north): row 0 is the southernmost."""
        return self.dataset[LAT_DIM].values.astype(np.float64)

    @property
    def longitudes(self) -> np.ndarray:
        """Longitudes in degrees, ascending in ``[0, 360)``."""
        return self.dataset[LON_DIM].values.astype(np.float64)

    @property
    def times(self) -> np.ndarray:
        """Times of this dataset's window (datetime64[s])."""
        return self._times_s[slice(*self.window)].astype("datetime64[s]")

    @property
    def valid_start_indices(self) -> np.ndarray:
        """Absolute time indices that are valid initial times for every active lead."""
        return self._starts

    @property
    def input_channel_names(self) -> List[str]:
        return [s.name for s in self.input_specs]

    @property
    def output_channel_names(self) -> List[str]:
        return [s.name for s in self.local_output_specs]

    @property
    def output_is_constant(self) -> torch.Tensor:
        """Bool ``[C_out_local]``: outputs that never change (lsm, orography), e.g. to leave out of the loss."""
        return torch.tensor([s.is_constant for s in self.local_output_specs], dtype=torch.bool)

    @property
    def output_mean(self) -> torch.Tensor:
        return torch.from_numpy(self._mean[self._output_pos, 0, 0].copy())

    @property
    def output_std(self) -> torch.Tensor:
        return torch.from_numpy(self._std[self._output_pos, 0, 0].copy())

    @property
    def input_mean(self) -> torch.Tensor:
        return torch.from_numpy(self._mean[self._input_pos, 0, 0].copy())

    @property
    def input_std(self) -> torch.Tensor:
        return torch.from_numpy(self._std[self._input_pos, 0, 0].copy())

    def denormalize_output(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized ``[..., C_out_local, H, W]`` -> physical units."""
        mean = self.output_mean.to(x.device, x.dtype)[:, None, None]
        std = self.output_std.to(x.device, x.dtype)[:, None, None]
        return x * std + mean

    def climatology_for(self, target_times: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
        """Climatology of this rank's outputs at ``target_times`` (seconds or datetime64) -> ``[B, C_out_local, H, W]``."""
        if self.stats is None:
            raise ValueError("climatology_for needs a stats_file")
        if isinstance(target_times, torch.Tensor):
            target_times = target_times.cpu().numpy()
        clim = self.stats.climatology_at(np.asarray(target_times))
        return np.ascontiguousarray(clim[:, self._output_pos], dtype=np.float32)

    # -- indexing ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        if self.lead_times_hours is not None:
            return len(self.lead_times_hours) * len(self._starts)
        return len(self._starts)

    def index_to_pair(self, index: int) -> Tuple[int, int]:
        """Integer index -> ``(time_index, lead_hours)``.

        Evaluation mode (``lead_times_hours`` given): lead-major enumeration of every
        (lead, initial time). Training mode: the ``index``-th valid initial time with a lead drawn
        per sample from ``(seed, index)``; use
        :class:`~megatron_dchag.data.sampler.ERA5TrainBatchSampler` for one lead per batch.
        """
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        if self.lead_times_hours is not None:
            lead = self.lead_times_hours[index // len(self._starts)]
            return int(self._starts[index % len(self._starts)]), int(lead)
        lead = sample_lead_hours(self.seed, index, self.max_lead_hours, self.lead_step_hours, self.min_lead_hours)
        return int(self._starts[index]), lead

    def _read(self, time_index: int) -> np.ndarray:
        if self._cache is not None:
            return self._cache[time_index - self.window[0]]
        _ = self.dataset  # reopen after a fork
        return self._reader.read(int(time_index))

    def __getitem__(self, index: Union[int, Tuple[int, int]]) -> Dict[str, torch.Tensor]:
        """``index`` an int (see :meth:`index_to_pair`) or an explicit ``(time_index, lead_hours)``."""
        if isinstance(index, tuple):
            time_index, lead = int(index[0]), int(index[1])
        else:
            time_index, lead = self.index_to_pair(int(index))
        target_index = self.target_index(time_index, lead)
        x = self._read(time_index)[self._input_pos]
        y = self._read(target_index)[self._output_pos]
        x = (x - self._mean[self._input_pos]) / self._std[self._input_pos]
        y = (y - self._mean[self._output_pos]) / self._std[self._output_pos]
        sample = {
            "input": torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
            "target": torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)),
            "lead_time_hours": torch.tensor(float(lead), dtype=torch.float32),
            "time": torch.tensor(int(self._times_s[time_index]), dtype=torch.int64),
            "target_time": torch.tensor(int(self._times_s[target_index]), dtype=torch.int64),
            "time_index": torch.tensor(time_index, dtype=torch.int64),
        }
        if self.return_climatology:
            clim = self.climatology_for(np.array([self._times_s[target_index]]))[0]
            sample["climatology"] = torch.from_numpy(clim)
        return sample
