"""Install megatron_dchag: D-CHAG channel aggregation on megatron-core.

Requirements are the ranges the project is tested in, never exact pins: installing into an
environment that already holds a torch in range (a cluster's CUDA or ROCm build) keeps that torch.
Install torch first where the default wheel is not what you want (ROCm, a specific CUDA, the CPU
wheel). The tested stacks are frozen in ``constraints/`` (``make install`` uses them).
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    # torch: FSDP2's public fully_shard and DeviceMesh.from_group; tested 2.13.0 and 2.14.1.
    "torch>=2.6",
    # megatron-core: tested 0.16.1 (Python 3.11) and 0.19.2 (Python 3.12); version differences
    # live in megatron_dchag/compat/megatron.py.
    "megatron-core>=0.16.1,<0.20",
    "numpy>=1.26",
    "psutil>=5.9",
    "h5py>=3.10",
    "xarray>=2024.1",
    "zarr>=2.16",
    "netCDF4>=1.6",
    "scipy>=1.11",
    "pyyaml>=6.0",
    "omegaconf>=2.3",
    "safetensors>=0.4",
    "matplotlib>=3.8",
    "tensorboard>=2.15",
]

# One console script per command; each runs ``main`` of its module in megatron_dchag/cli/ (the
# tools/*.py and root pretrain_*.py scripts are thin wrappers around the same functions).
CONSOLE_SCRIPTS = [
    "dchag-pretrain-hyperspectral = megatron_dchag.cli.pretrain_hyperspectral:main",
    "dchag-pretrain-era5 = megatron_dchag.cli.pretrain_era5:main",
    "dchag-finetune-hyperspectral = megatron_dchag.cli.finetune_hyperspectral:main",
    "dchag-make-synthetic-hyperspectral = megatron_dchag.cli.make_synthetic_hyperspectral:main",
    "dchag-make-synthetic-era5 = megatron_dchag.cli.make_synthetic_era5:main",
    "dchag-compute-stats = megatron_dchag.cli.compute_stats:main",
    "dchag-compute-era5-stats = megatron_dchag.cli.compute_era5_stats:main",
    "dchag-regrid-era5 = megatron_dchag.cli.regrid_era5:main",
    "dchag-estimate-memory = megatron_dchag.cli.estimate_memory:main",
    "dchag-compare-loss-curves = megatron_dchag.cli.compare_loss_curves:main",
    "dchag-demo = megatron_dchag.cli.demo:main",
    "dchag-convert-checkpoint = megatron_dchag.cli.convert_checkpoint:main",
    "dchag-plot-reconstruction = megatron_dchag.cli.plot_reconstruction:main",
    "dchag-plot-forecast = megatron_dchag.cli.plot_forecast:main",
    "dchag-forecast-era5 = megatron_dchag.cli.forecast_era5:main",
    "dchag-benchmark = megatron_dchag.cli.benchmark:main",
    "dchag-gpu-check = megatron_dchag.cli.gpu_check:main",
    "dchag-extract-features = megatron_dchag.cli.extract_features:main",
]

setup(
    name="megatron_dchag",
    version="0.1.0",
    description="Distributed Cross-Channel Hierarchical Aggregation (D-CHAG) for many-channel ViTs on megatron-core",
    packages=find_packages(include=["megatron_dchag", "megatron_dchag.*"]),
    license="Apache-2.0",
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
    extras_require={
        # ruff is pinned: `make test` lints, and a new ruff release must not turn CI red by itself.
        # xskillscore: an independent check of the forecast scores (tests/integration/test_forecast_files.py).
        # pytest-xdist: `make test` runs the suite on every core (most of it is single-process runs).
        "test": ["pytest>=7.4", "pytest-xdist>=3.5", "ruff==0.17.6", "xskillscore>=0.0.29"],
        # Optional accelerators: only imported when present; they do not install on CPU.
        "te": ["transformer-engine[pytorch]"],
    },
)
