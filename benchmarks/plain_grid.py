"""The `make run` grid as a careful person would write it in plain PyTorch: no Hydra, Optuna, MLflow or caches.

    .venv/bin/python benchmarks/plain_grid.py                                  # 20 baseline epochs, 4 fine-tuning
    .venv/bin/python benchmarks/plain_grid.py --epochs 5 --finetune-epochs 1 --json rows.json

The reference side of benchmarks/framework.py. It does the work of `pqsweep -m sweep=mnist_cnn_sparsity_x_precision`
once each: one baseline trained and measured; per non-zero sparsity one global L1 magnitude pruning
(torch.nn.utils.prune) and one fine-tune with the mask held; per sparsity and precision (fp32, fp16, static int8
through torch.ao FX, calibrated on 8 training batches) one quantization and one measurement (top-1 on the test
split, stored size and its gzip, batch-1 latency at one thread: as many untimed and timed calls as pqsweep's measure
defaults, read from its MeasureConfig). The data and the net
are pqsweep's own builders (the same images, split and initial weights), the seeds are set where pqsweep sets
them, so every row's top-1 equals pqsweep's.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import io
import json
import logging
import random
import time
import warnings
from itertools import islice
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader

from pqsweep.schema import MeasureConfig  # the same number of latency calls as pqsweep's defaults
from pqsweep.data import mnist5k  # plain functions of torch and numpy: the same images and split
from pqsweep.models import small_cnn  # the same net

AMOUNTS = (0.0, 0.5, 0.75, 0.9, 0.95, 0.99)
PRECISIONS = ("none", "fp16", "static_int8")
SEED = 0
MEASURE = MeasureConfig()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(model: nn.Module, loader: DataLoader, epochs: int, lr: float) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            loss.item()  # the per-epoch loss a training loop reports
    model.eval()


class Half(nn.Module):
    """fp16 weights and activations behind a float32 interface."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = copy.deepcopy(model).half().eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.half()).float()


def static_int8(model: nn.Module, loader: DataLoader, batches: int = 8) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization warns that it is deprecated
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        torch.backends.quantized.engine = "x86"
        calibration = [x for x, _ in islice(loader, batches)]
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"),
                              example_inputs=(calibration[0][:1],))
        with torch.no_grad():
            for x in calibration:
                prepared(x)
        return convert_fx(prepared).eval()


@torch.no_grad()
def measure(model: nn.Module, test: DataLoader, example: torch.Tensor) -> dict[str, float]:
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime": we compile nothing
    from torch.utils import benchmark

    correct1 = correct5 = total = 0
    for x, y in test:
        top = model(x).topk(5, dim=1).indices  # topk, not argmax: fp16 and int8 logits tie, and the two break ties
        correct1 += (top[:, 0] == y).sum().item()  # differently
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        total += len(y)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    blob = buffer.getvalue()
    weights = [v.dequantize() if v.is_quantized else v for k, v in model.state_dict().items()
               if isinstance(v, torch.Tensor) and v.dim() >= 2]
    timer = benchmark.Timer(stmt="model(x)", globals={"model": model, "x": example}, num_threads=1)
    timer.timeit(MEASURE.warmup)
    times = np.array([timer.timeit(1).times[0] for _ in range(MEASURE.repeats)]) * 1e3
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "size_mb": len(blob) / 1e6,
            "size_gzip_mb": len(gzip.compress(blob, compresslevel=9)) / 1e6,
            "sparsity": sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights),
            "latency_ms_p50": float(np.percentile(times, 50))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="baseline training epochs (make run: 20)")
    parser.add_argument("--finetune-epochs", type=int, default=4, help="after pruning (make run: 4)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    start = time.perf_counter()

    seed_everything(SEED)
    splits = mnist5k(SimpleNamespace(resize=None, val_fraction=0.1, split_seed=0))
    generator = torch.Generator().manual_seed(SEED)
    loader = DataLoader(splits.train, batch_size=64, shuffle=True, generator=generator)
    test = DataLoader(splits.test, batch_size=256)
    model = small_cnn(num_classes=10, in_channels=1)
    train(model, loader, args.epochs, lr=1e-3)
    example = next(iter(test))[0][:1]  # after training, as in pqsweep: a loader's iterator draws a seed
    rows = [{"amount": None, "quantization": "baseline", **measure(model, test, example)}]

    for amount in AMOUNTS:
        seed_everything(SEED)
        generator.manual_seed(SEED)
        pruned = copy.deepcopy(model)
        if amount > 0:
            layers = [(m, "weight") for m in pruned.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
            prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=amount)
            if args.finetune_epochs > 0:
                train(pruned, loader, args.finetune_epochs, lr=1e-3)  # the masks hold the pruned weights at zero
            for layer, name in layers:
                prune.remove(layer, name)
        after_finetune = generator.get_state()  # every precision calibrates on the same batches
        for precision in PRECISIONS:
            generator.set_state(after_finetune)
            deployed = {"none": lambda m: m, "fp16": Half, "static_int8": lambda m: static_int8(m, loader)}[precision]
            rows.append({"amount": amount, "quantization": precision,
                         **measure(deployed(pruned), test, example)})

    for row in rows:
        print(f"{str(row['amount']):>8}  {row['quantization']:>11}  top1 {row['top1']:6.2f}  "
              f"size {row['size_mb']:.4f} MB  gzip {row['size_gzip_mb']:.4f} MB  sparsity {row['sparsity']:.3f}  "
              f"p50 {row['latency_ms_p50']:.3f} ms")
    print(f"plain grid: {len(rows) - 1} points, {time.perf_counter() - start:.1f} s in the process")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
