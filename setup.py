"""Install megatron_dchag: D-CHAG channel aggregation on megatron-core.

Torch must be installed first and pinned (``pip install torch==2.13.0``); an unpinned
torch requirement would pull the CUDA wheels. The Makefile does this for you.
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch==2.13.0",
    "megatron-core==0.16.1",
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
    "dchag-make-synthetic-hyperspectral = megatron_dchag.cli.make_synthetic_hyperspectral:main",
    "dchag-make-synthetic-era5 = megatron_dchag.cli.make_synthetic_era5:main",
    "dchag-compute-stats = megatron_dchag.cli.compute_stats:main",
    "dchag-compute-era5-stats = megatron_dchag.cli.compute_era5_stats:main",
    "dchag-regrid-era5 = megatron_dchag.cli.regrid_era5:main",
    "dchag-estimate-memory = megatron_dchag.cli.estimate_memory:main",
    "dchag-compare-loss-curves = megatron_dchag.cli.compare_loss_curves:main",
    "dchag-demo = megatron_dchag.cli.demo:main",
    # To come when tools/convert_checkpoint.py, tools/benchmark.py and tools/plot_*.py move into
    # megatron_dchag/cli/: dchag-convert-checkpoint, dchag-benchmark, dchag-plot-reconstruction,
    # dchag-plot-forecast.
]

setup(
    name="megatron_dchag",
    version="0.1.0",
    description="Distributed Cross-Channel Hierarchical Aggregation (D-CHAG) for many-channel ViTs on megatron-core",
    packages=find_packages(include=["megatron_dchag", "megatron_dchag.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
    extras_require={
        "test": ["pytest>=7.4"],
        # Optional accelerators: only imported when present; they do not install on CPU.
        "te": ["transformer-engine[pytorch]"],
    },
)
