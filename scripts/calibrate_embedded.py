"""Regenerate the DC-Solver ratios and CPR coefficients shipped for the embedded ``gmm`` and ``digits`` models.

Calibrates (seeded, deterministic) with the benchmark's sampler settings at every NFE in ``NFES`` and fits CPR over
them, then writes ``dc_solver_ratios.safetensors`` + ``.json`` beside each model's ``scheduler_config.json``
(``diffalign/assets/gmm/scheduler/``, ``diffalign/assets/digits/digits/scheduler/``), where ``diffalign bench``
finds them. About a minute for gmm and a few minutes for digits on 2 CPU cores.

    python scripts/calibrate_embedded.py                 # both models
    python scripts/calibrate_embedded.py --models gmm
"""

from __future__ import annotations

import argparse
import time
import warnings

from diffalign.evaluation.calibration import calibrate_model, write_calibration

NFES = (4, 5, 6, 7, 8, 9, 10, 12, 15)
SETTINGS = dict(n_datapoints=10, seed=0, num_iters=60, lr=0.05, substeps=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gmm", "digits"], choices=["gmm", "digits"])
    args = parser.parse_args()
    for name in args.models:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            scheduler, target = calibrate_model(name, nfe=NFES, **SETTINGS)
        out = write_calibration(scheduler, target.scheduler_dir)
        print(f"{name}: {len(scheduler.ratio_table)} settings + CPR in {time.perf_counter() - start:.0f} s -> {out}")
        for (nfe, _), ratios in sorted(scheduler.ratio_table.items()):
            print(f"  NFE {nfe:>2}: " + " ".join(f"{r:.3f}" for r in ratios))


if __name__ == "__main__":
    main()
