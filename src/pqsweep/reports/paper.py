"""A paper's table beside its reproduction: the published values as data, matched to a sweep's trials.

Each sweep that reproduces a paper keeps the paper's numbers beside it, `sweeps/<study name>.paper.csv`, one row per
published cell, copied exactly as printed (`78,170`, `-`):

    source, table, row, column, value, unit,  match,                                     metric,       factor,  data, note
    004_...txt, Table I, 0 / 16, Size (bytes), "17,626", bytes, pruning.amount=0 quantization.bits=16, size_gzip_mb, 1000000, mnist,

`match` names the params of the trials that reproduce the cell (several trials: several seeds), `metric` what is
compared with it (a logged metric, or one of the papers' own formulas below), and `factor` turns ours into the
paper's unit (MB -> bytes). `data` is the data set the paper measured the cell on, as pqsweep names it (the param
`dataset`), and `note` why the row is matched as it is, where that is not plain (printed under the table). The
report prints the paper's rows and columns with ours (mean, and the spread over seeds), the paper's value and the
difference. An accuracy cell (DATA_DEPENDENT) whose trials ran on other data or at cpu scale is marked NOT_COMPARABLE,
with a line saying why; size, params, sparsity and MACs depend on the network only and stay compared.

Each table is titled by its paper's title, first author and year (papers.csv beside this module, so a wheel has it),
with the text file's name beside.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Run


@dataclass(frozen=True)
class Cell:
    source: str
    table: str
    row: str
    column: str
    value: str  # as printed
    unit: str
    match: dict[str, str]
    metric: str
    factor: float
    data: str = ""  # the data set the paper measured it on ("" : not said)
    note: str = ""  # why the cell is matched to its trials as it is, where the match alone does not say

    @property
    def published(self) -> float | None:
        """The printed value as a number in the cell's unit ("78,170" -> 78170, "671K" -> 671, "1.6 \\times" ->
        1.6); None for "-" and other non-numbers."""
        try:
            return float(number_text(self.value))
        except ValueError:
            return None


# What papers print after a number, stripped before it is read (the cell's `unit` says what it meant): a multiplier
# sign ("2×", a LaTeX "2 \\times" left in the text) and a thousands / millions suffix ("671K", "2.2M").
MARKS = ("\\times", "×", "%")
SUFFIXES = ("K", "M")


def number_text(value: str) -> str:
    """The printed value without grouping commas, marks and a K / M suffix: "2.2M" -> "2.2" (the unit says M)."""
    text = value.replace(",", "")
    for mark in MARKS:
        text = text.replace(mark, "")
    text = text.strip()
    return text[:-1].strip() if text[-1:] in SUFFIXES and text[:-1].strip() else text


def load(path: Path) -> list[Cell]:
    with open(path, newline="", encoding="utf-8") as f:
        return [Cell(r["source"], r["table"], r["row"], r["column"], r["value"], r["unit"],
                     dict(item.split("=", 1) for item in r["match"].split()), r["metric"], float(r["factor"] or 1),
                     r.get("data") or "", r.get("note") or "")
                for r in csv.DictReader(f)]


PAPERS = Path(__file__).with_name("papers.csv")


def citations() -> dict[str, str]:
    """Text file name -> 'First author et al. (year), "Title" [file]', from papers.csv."""
    with open(PAPERS, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    cited = {}
    for r in rows:
        authors = [a.strip() for a in r["authors"].split(";")]
        surname = authors[0].split()[-1] + (" et al." if len(authors) > 2 else f" and {authors[1].split()[-1]}"
                                             if len(authors) == 2 else "")
        cited[r["file"]] = f'{surname} ({r["year"]}), "{r["title"]}" [{r["file"]}]'
    return cited


def cited(source: str) -> str:
    """A paper's citation; a source papers.csv does not know (a hand-made --paper file) keeps its own name."""
    return citations().get(source, source)


def beside(sweep_name: str) -> Path | None:
    """The paper values kept beside the sweep file of that name (in the checkout or the installed package). A sweep
    file's study at scale=paper is named <file>_paper, and shares the file's values."""
    from importlib.resources import files

    for name in dict.fromkeys([sweep_name, sweep_name.removesuffix("_paper")]):
        path = Path(str(files("pqsweep.conf") / "sweep" / f"{name}.paper.csv"))
        if path.is_file():
            return path
    return None


