"""`make demo`: synthetic hyperspectral cubes -> D-CHAG MAE pretraining at TP=2 -> evaluation -> plot.

Steps (each prints what it does; outputs under ``demo_output/hyperspectral/``):
1. write 24 synthetic cubes (64 bands, 400-900 nm, 64x64) and their per-channel statistics;
2. pretrain the tiny D-CHAG MAE (configs/hyperspectral/tiny.yaml) with TP=2 on two gloo ranks
   (torchrun), evaluating every 250 steps and saving a checkpoint;
3. reload the checkpoint at TP=1 (resharding) and plot original / masked / reconstructed
   false-colour images and one pixel's spectrum.

Run as ``make demo``, ``python tools/demo.py`` or the console script ``dchag-demo`` (no options).
The steps run in the source checkout (:mod:`megatron_dchag.cli.checkout`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Optional, Sequence

from megatron_dchag.cli.checkout import CHECKOUT_ROOT, require_checkout, script_environment
from megatron_dchag.launch_env import find_free_port

OUT = CHECKOUT_ROOT / "demo_output" / "hyperspectral"


def _run(cmd, **kw) -> None:
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=CHECKOUT_ROOT, check=True, env=script_environment(), **kw)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    if not require_checkout("demo"):
        return 2
    start = time.time()
    cubes, stats, run = OUT / "cubes", OUT / "stats.json", OUT / "run"
    py = sys.executable
    if not cubes.is_dir() or len(list(cubes.glob("*.h5"))) < 24:
        print("[1/3] writing synthetic hyperspectral cubes", flush=True)
        _run([py, "tools/make_synthetic_hyperspectral.py", "--out", cubes, "--num-cubes", 24, "--channels", 64,
              "--height", 64, "--width", 64, "--seed", 0, "--feature-size", 12])
    else:
        print(f"[1/3] reusing synthetic cubes in {cubes}", flush=True)
    # Over the training split of the run's config (the validation cubes stay unseen).
    _run([py, "tools/compute_stats.py", "--config", "configs/hyperspectral/tiny.yaml", "--data-path", cubes,
          "--out", stats, "--quiet"])

    print("[2/3] pretraining the tiny D-CHAG MAE with TP=2 on 2 gloo ranks", flush=True)
    if run.exists():
        import shutil

        shutil.rmtree(run)
    _run([py, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={find_free_port()}",
          "pretrain_hyperspectral.py", "--config", "configs/hyperspectral/tiny.yaml", "--data-path", cubes,
          f"data.stats_file={stats}", "--save", run])

    print("[3/3] reloading the checkpoint at TP=1 and plotting a reconstruction", flush=True)
    png = OUT / "reconstruction.png"
    _run([py, "tools/plot_reconstruction.py", "--load", run, "--out", png])

    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    evals = [r for r in records if r["kind"] == "eval"]
    last = evals[-1]
    print()
    print(f"demo finished in {time.time() - start:.0f} s")
    print(f"  final eval masked-patch MSE     {last['loss']:.4f} at step {last['step']}")
    print(f"  predicting the per-channel mean {last['mean_baseline_loss']:.4f}")
    print(f"  reconstruction plot   {png}")
    print(f"  metrics (JSON lines)  {run / 'metrics.jsonl'}")
    print(f"  TensorBoard logs      {run / 'tensorboard'}")
    print(f"  checkpoint            {run}")
    print(f"  resolved config       {run / 'config.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
