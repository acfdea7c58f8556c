"""Speed as ratios measured in one process: pqsweep's training loop against a plain PyTorch loop, compressed models
against their dense fp32 model, sparse (CSR) execution against dense, and how stable the latency metric is.

    .venv/bin/python benchmarks/speed.py                     # every table: 8 min 38 s on the shared 2-core machine
    .venv/bin/python benchmarks/speed.py --quick             # fewer rounds, noisier ratios: 5 min 7 s
    .venv/bin/python benchmarks/speed.py compressed sparse   # some of the tables

Each table is printed and written to results/speed_<table>.csv:
- training:   images/s of `pqsweep.train.fit` against a plain loop (same model, data in memory, batch 64, Adam).
- compressed: batch-1 p50/p90 latency and batch-64 throughput of each compressed model against its fp32 dense model,
              with the MACs ratio (`pqsweep.measure.macs`) beside every latency ratio.
- sparse:     `quantization=sparse` (CSR kernels) against the same pruned weights on dense kernels, at 50/90/95 %.
- stability:  IQR / median of the p50 that `pqsweep.measure.latency` reports, over repeated measurements.
Models are built, pruned and quantized by pqsweep's own code (configs composed from its option files, then
`pipeline.load_data`, `pipeline.build_model`, `pipeline.compress`), untrained: weights do not change speed, and
calibration reads `fake` images.

Discipline (a shared, noisy 2-core machine): what is compared runs in this one process, interleaved call by call in
an order that rotates each round, at a pinned thread count (1: a second thread competes with other jobs here; the
ratios are per-core ones); tables give ratios, and medians of times only as context.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import csv
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm loads: fit's progress bars, one per call, say nothing here

import numpy as np
import torch
from hydra import compose, initialize_config_module
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pqsweep import measure, pipeline
from pqsweep.schema import register
from pqsweep.validate import validate
from pqsweep.preflight import CONFIG_MODULE
from pqsweep.quantization.sparse import MAX_DENSITY, CsrConv2d, CsrLinear, sparsify
from pqsweep.train import Context, fit, seed_everything

ROOT = Path(__file__).resolve().parents[1]
CACHE = tempfile.mkdtemp(prefix="pqsweep-speed-")  # the prune stage cache compress uses, removed at exit
atexit.register(shutil.rmtree, CACHE, ignore_errors=True)
GPU = "GPU latency: not measured (no accelerator lent to this task)" if not torch.cuda.is_available() else \
    "GPU latency: not measured (this benchmark times the CPU deployment)"


# --- building models through pqsweep -------------------------------------------------------------------------------


def composed(*overrides: str):
    with initialize_config_module(config_module=CONFIG_MODULE):
        cfg = compose("config", overrides=[f"cache.dir={CACHE}", "train.epochs=0", "train.finetune_epochs=0",
                                           *overrides])
    validate(cfg)
    return cfg


class Case:
    """One model on one data set, built once; `deploy(overrides)` prunes and quantizes a fresh copy of it."""

    def __init__(self, *overrides: str):
        self.overrides = overrides
        cfg = composed(*overrides)
        self.splits, self.loaders = pipeline.load_data(cfg)
        seed_everything(cfg.train.seed)
        self.model = pipeline.build_model(cfg, self.splits).eval()
        self.example = next(iter(self.loaders["test"]))[0][:1]

    def deploy(self, *overrides: str) -> tuple[nn.Module, nn.Module]:
        """(deployed model, its float counterpart), as pipeline.run makes them after the baseline."""
        cfg = composed(*self.overrides, *overrides)
        seed_everything(cfg.train.seed)
        self.loaders["train"].generator.manual_seed(cfg.train.seed)
        ctx = Context(self.loaders, self.example, cfg.train, cfg.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notices, torch.export's chatter
            deployed, float_model = pipeline.compress(cfg, pipeline.stages_of(cfg), copy.deepcopy(self.model), ctx)
        return deployed.eval(), float_model.eval()


# --- timing --------------------------------------------------------------------------------------------------------


def interleaved(calls: dict[str, Callable[[], object]], rounds: int, number: int = 1, warmup: int = 2,
                grad: bool = False, budget_s: float = math.inf) -> dict[str, np.ndarray]:
    """Seconds per call of each callable: up to `rounds` samples of `number` calls each (fewer, but at least 5, once
    `budget_s` is spent), one sample of every callable per round in an order that rotates, so what else loads the
    machine falls on all of them alike."""
    names = list(calls)
    began = time.perf_counter()
    with torch.set_grad_enabled(grad):
        for name in names:
            for _ in range(warmup):
                calls[name]()
        times = {name: [] for name in names}
        for r in range(rounds):
            if r >= 5 and time.perf_counter() - began > budget_s:
                break
            for name in names[r % len(names):] + names[:r % len(names)]:
                start = time.perf_counter()
                for _ in range(number):
                    calls[name]()
                times[name].append((time.perf_counter() - start) / number)
    return {name: np.array(t) for name, t in times.items()}


def p(times: np.ndarray, q: float) -> float:
    return float(np.percentile(times, q)) * 1e3  # ms


def table(name: str, header: list[str], rows: list[list], notes: list[str]) -> None:
    """Print a Markdown table (docs/performance.md's form) and write it to results/speed_<name>.csv."""
    cells = [[c if isinstance(c, str) else f"{c:.3g}" if isinstance(c, float) else str(c) for c in row]
             for row in rows]
    print(f"\n### {name}\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in cells:
        print("| " + " | ".join(row) + " |")
    for note in notes:
        print(note)
    path = ROOT / "results" / f"speed_{name}.csv"
    path.parent.mkdir(exist_ok=True)
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *cells])
    print(f"(written to {path.relative_to(ROOT)})", flush=True)