# -- the papers' own formulas, from a trial's metrics and params ------------------------------------------------


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def q_004(metrics: dict[str, float], params: dict[str, str]) -> float | None:
    """Seed 004's model quality, its Eq. 5: Q = (s + 8 / p) / 2 * tanh(Δacc) * sigmoid(r), with s the sparsity, p the
    weight precision in bits, Δacc the accuracy change in percentage points and r the reduction factor of the
    compressed file (the paper's sizes are gzip'd). Its baseline row is undefined ("-") in the paper."""
    try:
        s, bits = metrics["sparsity"], float(params["quantization.bits"])
        delta, r = metrics["top1_delta"], metrics["reduction_factor_gzip"]
    except (KeyError, ValueError):
        return None
    return (s + 8.0 / bits) / 2.0 * math.tanh(delta) * sigmoid(r)


def score_002_formula(ps: float, pu: float, qw: float, qa: float, w: float, f: float) -> float:
    """Seed 002's score, as its "Motivation" slide prints it (lower is better):
    [1 - (ps + pu)] (qw / 32) w / 5.6e6 + (1 - ps) (max(qw, qa) / 32) f / 2.8e8, with ps the structured and pu the
    unstructured fraction (of the original weights: 0.25 for 0.5 then 0.5), qw / qa the weight / activation bits,
    w and f the baseline's parameters and operations.

    With the w and f the paper prints (11,173,962 and 556,651,520) its baseline scores 3.98339, not the 3.98778 it
    prints. Every score it prints (baseline, fp16, its best six, post-quantization) follows to within 5e-7, its
    rounding, from f = 557,880,320 instead: conv + linear MACs (555,422,720, as pqsweep counts) + 4 ops per BN
    output (614,400 of them), thop >= 0.1's count, where the printed 556,651,520 counts 2 per BN output (thop
    0.0.x's). tests/test_paper_002.py holds both."""
    return (1 - (ps + pu)) * qw / 32 * w / 5.6e6 + (1 - ps) * max(qw, qa) / 32 * f / 2.8e8


def score_002(metrics: dict[str, float], params: dict[str, str]) -> float | None:
    """Seed 002's score of a trial from what it measured: its non-zero weights for [1 - (ps + pu)] w and its MACs
    for (1 - ps) f (what the paper's nominal fractions of its baseline stand for), at its quantization's bits
    (`bits_a` where the method logs one, else `bits` for both). pqsweep's MACs count no BN: a dense fp32
    ResNet-18 scores 3.97900 where the paper's own count gives 3.98778 (-0.2 %)."""
    try:
        w, f = metrics["params_nonzero"], metrics["macs"]
        qw = float(params.get("quantization.bits_w", params["quantization.bits"]))
        qa = float(params.get("quantization.bits_a", params["quantization.bits"]))
    except (KeyError, ValueError):
        return None
    return score_002_formula(0.0, 0.0, qw, qa, w, f)


def param_compression(metrics: dict[str, float], params: dict[str, str]) -> float | None:
    """Seed 003's "compression rate": total parameters over the non-zero ones left by pruning (57M -> 5M: 10x)."""
    total, left = metrics.get("params_total"), metrics.get("params_nonzero")
    return None if total is None or not left else total / left


DERIVED: dict[str, Callable[[dict[str, float], dict[str, str]], float | None]] = {"q_004": q_004,
                                                                                   "score_002": score_002,
                                                                                   "param_compression": param_compression}

# What a paper prints that no pqsweep trial measures, and why: such a cell keeps the paper's value, ours shows "-".
UNMEASURED: dict[str, str] = {
    "latency_ms_p50_gpu": "pqsweep times batch-1 latency on the CPU only (pqsweep.measure.latency)",
    "top1_before_finetune": "pqsweep logs a pruned model's accuracy after its fine-tuning, not before",
    "setting": "the paper prints the row's own settings as a column (seed 002's pruning fractions): its match says them",
}


# What a cell's value depends on the data and the training for: marked NOT_COMPARABLE where ours ran on other data or
# at another scale than the paper. Sizes, params, sparsity, MACs and the score of 002 (params and MACs) are the
# network's, and latency the machine's: those stay compared.
DATA_DEPENDENT = {"top1", "top5", "top1_delta", "top5_delta", "q_004", "top1_before_finetune"}
NOT_COMPARABLE = "†"


