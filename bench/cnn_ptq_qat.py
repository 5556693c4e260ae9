"""Classic PTQ and QAT on the digits CNN: the classic PTQ / QAT issue's table (method, W/A bits,
top-1 on the held-out digits, wall seconds) and its acceptance checks.

Every row quantizes weights per tensor, with the first and the last layer at 8 bits (weights
and inputs), the convention of the papers compared (PACT, LSQ, AdaRound, BRECQ). BatchNorm is
folded first, as any deployment does. Activations ("A" bits) are the inputs of every
conv/linear layer; PTQ rows calibrate them statically (MSE observer) on the calibration images
after the weights are quantized.

Groups of rows:
1. weights only at W8..W2: round-to-nearest (RTN) picks the lowest width at which it loses at
   least 5 points; DFQ (no data, and with empirical bias correction) and AdaRound at those;
2. AdaRound at W4A8; AdaRound and BRECQ at W3A4 and W2A4;
3. quantization-friendly float training: 5 epochs of fine-tuning with each R² range
   regularizer and KURE (and without one, the control), then RTN at the RTN-breaking width;
4. QAT at W2A2 for every method (30 epochs from the float model, 10 % of the training split
   held out for model selection).
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
QAT_METHODS = ("ste", "lsq", "lsq+", "pact", "ewgs", "mad", "n2uq", "kmeans", "dkm")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtn-bits", default="8,6,5,4,3,2", help="weight widths for the RTN sweep")
    parser.add_argument("--qat-bits", default="2,2", help="W,A bits of the QAT rows")
    parser.add_argument("--qat-methods", default=",".join(QAT_METHODS))
    parser.add_argument("--epochs", type=int, default=30, help="QAT epochs")
    parser.add_argument("--results", type=Path, help="also write the table into this markdown file")
    args = parser.parse_args()

    from common import run_header, write_section

    from quantcore.algorithms.adaround import adaround_model
    from quantcore.algorithms.brecq import brecq_model
    from quantcore.algorithms.dfq import data_free_quantize, fold_batchnorm, round_to_nearest, weight_quantizer
    from quantcore.algorithms.qat import QATOptions, prepare_qat, train_qat
    from quantcore.algorithms.quantsim import per_tensor_schemes, static_quantsim
    from quantcore.models.digits_cnn import digits_split, pretrained_digits_cnn, top1

    torch.manual_seed(SEED)
    torch.set_num_threads(1)  # the CNN is too small to gain from threads; one thread is steadier
    header = run_header(SEED, split="digits stratified 70/30", calibration=f"{CALIBRATION_IMAGES} training images",
                        convention="per-tensor weights, first and last layer at 8 bits, BN folded")
    print("\n".join(header), flush=True)
    split = digits_split(SEED)
    float_model = pretrained_digits_cnn(SEED, split)  # trained once per seed (under a minute), then cached
    fp32 = top1(float_model, split.test_x, split.test_y)
    rows = [("fp32", "W32 A32", fp32, None)]
    calibration = split.train_x[:CALIBRATION_IMAGES]
    labels = split.train_y[:CALIBRATION_IMAGES]
    example = torch.zeros(1, 1, 8, 8)  # only its shape is used: each conv's padding in the analytic correction

    def measure(method: str, wbits: int, abits: int | None, transform, calibrate: bool = True) -> float:
        model = copy.deepcopy(float_model)
        start = time.perf_counter()
        transform(model, wbits)
        if abits is not None and calibrate:
            static_quantsim(model, abits, [calibration])
        seconds = time.perf_counter() - start
        accuracy = top1(model, split.test_x, split.test_y)
        rows.append((method, f"W{wbits} A{abits or 32}", accuracy, seconds))
        print(f"{method} {rows[-1][1]}: {accuracy:.2f} %  ({seconds:.1f} s)", flush=True)
        return accuracy

    def rtn(model, bits):
        fold_batchnorm(model)
        round_to_nearest(model, per_tensor_schemes(model, bits))

    def dfq(data):
        def transform(model, bits):
            per_layer = {name: weight_quantizer(s) for name, s in per_tensor_schemes(model, bits).items()}
            data_free_quantize(model, None, data=data, example_input=example, per_layer=per_layer)
        return transform

    def adaround(model, bits):
        fold_batchnorm(model)
        adaround_model(model, None, [calibration], seed=SEED, per_layer=per_tensor_schemes(model, bits))

    def brecq(model, bits):
        fold_batchnorm(model)
        brecq_model(model, per_tensor_schemes(model, bits), calibration, labels, seed=SEED)

    # 1. weights only: where does RTN break, and what do DFQ and AdaRound recover there?
    losses = {bits: fp32 - measure("rtn", bits, None, rtn) for bits in (int(b) for b in args.rtn_bits.split(","))}
    broken = [bits for bits, loss in losses.items() if loss >= 5]
    chosen = max(broken) if broken else min(losses)
    print(f"lowest widths where RTN loses >= 5 points: W{chosen} (A32)", flush=True)
    dfq_accuracy = measure("dfq (no data)", chosen, None, dfq(None))
    measure("dfq + empirical bias correction", chosen, None, dfq([calibration]))
    measure("adaround", chosen, None, adaround)

    # 2. with quantized activations
    measure("rtn", 4, 8, rtn)
    adaround_w4a8 = measure("adaround", 4, 8, adaround)
    ptq = {}
    for wbits in (3, 2):
        measure("rtn", wbits, 4, rtn)
        ptq[("adaround", wbits)] = measure("adaround", wbits, 4, adaround)
        ptq[("brecq", wbits)] = measure("brecq", wbits, 4, brecq)

    # 3. quantization-friendly float training, then RTN
    import torch.nn.functional as F

    from quantcore.algorithms.range_regularizers import regularized_finetune

    for kind, strength in (("none", 0.0), ("kure", 0.01), ("linf", 0.01), ("margin", 0.001), ("soft_min_max", 0.01)):
        def finetune_then_rtn(model, bits, kind=kind, strength=strength):
            regularized_finetune(model, (split.train_x, split.train_y), F.cross_entropy, "kure" if kind == "none" else kind,
                                 strength, epochs=5, learning_rate=1e-3, seed=SEED)
            model.eval()
            rtn(model, bits)

        label = "fine-tune (no regularizer) + rtn" if kind == "none" else f"{kind} (λ={strength}) fine-tune + rtn"
        measure(label, chosen, None, finetune_then_rtn)

    # 4. QAT
    wbits, abits = (int(b) for b in args.qat_bits.split(","))
    qat_accuracy = {}
    for method in args.qat_methods.split(","):
        options = QATOptions(method=method, weight_bits=wbits, activation_bits=abits, epochs=args.epochs, seed=SEED)

        def train(model, _bits, options=options):
            prepare_qat(model, options, calibration)
            train_qat(model, split.train_x, split.train_y, options)

        qat_accuracy[method] = measure(f"qat {method}", wbits, abits, train, calibrate=False)

    table = "\n".join(
        ["| method | W/A bits | top-1 % | seconds |", "|---|---|---|---|"]
        + [f"| {m} | {b} | {acc:.2f} | {'' if s is None else f'{s:.1f}'} |" for m, b, acc, s in rows]
    )
    rtn_loss = losses[chosen]
    recovered = (dfq_accuracy - (fp32 - rtn_loss)) / rtn_loss if rtn_loss > 0 else float("nan")
    checks = [
        f"- fp32 ≥ 97 %: {fp32:.2f} {'✓' if fp32 >= 97 else '✗'}",
        f"- at W{chosen} RTN loses {rtn_loss:.2f} points; DFQ (no data) recovers {100 * recovered:.0f} % of it "
        f"(≥ 50 %): {'✓' if recovered >= 0.5 else '✗'}",
        f"- AdaRound W4A8 {adaround_w4a8:.2f}, within 1 point of fp32: {'✓' if fp32 - adaround_w4a8 <= 1 else '✗'}",
    ]
    for bits in (3, 2):
        a, b = ptq[("adaround", bits)], ptq[("brecq", bits)]
        checks.append(f"- W{bits}A4: BRECQ {b:.2f} vs AdaRound {a:.2f}: {'✓' if b >= a else '✗'}")
    if "lsq" in qat_accuracy:
        lsq = qat_accuracy["lsq"]
        checks.append(f"- LSQ W{wbits}A{abits} {lsq:.2f}, within 2 points of fp32: {'✓' if fp32 - lsq <= 2 else '✗'}")
    table += "\n\nAcceptance checks:\n" + "\n".join(checks)
    print("\n" + table)
    if args.results:
        write_section(args.results, "Classic PTQ and QAT on the digits CNN", header, table, " ".join(["python"] + sys.argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
