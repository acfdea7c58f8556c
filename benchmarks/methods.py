"""Every pruning and quantization method on one model, measured in one process: the table in docs/methods.md.

    python benchmarks/methods.py                                    # cnn on mnist5k (embedded data)
    python benchmarks/methods.py model=resnet18_cifar dataset=fake train.epochs=1 --csv results/resnet18_fake.csv

Each row is one `pqsweep.pipeline.run` (no MLflow) on the same cached baseline; every override after the script
name applies to every row. Sizes follow docs/metrics.md's definitions; latency is batch-1 CPU p50 at measure.threads.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from pqsweep.schema import register
from pqsweep.pipeline import run

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# (row label, overrides). Amounts are the papers' usual operating points: 90 % unstructured, 50 % of filters.
METHODS = [
    ("fp32 dense (baseline)", []),
    ("global_magnitude 0.9", ["pruning=global_magnitude", "pruning.amount=0.9"]),
    ("layer_magnitude 0.9", ["pruning=layer_magnitude", "pruning.amount=0.9"]),
    ("random 0.9", ["pruning=random", "pruning.amount=0.9"]),
    ("l1_filter 0.5", ["pruning=l1_filter", "pruning.amount=0.5"]),
    ("structured_unstructured 0.5+0.5", ["pruning=structured_unstructured"]),
    ("iterative 0.9 geometric, finetune", ["pruning=iterative", "pruning.amount=0.9"]),
    ("iterative 0.9 gradual, finetune", ["pruning=iterative", "pruning.amount=0.9", "pruning.schedule=gradual"]),
    ("iterative 0.9 geometric, reinit", ["pruning=iterative", "pruning.amount=0.9", "pruning.rewind=reinit"]),
    ("fp16", ["quantization=fp16"]),
    ("bf16", ["quantization=bf16"]),
    ("dynamic_int8", ["quantization=dynamic_int8"]),
    ("static_int8 fx per_channel", ["quantization=static_int8"]),
    ("static_int8 fx per_tensor", ["quantization=static_int8", "quantization.granularity=per_tensor"]),
    ("static_int8 pt2e", ["quantization=static_int8", "quantization.backend=pt2e"]),
    ("qat_int8", ["quantization=qat_int8"]),
    ("mixed (fp32 head, int8 rest)", ["quantization=mixed"]),
    ("fake_quant w8 a8", ["quantization=fake_quant"]),
    ("fake_quant w4 a8", ["quantization=fake_quant", "quantization.bits_w=4"]),
    ("fake_quant w2 a8", ["quantization=fake_quant", "quantization.bits_w=2"]),
    ("global_magnitude 0.9 -> static_int8", ["pruning=global_magnitude", "pruning.amount=0.9",
                                             "quantization=static_int8"]),
    ("static_int8 -> global_magnitude 0.9 (int8 domain)", [
        "pruning=global_magnitude", "pruning.amount=0.9", "quantization=static_int8",
        "quantization.order=quantize_then_prune"]),
    ("l1_filter 0.5 -> static_int8", ["pruning=l1_filter", "pruning.amount=0.5", "quantization=static_int8"]),
    ("global_magnitude 0.9 -> sparse (CSR)", ["pruning=global_magnitude", "pruning.amount=0.9",
                                              "quantization=sparse"]),
]
COLUMNS = ["top1", "size_mb", "size_gzip_mb", "size_sparse_mb", "size_theoretical_mb", "macs", "latency_ms_p50"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every row")
    parser.add_argument("--csv", type=Path, help="also write the table as CSV here")
    parser.add_argument("--only", help="run only rows whose label contains this text")
    args = parser.parse_args()
    base = ["model=cnn", "dataset=mnist5k", "train.epochs=20", "train.finetune_epochs=4", "train.finetune_lr=0.001",
            "measure.repeats=200", *args.overrides]
    register()
    rows = []
    print(f"overrides for every row: {' '.join(base)}", flush=True)
    print("| method | " + " | ".join(COLUMNS) + " |\n|---|" + "---|" * len(COLUMNS), flush=True)
    for label, overrides in METHODS:
        if args.only and args.only not in label:
            continue
        with initialize_config_dir(config_dir=str(CONF_DIR)):
            cfg = compose("config", overrides=base + overrides)
        start = time.perf_counter()
        try:
            metrics = run(cfg).metrics
        except Exception as error:  # a method that cannot run on this model is a row that says so
            print(f"| {label} | failed: {type(error).__name__}: {str(error).splitlines()[0][:120]} |", flush=True)
            continue
        row = {"method": label, **{c: metrics[c] for c in COLUMNS}, "seconds": time.perf_counter() - start}
        rows.append(row)
        cells = [f"{row['top1']:.2f}", *(f"{row[c]:.4f}" for c in COLUMNS[1:5]), f"{row['macs'] / 1e6:.3f} M",
                 f"{row['latency_ms_p50']:.3f}"]
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["method", *COLUMNS, "seconds"])
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.csv}", file=sys.stderr)


if __name__ == "__main__":
    main()
