"""Each command's own `--help`: what it does, two examples, where its output goes, and the config groups a user
composes. Hydra's help lists pqsweep's internal schema/* groups beside them and reads the same for both Hydra apps;
this one is printed before Hydra starts, so it imports no torch either."""

from __future__ import annotations

from importlib.resources import files

from pqsweep.preflight import CONFIG_MODULE

COMPOSE = """\
Compose a run from these groups (group=option) and override any key (key=value); `{prog} --cfg job <overrides>`
prints the composed config. hydra/launcher=joblib runs trials in parallel; `{prog} --hydra-help` lists Hydra's own
groups and flags.
"""

TEXTS = {
    "pqsweep": """\
pqsweep: one compression run, data -> model -> baseline (cached) -> prune -> fine-tune -> quantize -> measure, logged
as an MLflow run. With -m, a sweep: a stored Optuna study (a grid or a search) whose trials log under one parent run,
resumed by the same command.

Examples:
  pqsweep dataset=mnist5k pruning=global_magnitude pruning.amount=0.9 quantization=static_int8
  pqsweep -m sweep=mnist_cnn_sparsity_x_precision      (a study from sweeps/; scale=paper: the paper's size)

Output: the MLflow run(s) in tracking.uri (default sqlite:///mlflow.db in this folder; `mlflow ui` shows them), the
study in optuna.journal beside it, Hydra's log under outputs/ (a sweep: multirun/<study>/), cached baselines and
stages in .pqsweep_cache/. `pqsweep-report <study>` prints a sweep's table, front and plots.
""",
    "pqsweep-sensitivity": """\
pqsweep-sensitivity: prune each prunable layer alone at each of sensitivity.amounts (and every layer at once), with
no fine-tuning, and record top-1 on sensitivity.split; per layer, the largest amount within sensitivity.tolerance pp
of the baseline is written as the YAML that pruning.layer_amounts takes.

Examples:
  pqsweep-sensitivity dataset=mnist5k sensitivity.tolerance=0.5 sensitivity.output=cnn_amounts.yaml
  pqsweep dataset=mnist5k pruning=layer_magnitude pruning.layer_amounts=cnn_amounts.yaml   (then use the amounts)

Output: sensitivity.output (default layer_amounts.yaml, relative to this folder), and one MLflow run (tag
stage=sensitivity) in tracking.uri with the curves (sensitivity.csv, sensitivity.png) and the amounts. The baseline
comes from the same cache as pqsweep's.
""",
}


def groups() -> dict[str, list[str]]:
    """{group: its options}, from the packaged config folders (nested groups as dataset/cpu); no schema/*, and
    no hydra/*, whose options come from Hydra's plugins too."""
    found: dict[str, list[str]] = {}

    def walk(node, prefix: str) -> None:
        for child in sorted(node.iterdir(), key=lambda c: c.name):
            if child.is_dir() and not child.name.startswith(("_", ".")) and prefix + child.name != "hydra":
                options = sorted(c.name.removesuffix(".yaml") for c in child.iterdir() if c.name.endswith(".yaml"))
                if options:
                    found[prefix + child.name] = options
                walk(child, f"{prefix}{child.name}/")

    walk(files(CONFIG_MODULE), "")
    return found


def text(prog: str) -> str:
    listing = "\n".join(f"  {group}: {', '.join(options)}" for group, options in groups().items())
    return f"{TEXTS[prog]}\n{COMPOSE.format(prog=prog)}\n{listing}\n"


def asked(argv: list[str]) -> bool:
    """`--help` or `-h` among the arguments (Hydra's own --hydra-help is left to Hydra)."""
    return any(arg in ("--help", "-h") for arg in argv)