def differs(cell: Cell, runs: list[Run]) -> str:
    """Why ours and the paper's value of an accuracy cell are not comparable ("" where they are, or cannot be told):
    a trial that reproduces it ran on other data than the paper's, or at a scale other than `paper`."""
    if cell.metric not in DATA_DEPENDENT or not cell.data:
        return ""
    mine = [r for r in runs if r.info.status == "FINISHED" and matches(r, cell.match)]
    data = sorted({r.data.params["dataset"] for r in mine if "dataset" in r.data.params} - {cell.data})
    scale = sorted({r.data.params["scale"] for r in mine if "scale" in r.data.params} - {"paper"})
    if not data and not scale:
        return ""
    parts = ([f"data {'/'.join(data)}, not the paper's {cell.data}"] if data else []) + \
            ([f"scale {'/'.join(scale)}, not paper"] if scale else [])
    return f"ours ran on {' and '.join(parts)}"


def matches(run: Run, wanted: dict[str, str]) -> bool:
    """Every wanted param equal, as numbers where both are numbers ("0" matches a logged "0.0")."""
    for key, value in wanted.items():
        logged = run.data.params.get(key)
        if logged == value:
            continue
        try:
            if logged is None or float(logged) != float(value):
                return False
        except ValueError:
            return False
    return True


def ours(cell: Cell, runs: list[Run]) -> list[float]:
    """The cell's value in each finished trial that reproduces it, in the paper's unit."""
    found = []
    for run in runs:
        if run.info.status != "FINISHED" or not matches(run, cell.match):
            continue
        metrics = run.data.metrics
        value = DERIVED[cell.metric](metrics, run.data.params) if cell.metric in DERIVED else metrics.get(cell.metric)
        if value is not None and not math.isnan(value):
            found.append(value * cell.factor)
    return found


def digits(cell: Cell) -> int:
    """As many decimals as the paper printed."""
    text = number_text(cell.value)
    return len(text.split(".", 1)[1]) if "." in text else 0


def shown(cell: Cell, values: list[float], d: int) -> tuple[str, str]:
    """(ours: the mean, ± the standard deviation over seeds, to `d` decimals; the difference ours - paper)."""
    if not values:
        return "-", "-"
    mean = statistics.fmean(values)
    fmt = f",.{d}f" if cell.unit == "bytes" else f".{d}f"  # bytes grouped as the paper prints them: 78,170
    text = format(mean, fmt)
    if len(values) > 1:
        text += f" ± {format(statistics.stdev(values), fmt)} (n={len(values)})"
    paper = cell.published
    return text, "-" if paper is None else f"{mean - paper:+,.{d}f}"


def tables(cells: list[Cell], runs: list[Run]) -> list[tuple[str, list[str], list[list[str]], list[str]]]:
    """(title, header, body, notes) per paper table: its rows and columns, each column as ours / paper / Δ; an
    accuracy cell whose trials ran on other data or at cpu scale marked NOT_COMPARABLE (ours and Δ), with the notes
    saying why, and each row's own note (the cells' `note`)."""
    out = []
    for key in dict.fromkeys((c.source, c.table) for c in cells):
        own = [c for c in cells if (c.source, c.table) == key]
        columns = list(dict.fromkeys(c.column for c in own))
        # as precise as the paper printed the column (a "-" cell, such as a baseline's own Δ, has no digits)
        precision = {col: max(digits(c) for c in own if c.column == col) for col in columns}
        header = ["row"] + [f"{c} {part}" for c in columns for part in ("ours", "paper", "Δ")]
        body, why, notes = [], {}, {}
        for row in dict.fromkeys(c.row for c in own):
            line = [row]
            for column in columns:
                cell = next((c for c in own if c.row == row and c.column == column), None)
                if cell is None:
                    line += ["", "", ""]
                    continue
                mine, delta = shown(cell, ours(cell, runs), precision[column])
                reason = differs(cell, runs) if mine != "-" else ""
                if reason:
                    why.setdefault(reason, []).append(column)
                    mine = f"{mine} {NOT_COMPARABLE}"
                    delta = delta if delta == "-" else f"{delta} {NOT_COMPARABLE}"  # no Δ where the paper has none
                if cell.note:
                    notes.setdefault(row, cell.note)
                line += [mine, cell.value, delta]
            body.append(line)
        lines = [f"{NOT_COMPARABLE} not comparable with the paper ({', '.join(dict.fromkeys(cols))}): {reason}; "
                 "accuracy depends on the data and the training, so only the network's own columns (size, params, "
                 "sparsity, MACs) compare" for reason, cols in why.items()]
        lines += [f"{row}: {note}" for row, note in notes.items()]
        out.append((f"{cited(key[0])}, {key[1]}", header, body, lines))
    return out
