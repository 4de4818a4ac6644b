"""Wavelet layer benchmark: round-trip error and jitted throughput against PyWavelets.

    python -m experiments.bench.bench_wavelets --out /tmp/bench_wavelets.json

Error: max |reconstruct(decompose(x)) - x| (float32) for haar, db2, db3, sym4, coif1 at levels 1-4, with
and without jit, on 128x128 RGB photo crops. Throughput: decompose + reconstruct of 64 RGB 256x256
images (3 levels) for dpwave (jitted) and PyWavelets (wavedec2 + waverec2 over the batch), measured
alternately in one process; the ratio is PyWavelets time / dpwave time.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import pywt
import skimage.data

from dpwave import wavelets as wv
from experiments.bench.common import median_seconds, print_table, write_json


def round_trip_errors() -> list[dict]:
    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    x = np.stack([p[:128, :128, :3] for p in photos]).astype(np.float32) / 255.0
    rows = []
    for wavelet in ["haar", "db2", "db3", "sym4", "coif1"]:
        for levels in [1, 2, 3, 4]:
            eager = wv.reconstruct(wv.decompose(x, levels, wavelet))
            jitted = jax.jit(lambda a: wv.reconstruct(wv.decompose(a, levels, wavelet)))(x)
            rows.append({"wavelet": wavelet, "levels": levels,
                         "max_err_eager": float(np.abs(eager - x).max()),
                         "max_err_jit": float(np.abs(jitted - x).max())})
    return rows


def throughput(batch: int, size: int, levels: int, repeats: int) -> list[dict]:
    x = np.random.RandomState(0).rand(batch, size, size, 3).astype(np.float32)
    x_nchw = np.ascontiguousarray(np.moveaxis(x, -1, 1))
    rows = []
    for wavelet in ["haar", "db2"]:
        ours = jax.jit(lambda a: wv.reconstruct(wv.decompose(a, levels, wavelet)))
        xd = jax.device_put(x)

        def pywt_round_trip():
            return pywt.waverec2(pywt.wavedec2(x_nchw, wavelet, level=levels, axes=(-2, -1)), wavelet, axes=(-2, -1))

        t_ours, t_pywt = [], []
        for _ in range(repeats):  # alternate to share the machine's noise
            t_ours.append(median_seconds(lambda: ours(xd), repeats=1))
            t_pywt.append(median_seconds(pywt_round_trip, repeats=1, warmup=0))
        t_o, t_p = float(np.median(t_ours)), float(np.median(t_pywt))
        rows.append({"wavelet": wavelet, "batch": f"{batch}x3x{size}x{size}", "levels": levels,
                     "dpwave_s": t_o, "pywavelets_s": t_p, "speedup_vs_pywt": t_p / t_o,
                     "dpwave_images_per_s": batch / t_o})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/bench_wavelets.json")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    errors = round_trip_errors()
    print_table(errors)
    speed = throughput(args.batch, args.size, 3, args.repeats)
    print_table(speed)
    write_json(args.out, "wavelets", speed, round_trip=errors,
               worst_round_trip_error=max(max(r["max_err_eager"], r["max_err_jit"]) for r in errors))


if __name__ == "__main__":
    main()
