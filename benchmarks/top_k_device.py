"""`similarity.top_k` of embeddings: the Keras backend's device against NumPy.

Times `top_k(from_embeddings(vectors), k)` with `on_device=False` (NumPy:
float32 BLAS products, chunk maxima, partial selection) and `on_device=True`
(the active Keras backend: block products and a top-`k + 8` selection on its
default device, a GPU where there is one; rows settled on the host), side by
side in one run, and checks that both give the same neighbours and values.
On a machine without an accelerator the backend's device is the same CPU:
the ratio then compares two CPU implementations, not a GPU with a CPU.

    KERAS_BACKEND=jax python benchmarks/top_k_device.py
    KERAS_BACKEND=jax python benchmarks/top_k_device.py --classes 20000
"""

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_simloss import similarity  # noqa: E402


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--classes", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=300)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args()

    vectors = np.random.default_rng(0).standard_normal(
        (args.classes, args.dim), dtype=np.float32
    )
    source = similarity.from_embeddings(vectors, 0.1)
    devices = keras.distribution.list_devices()
    print(
        f"C = {args.classes:,}, d = {args.dim}, k = {args.k}; Keras backend "
        f"{keras.config.backend()}, device {devices[0]}",
        flush=True,
    )
    times, results = {}, {}
    for on_device in (False, True):
        start = time.perf_counter()
        results[on_device] = similarity.top_k(
            source, args.k, batch_size=args.batch_size, on_device=on_device
        )
        times[on_device] = time.perf_counter() - start
        label = "backend device" if on_device else "NumPy"
        print(f"  {label:<14} {times[on_device]:8.1f} s", flush=True)
    same = np.array_equal(
        results[False].indices, results[True].indices
    ) and np.array_equal(results[False].values, results[True].values)
    print(
        f"device / NumPy time: {times[True] / times[False]:.2f}; "
        f"identical result: {same}"
    )


if __name__ == "__main__":
    main()