# --- 3. the training loop ------------------------------------------------------------------------------------------


def training(quick: bool) -> None:
    """train.fit (one epoch per call, as a run calls it once per phase) against the plain loop, alternating."""

    def plain(model: nn.Module, loader: DataLoader) -> None:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()

    rows = []
    for label, overrides, n_images, rounds in [
        ("cnn, mnist5k (28 px)", ["model=cnn", "dataset=mnist5k"], None, 5 if quick else 10),
        ("resnet18_cifar, fake (32 px)", ["model=resnet18_cifar", "dataset=fake", "dataset.num_samples=320"], 192,
         2 if quick else 4),
    ]:
        cfg = composed(*overrides)
        splits, loaders = pipeline.load_data(cfg)
        if n_images is None:  # in memory already: pqsweep's own loader is one of the contenders
            x, y = splits.train.tensors
            ours = {"train.fit, pqsweep's loader (pipeline.load_data)": loaders["train"]}
        else:  # FakeData draws every image when asked: materialise them once, for both loops alike
            items = [splits.train[i] for i in range(n_images)]
            x, y = torch.stack([i[0] for i in items]), torch.tensor([i[1] for i in items])
            ours = {}
        shared = DataLoader(TensorDataset(x, y), batch_size=cfg.train.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        model = pipeline.build_model(cfg, splits)
        contenders = {"plain loop (TensorDataset, DataLoader)": lambda: plain(model, shared),
                      "train.fit, the same DataLoader": lambda: fit(model, shared, cfg.train, 1)}
        contenders |= {name: (lambda lo=lo: fit(model, lo, cfg.train, 1)) for name, lo in ours.items()}
        times = interleaved(contenders, rounds, warmup=1, grad=True)
        reference = times["plain loop (TensorDataset, DataLoader)"]
        for name, t in times.items():
            ratio = float(np.median(reference / t))  # per round: each pair ran back to back
            rows.append([label, name, f"{len(x) / np.median(t):.0f}", f"{ratio:.3f}",
                         "" if t is reference else "yes" if ratio >= 0.95 else "no"])
    table("training", ["model, data", "loop", "images/s (median)", "x plain (median of paired rounds)",
                       ">= 0.95x"], rows,
          [f"batch 64, Adam lr 1e-3, {torch.get_num_threads()} thread; one call = one epoch of the data shown "
           "(cnn: the 3,600 training images; resnet18_cifar: 192 images held in memory)"])


# --- 4. compressed models ------------------------------------------------------------------------------------------

CALIBRATE = ["quantization.calibration_batches=2"]
FX = ["quantization=static_int8", *CALIBRATE]
PT2E = [*FX, "quantization.backend=pt2e"]
L1 = ["pruning=l1_filter"]
# (case label, case overrides, [(variant, overrides, target speed-up or None)]); the first variant is the reference
COMPRESSED = [
    ("resnet18_cifar 32 px", ["model=resnet18_cifar", "dataset=fake", "dataset.num_samples=64",
                              "train.batch_size=16"], [
        ("fp32 dense", [], None),
        ("static_int8 fx", FX, None),
        ("static_int8 pt2e", PT2E, None),
        ("fp16", ["quantization=fp16"], None),
        ("bf16", ["quantization=bf16"], None),
        ("l1_filter 0.3", [*L1, "pruning.amount=0.3"], None),
        ("l1_filter 0.5", [*L1, "pruning.amount=0.5"], 2.5),
        ("l1_filter 0.7", [*L1, "pruning.amount=0.7"], None),
        ("global_magnitude 0.9 (dense kernels)", ["pruning=global_magnitude", "pruning.amount=0.9"], None),
        ("l1_filter 0.5 -> static_int8 fx", [*L1, "pruning.amount=0.5", *FX], 8.0),
        ("l1_filter 0.5 -> static_int8 pt2e", [*L1, "pruning.amount=0.5", *PT2E], 8.0),
    ]),
    ("resnet18 224 px", ["model=resnet18", "dataset=fake", "dataset.image_size=224", "dataset.num_samples=40",
                         "train.batch_size=8"], [
        ("fp32 dense", [], None),
        ("static_int8 fx", FX, 4.0),
        ("static_int8 pt2e", PT2E, 4.0),
    ]),
    ("mobilenet_v2 224 px", ["model=mobilenet_v2", "dataset=fake", "dataset.image_size=224",
                             "dataset.num_samples=40", "train.batch_size=8"], [
        ("fp32 dense", [], None),
        ("static_int8 fx", FX, None),
        ("static_int8 pt2e", PT2E, None),
    ]),
]


def compressed(quick: bool) -> None:
    rows = []
    for label, case_overrides, variants in COMPRESSED:
        case = Case(*case_overrides)
        built = {}
        for name, overrides, _ in variants:
            start = time.perf_counter()
            deployed, float_model = case.deploy(*overrides)
            built[name] = (deployed, measure.macs(float_model, case.example), len(measure.serialized(deployed)))
            print(f"  {label}: {name} built in {time.perf_counter() - start:.0f} s", flush=True)
        one, batch = case.example, torch.randn(64, *case.example.shape[1:])
        heavy, reference = "224" in label, variants[0][0]
        # A variant 5x slower than fp32 (fp16 here: this CPU has no fp16 conv kernel, torch falls back to a slow
        # one) is timed against the reference alone: between the others it would spend the time budget and leave
        # their caches cold; at batch 64 one call of it (about 30 s) next to one of the reference is its throughput.
        probe = interleaved({n: (lambda m=m: m(one)) for n, (m, _, _) in built.items()}, rounds=1, warmup=1)
        slow = [n for n in built if probe[n][0] > 5 * probe[reference][0]]
        calls = {n: (lambda m=m: m(one)) for n, (m, _, _) in built.items() if n not in slow}
        single = interleaved(calls, rounds=(10 if quick else 30) if heavy else (20 if quick else 60),
                             budget_s=10 if quick else 20)
        single = {n: (t, single[reference]) for n, t in single.items()}  # (its times, the reference's beside them)
        for name in slow:
            pair = interleaved({n: (lambda m=built[n][0]: m(one)) for n in (reference, name)}, rounds=5, warmup=0)
            single[name] = (pair[name], pair[reference])
        many = interleaved({n: (lambda m=m: m(batch)) for n, (m, _, _) in built.items() if n not in slow},
                           rounds=(1 if quick else 3) if heavy else (2 if quick else 4), warmup=1)
        many = {n: (t, many[reference]) for n, t in many.items()}
        for name in [] if quick else slow:
            pair = interleaved({n: (lambda m=built[n][0]: m(batch)) for n in (reference, name)}, rounds=1, warmup=0)
            many[name] = (pair[name], pair[reference])
        _, ref_macs, ref_size = built[reference]
        for name, _, target in variants:
            _, macs, size = built[name]
            times, beside = single[name]
            speedup = p(beside, 50) / p(times, 50)
            if name in many:
                times64, beside64 = many[name]
                throughput = [f"{64 / np.median(times64):.0f}", f"{np.median(beside64) / np.median(times64):.2f}"]
            else:
                throughput = [f"not measured (--quick: a call takes ~{64 * p(times, 50) / 1e3:.0f} s)", ""]
            rows.append([label, name + (" (timed against fp32 alone)" if name in slow else ""),
                         f"{ref_macs / macs:.2f}", f"{ref_size / size:.2f}", f"{p(times, 50):.2f}",
                         f"{p(times, 90):.2f}", f"{speedup:.2f}", *throughput,
                         "" if target is None else f">= {target:g}x: {'met' if speedup >= target else 'missed'}"])
        del case, built
    table("compressed", ["model", "variant", "MACs ratio", "size ratio", "p50 ms", "p90 ms", "p50 speed-up",
                         "batch-64 images/s", "batch-64 speed-up", "target (p50)"], rows,
          [f"batch 1 and batch 64 at {torch.get_num_threads()} thread, interleaved; ratios are dense fp32 / variant "
           "(MACs, torch.save bytes, time); MACs are the float network's (int8 and fp16 compute the same MACs)",
           GPU])


# --- 4b. sparse execution ------------------------------------------------------------------------------------------


def sparse_speed(quick: bool) -> None:
    """The same pruned weights run dense and as quantization=sparse deploys them (and, where the option keeps every
    layer dense, with the density rule off), on Linear-heavy parts of nets and on conv nets."""
    rows = []
    alexnet = Case("model=alexnet", "dataset=fake", "dataset.image_size=224", "dataset.num_samples=20")
    cnn = Case("model=cnn", "dataset=mnist5k")
    resnet = Case("model=resnet18_cifar", "dataset=fake", "dataset.num_samples=20")
    parts = [  # (label, case, part of the model timed, its input)
        ("AlexNet classifier, batch 1", alexnet, lambda m: m.classifier, torch.randn(1, 256 * 6 * 6)),
        ("AlexNet 224 px, batch 1", alexnet, lambda m: m, alexnet.example),
        ("cnn FC layers, batch 64", cnn, lambda m: m[8:], torch.randn(64, 256)),
        ("cnn 28 px, batch 1", cnn, lambda m: m, cnn.example),
        ("resnet18_cifar 32 px, batch 1", resnet, lambda m: m, resnet.example),
    ]
    for label, case, part, x in parts:
        calls, facts = {}, {}
        for amount in (0.5, 0.8, 0.9, 0.95):
            deployed, dense = case.deploy("pruning=layer_magnitude", f"pruning.amount={amount}",
                                          "quantization=sparse")
            kinds = [("dense kernels", dense), ("quantization=sparse", deployed)]
            if not _csr(part(deployed)):  # the option kept every layer dense: show what forcing CSR costs
                kinds.append(("CSR forced at any density", sparsify(copy.deepcopy(dense), case.example, 1.0)))
            for kind, model in kinds:
                module = part(model)
                with torch.no_grad():
                    out, ref = module(x), part(dense)(x)
                error = (out - ref).abs().max().item() / max(1.0, ref.abs().max().item())
                layers = sum(isinstance(m, (nn.Conv2d, nn.Linear, CsrConv2d, CsrLinear)) for m in module.modules())
                facts[amount, kind] = (f"{len(_csr(module))}/{layers}", len(measure.serialized(module)), error)
                calls[amount, kind] = lambda module=module: module(x)
        times = interleaved(calls, rounds=(15 if quick else 40) if "AlexNet 224" in label or "resnet" in label
                            else (40 if quick else 100), number=20 if "cnn" in label else 1)
        for (amount, kind), t in times.items():
            dense_t = times[amount, "dense kernels"]
            speedup = p(dense_t, 50) / p(t, 50)
            csr_layers, size, error = facts[amount, kind]
            verdict = "" if kind == "dense kernels" else f"no layer converted: all above {MAX_DENSITY:.0%} density" \
                if csr_layers.startswith("0/") else \
                f"{speedup:.2f}x faster" if speedup >= 1 else f"loses: {1 / speedup:.2f}x slower"
            rows.append([label, f"{amount:.0%}", kind, csr_layers, f"{size / 1e6:.3f}",
                         f"{facts[amount, 'dense kernels'][1] / size:.2f}", f"{p(t, 50):.4g}", f"{speedup:.2f}",
                         verdict + (" (target >= 1.5x)" if amount == 0.9 and kind == "quantization=sparse"
                                    and "AlexNet classifier" in label else ""), f"{error:.1e}"])
    table("sparse", ["part timed", "sparsity", "kernels", "CSR layers", "size MB", "size ratio", "p50 ms",
                     "speed-up", "verdict", "max |diff| / logit scale"], rows,
          [f"{torch.get_num_threads()} thread, interleaved; pruning=layer_magnitude (every layer at the sparsity "
           "shown), then quantization=sparse; speed-up and size ratio against the same weights on dense kernels "
           "(size: torch.save bytes of the part timed)", GPU])


def _csr(module: nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if isinstance(m, (CsrConv2d, CsrLinear))]


# --- 5. stability of the latency metric ----------------------------------------------------------------------------

SETTINGS = [(10, 50), (10, 100), (20, 200)]  # (warmup, repeats) candidates; MeasureConfig's default among them


def stability(quick: bool, n: int | None = None) -> None:
    """measure.latency as the pipeline calls it (MeasureConfig's threads), `n` times per setting, the settings
    interleaved; IQR / median of the p50s it reports."""
    from pqsweep.schema import MeasureConfig

    default = (MeasureConfig.warmup, MeasureConfig.repeats)
    settings = list(dict.fromkeys([default, *SETTINGS]))
    n = n or (5 if quick else 8)
    rows = []
    for label, overrides in [("cnn 28 px", ["model=cnn", "dataset=mnist5k"]),
                             ("resnet18_cifar 32 px", ["model=resnet18_cifar", "dataset=fake",
                                                       "dataset.num_samples=20"])]:
        case = Case(*overrides)
        p50s = {s: [] for s in settings}
        spent = {s: 0.0 for s in settings}
        for r in range(n):
            for s in settings[r % len(settings):] + settings[:r % len(settings)]:
                begin = time.perf_counter()
                result = measure.latency(case.model, case.example, MeasureConfig.threads, *s)
                spent[s] += time.perf_counter() - begin
                p50s[s].append(result["latency_ms_p50"])
        for s in settings:
            values = np.array(p50s[s])
            q1, median, q3 = np.percentile(values, [25, 50, 75])
            rows.append([label, f"{s[0]} / {s[1]}" + (" (default)" if s == default else ""), f"{median:.4g}",
                         f"{(q3 - q1) / median:.1%}", f"{(values.max() - values.min()) / median:.1%}",
                         f"{spent[s] / n:.2f}", "yes" if (q3 - q1) / median < 0.10 else "no"])
    table("stability", ["model", "warmup / repeats", "median p50 ms", "IQR / median", "range / median",
                        "s per measurement", "< 10 %"], rows,
          [f"{n} measurements of one untrained model per setting, settings interleaved; threads "
           f"{MeasureConfig.threads} (MeasureConfig.threads)"])


TABLES = {"training": training, "compressed": compressed, "sparse": sparse_speed, "stability": stability}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tables", nargs="*", metavar="table", help=f"any of {', '.join(TABLES)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (noisier ratios)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every table (default 1)")
    parser.add_argument("--measurements", type=int, help="stability: measurements per setting (default 8, quick 5)")
    args = parser.parse_args()
    unknown = sorted(set(args.tables) - set(TABLES))
    if unknown:
        parser.error(f"no table {', '.join(unknown)}; the tables are {', '.join(TABLES)}")
    register()
    torch.set_num_threads(args.threads)
    logging.getLogger("pqsweep").setLevel(logging.WARNING)  # the pipeline's INFO lines: the tables say it all
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime": we compile nothing
    for name in args.tables or TABLES:
        start = time.perf_counter()
        TABLES[name](args.quick, *([args.measurements] if name == "stability" and args.measurements else []))
        print(f"({name}: {time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
