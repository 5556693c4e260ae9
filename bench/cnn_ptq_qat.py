"""Classic PTQ and QAT on the digits CNN: the classic PTQ / QAT issue's table (method, W/A
bits, top-1 on the held-out digits, wall seconds).

So far: fp32, round-to-nearest per-tensor weights, DFQ (BN folding, cross-layer
equalization, bias absorption, bias correction) without data and with calibration data, and
AdaRound (learned rounding per layer, on the BN-folded model) on the same grid.
Activations stay float (A32) until activation quantization for CNNs lands.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

SEED = 0
CALIBRATION_IMAGES = 256  # from the training split


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="8,6,5,4,3", help="weight bit widths to compare")
    parser.add_argument("--results", type=Path, help="also write the table into this markdown file")
    args = parser.parse_args()

    from common import run_header, write_section

    from quantcore.algorithms.adaround import adaround_model
    from quantcore.algorithms.dfq import data_free_quantize, fold_batchnorm, weight_quantizer
    from quantcore.models.digits_cnn import digits_split, pretrained_digits_cnn, top1
    from quantcore.schemes import QuantScheme

    torch.manual_seed(SEED)
    header = run_header(SEED, split="digits stratified 70/30", calibration=f"{CALIBRATION_IMAGES} training images")
    print("\n".join(header), flush=True)
    split = digits_split(SEED)
    float_model = pretrained_digits_cnn(SEED, split)  # trained once per seed (under a minute), then cached
    rows = [("fp32", "W32 A32", top1(float_model, split.test_x, split.test_y), None)]
    calibration = [split.train_x[:CALIBRATION_IMAGES]]
    example = torch.zeros(1, 1, 8, 8)  # only its shape is used: each conv's padding in the analytic correction

    def measure(method: str, bits: int, transform) -> None:
        model = copy.deepcopy(float_model)
        start = time.perf_counter()
        transform(model, weight_quantizer(QuantScheme(bits=bits, granularity="tensor")))
        seconds = time.perf_counter() - start
        rows.append((method, f"W{bits} A32", top1(model, split.test_x, split.test_y), seconds))
        print(f"{method} W{bits}: {rows[-1][2]:.2f} %", flush=True)

    def rtn(model, quantize):  # BN folded first, as any deployment does, then nearest rounding
        fold_batchnorm(model)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                    module.weight.copy_(quantize(module.weight.detach()))

    for bits in (int(b) for b in args.bits.split(",")):
        measure("rtn per-tensor", bits, rtn)
        measure("dfq (no data)", bits, lambda m, q: data_free_quantize(m, q, example_input=example))
        measure("dfq + empirical bias correction", bits, lambda m, q: data_free_quantize(m, q, data=calibration))
        scheme = QuantScheme(bits=bits, granularity="tensor")
        measure("adaround", bits, lambda m, q: (fold_batchnorm(m), adaround_model(m, scheme, calibration, seed=SEED)))

    table = "\n".join(
        ["| method | W/A bits | top-1 % | quantize seconds |", "|---|---|---|---|"]
        + [f"| {m} | {b} | {acc:.2f} | {'' if s is None else f'{s:.2f}'} |" for m, b, acc, s in rows]
    )
    print("\n" + table)
    if args.results:
        write_section(args.results, "Classic PTQ and QAT on the digits CNN", header, table, " ".join(["python"] + sys.argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
