"""`pqsweep-report`: a sweep read back from MLflow as a table, its Pareto front, hypervolume, budgets and plots.

    pqsweep-report mnist_cnn_sparsity_x_precision                      # table, front marked, plots, logged to MLflow
    pqsweep-report --list                                              # the sweeps in the store
    pqsweep-report NAME --objectives top1:max,size_gzip_mb:min --front # only the front over these objectives
    pqsweep-report NAME --budget "top1_delta>=-1"                      # the most compressed trial per method
    pqsweep-report A B                                                 # several sweeps' fronts, overlaid
    pqsweep-report --run <parent run id> --csv t.csv --markdown t.md --latex t.tex
    pqsweep-report NAME --compare train.distill.enabled                 # paired by seed: Δ, 95 % CI, real or not

Every report opens with what its trials ran on (pqsweep.reports.provenance); a paper's accuracy cells are marked †
where that is not the paper's data or scale (pqsweep.reports.paper); the plots go on one page, report.html
(pqsweep.reports.page). It only reads the store: a missing one is refused, never created. docs/reports.md shows one.

The front is computed from the trial runs' metrics, so it covers Hydra's basic sweeps as well as Optuna studies, and
partly finished or failed sweeps (a failed trial is shown, never put on the front). Where the sweep is an Optuna study,
its `best_trials` are compared with the front.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from pqsweep.console import plural
from pqsweep.reports import pareto, provenance, seeds, speedups
from pqsweep.reports.sweeps import Sweep, listing, load, variations
from pqsweep.reports.table import (DEFAULT_OBJECTIVES, Row, column, compressed_by, default_columns, hypervolumes,
                                   latex, markdown, order, point, render, shown, values, within_budget, write_csv)
from pqsweep.stores import sqlite_file
from pqsweep.tracking import resolve_uri


def seed_tables(args, rows: list[Row], swept: list[str], objectives) -> dict[str, tuple[str, list, list[list]]]:
    """Where the trials ran at several seeds: each point over its seeds, and each --compare; printed, and returned
    by file stem for the report's folder."""
    name = args.metric or objectives[0].name
    tables = {}
    if seeds.seeded(rows):
        metrics = list(dict.fromkeys([name, *(o.name for o in objectives)]))
        tables["seeds"] = (f"over seeds: mean ± 95 % CI (Student's t), n seeds", *seeds.summary(rows, swept, metrics))
    for i, text in enumerate(args.compare):
        factor, _, wanted = text.partition("=")
        try:
            header, body = seeds.compare(rows, swept, factor, name, wanted.split(",") if wanted else None)
        except ValueError as error:
            raise SystemExit(f"pqsweep-report: {error}") from None
        tables[f"compare-{i + 1}"] = (f"{factor}: {name} paired by seed, each option against "
                                      f"{(wanted or seeds.levels(rows, factor)[0]).split(',')[0]}; real where the 95 % "
                                      "CI excludes 0", header, body)
    for title, header, body in tables.values():
        print(title)
        print(render(header, body))
    return tables


def runtime_tables(sweeps: list[Sweep], rows: list[Row], objectives) -> dict[str, tuple[str, list, list[list]]]:
    """Where a sweep measured latency in runtimes besides eager (measure.runtimes): its front's speed-ups in each
    (pqsweep.reports.speedups); printed, and returned by file stem for the report's folder."""
    tables = {}
    for sweep in sweeps:
        front = [r.run for r in rows if r.sweep is sweep and r.front]
        base = sweep.baseline.data if sweep.baseline is not None else None
        if base is None or not speedups.measured([run.data.tags for run in front] + [base.tags]):
            continue
        header, body = speedups.table([(run.info.run_name, run.data.metrics, run.data.tags) for run in front],
                                      base.metrics, base.tags)
        title = (f"speed where it runs, front of {sweep.name}: speed-up = baseline p50 / point p50 in the same "
                 "runtime at batch 1;\n  MACs x = baseline MACs / point MACs (work, not time)")
        if any(o.name == "latency_ms_p50" for o in objectives):
            trials = [run.data.metrics for run in sweep.trials if run.info.status == "FINISHED"]
            stays = [f"{r} {'/'.join(map(str, speedups.kept(trials, objectives, r)))}"
                     for r in speedups.measured([run.data.tags for run in sweep.trials])]
            title += f"\n  front points still on the front with latency from: {', '.join(stays)}"
        tables[f"runtimes-{sweep.name}"] = (title, header, body)
    for title, header, body in tables.values():
        print(title)
        print(render(header, body))
    return tables


def paper_tables(path: str | None, sweeps: list[Sweep], rows: list[Row]) -> list:
    """The paper's tables beside ours, for a single sweep that keeps a paper's values (pqsweep.reports.paper)."""
    from pqsweep.reports import paper

    found = Path(path) if path else paper.beside(sweeps[0].name) if len(sweeps) == 1 else None
    if found is None:
        return []
    if not found.is_file():
        raise SystemExit(f"pqsweep-report: --paper {found}: no such file")
    return paper.tables(paper.load(found), [r.run for r in rows])


# -- Optuna's side ---------------------------------------------------------------------------------------------


def optuna_study(sweep: Sweep, storage: str | None):
    """The sweep's Optuna study, when its parent names one that can be opened here; else (None, why not)."""
    name = sweep.parent.data.tags.get("optuna_study")
    url = storage or sweep.parent.data.tags.get("optuna_storage")
    if not name or not url:
        return None, "not an Optuna study"
    if "***" in url:
        return None, f"its storage's password is masked ({url}): give --storage"
    import optuna

    from pqsweep.sweeper.study import open_storage

    try:
        return optuna.load_study(study_name=name, storage=open_storage(url, None)), ""
    except Exception as error:  # noqa: BLE001 - a report without Optuna's views is still a report
        return None, f"cannot open study {name} at {url}: {type(error).__name__}: {error}"


def agreement(study, rows: list[Row], sweep: Sweep) -> str:
    """Whether Optuna's best_trials are the report's front (same objectives in the same order)."""
    best = {t.number for t in study.best_trials if not t.user_attrs.get("pqsweep.discarded")}
    ours = {int(r.run.data.tags["optuna_trial_number"]) for r in rows
            if r.sweep is sweep and r.front and "optuna_trial_number" in r.run.data.tags}
    if best == ours:
        return f"Optuna's best_trials are this front ({plural(len(best), 'trial')})"
    return (f"Optuna's best_trials differ from this front: only Optuna {sorted(best - ours)}, "
            f"only here {sorted(ours - best)}")


# -- the command ----------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pqsweep-report", description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  pqsweep-report mnist_cnn_sparsity_x_precision                 (by study name; --list shows them)\n"
               "  pqsweep-report NAME --objectives top1:max,latency_ms_p50:min --budget 'top1_delta>=-1' --csv t.csv\n"
               "\n"
               "output: what the trials ran on, the table and front on stdout, and where a paper's values are kept\n"
               "beside the sweep file (sweeps/<name>.paper.csv) the paper's tables with ours beside (accuracy marked †\n"
               "where the data or scale is not the paper's); tables (CSV, markdown, LaTeX), a PNG per plot and one page\n"
               "holding every plot (report.html) under --out (default reports/<sweep>/) and, unless --no-log, in the\n"
               "sweep's MLflow parent run under report/. docs/reports.md says more.")
    parser.add_argument("sweeps", nargs="*", help="sweep names (study.name; a command-line grid is named after its "
                        "swept keys, e.g. pruning.amount+quantization); several overlay their fronts")
    parser.add_argument("--run", action="append", default=[], metavar="ID", help="a sweep by its parent run id")
    parser.add_argument("--list", action="store_true", help="list the sweeps in the store and stop")
    parser.add_argument("--uri", default="sqlite:///mlflow.db", help="MLflow tracking URI (default: %(default)s)")
    parser.add_argument("--experiment", help="only this MLflow experiment (default: all; each study keeps its own)")
    parser.add_argument("--objectives", help="the front's objectives, e.g. top1:max,size_gzip_mb:min,latency_ms_p50:min "
                        "(default: the sweep's own study.objectives)")
    parser.add_argument("--columns", help="the table's columns, comma-separated: metrics, params, status, front")
    parser.add_argument("--front", action="store_true", help="print only the front's trials")
    parser.add_argument("--budget", action="append", default=[], metavar="BOUNDS",
                        help='e.g. "top1_delta>=-1": per method, the most compressed trial within the bounds')
    parser.add_argument("--csv", help="write the table as CSV (numbers; units in the header)")
    parser.add_argument("--markdown", help="write the table as markdown")
    parser.add_argument("--latex", help="write the table as a LaTeX tabular")
    parser.add_argument("--out", help="folder for the plots and tables (default: reports/<sweep>)")
    parser.add_argument("--no-plots", action="store_true", help="no plots")
    parser.add_argument("--no-log", action="store_true", help="do not log the report to the sweep's parent run")
    parser.add_argument("--storage", help="the Optuna storage, where the parent run's tag masks its password")
    parser.add_argument("--paper", help="a paper's values as CSV (default: sweeps/<sweep>.paper.csv where it exists)")
    parser.add_argument("--compare", action="append", default=[], metavar="KEY[=A,B,..]",
                        help="a swept key's options against its first (or A), paired by seed: the difference, its "
                             "95 %% CI over seeds and whether it excludes 0 (trials run at several seeds)")
    parser.add_argument("--metric", help="the metric --compare and the seeds table compare (default: the first "
                        "objective)")
    args = parser.parse_args(argv)
    if not (args.sweeps or args.run or args.list):
        parser.error("name a sweep (or --run ID, or --list)")
    return args


def existing_store(uri: str) -> str:
    """The URI, absolute, where its SQLite file exists; a report only reads, so a missing one stops the command
    before MLflow's client would create an empty store in its place."""
    uri = resolve_uri(uri)
    path = sqlite_file(uri)
    if path is not None and not path.is_file():
        raise SystemExit(f"pqsweep-report: --uri={uri} is not allowed: must be an MLflow store that exists (there is "
                         f"no {path}; run the sweep first, or give --uri sqlite:///<the sweep's mlflow.db>)")
    return uri


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    mlflow.set_tracking_uri(existing_store(args.uri))
    client = MlflowClient()
    if args.list:
        print(render(["sweep", "parent run", "status", "finished", "other", "sampler", "started (UTC)"],
                     listing(client, args.experiment)))
        return
    sweeps = [load(client, args.experiment, name=n) for n in args.sweeps]
    sweeps += [load(client, args.experiment, run_id=r) for r in args.run]
    try:
        objectives = pareto.parse_objectives(args.objectives, sweeps[0].objectives or DEFAULT_OBJECTIVES)
        bounds = pareto.parse_bounds(",".join(args.budget)) if args.budget else []
    except ValueError as error:
        raise SystemExit(f"pqsweep-report: {error}") from None

    rows: list[Row] = []
    for sweep in sweeps:
        own = [values(run, objectives) for run in sweep.trials]
        rows += [Row(sweep, run, on) for run, on in zip(sweep.trials, pareto.pareto_front(own, objectives))]
    swept = list(dict.fromkeys(k for s in sweeps for k in s.swept))
    rows.sort(key=lambda r: order(r, swept))
    runs = [r.run for r in rows]
    keys = [k.strip() for k in args.columns.split(",") if k.strip()] if args.columns else default_columns(sweeps, objectives)
    columns = [column(k, runs) for k in keys]
    shown_rows = [r for r in rows if r.front] if args.front else rows
    header, body = [c.header for c in columns], [[shown(r, c) for c in columns] for r in shown_rows]

    ran = {sweep.name: provenance.ran_on(sweep.trials) for sweep in sweeps}
    for sweep in sweeps:
        print(f"sweep {sweep.name}: {plural(len(sweep.trials), 'trial')} under MLflow run {sweep.parent.info.run_id} "
              f"({sweep.parent.info.status})")
        print(f"  {ran[sweep.name].line()}")
        if sweep.others:
            print(f"  {plural(len(sweep.others), 'older sweep')} of this name: pqsweep-report --run "
                  f"{sweep.others[0]} ...")
        others = variations(client, args.experiment, sweep.name)
        if others:
            print(f"  {plural(len(others), 'other study', 'other studies')} of this sweep file, with other settings: "
                  f"{', '.join(others)} (pqsweep-report <name>)")
        if sweep.baseline is not None:
            b = sweep.baseline.data.metrics
            print(f"baseline (fp32, dense): top1 {b['top1']:.2f}%, size {b['size_mb']:.4f} MB, "
                  f"gzip {b['size_gzip_mb']:.4f} MB, p50 {b['latency_ms_p50']:.3f} ms")
    print(render(header, body))
    named = ", ".join(f"{o.name} ({o.direction[:3]})" for o in objectives)
    volumes, reference = hypervolumes(sweeps, rows, objectives)
    fronts = []
    for sweep in sweeps:
        size = sum(r.front for r in rows if r.sweep is sweep)
        volume = f"hypervolume {volumes[sweep.name]:.6g}" if sweep.name in volumes else "no hypervolume"
        chance = provenance.front_at_chance([r for r in rows if r.sweep is sweep and r.front], objectives,
                                            ran[sweep.name])
        if chance:
            volume = f"no hypervolume: {chance}"
        fronts.append(f"front of {sweep.name} over {named}: {plural(size, 'trial')}, {volume}")
        print(fronts[-1])
    print(f"  {reference}")
    for sweep in sweeps:
        if (line := early_stopping(sweep)) is not None:
            print(line)

    if bounds:
        by, chosen = within_budget(rows, bounds, objectives)
        print(f"budget {', '.join(f'{b.metric}{b.op}{b.limit:g}' for b in bounds)}: per method the most compressed "
              f"trial (by {by}) within it, '-' where none is; the front above stands beside it")
        cells = [c for c in columns if c.kind not in ("front", "info", "sweep")]
        print(render(["method"] + [c.header for c in cells] + ["run"],
                     [[m] + ([shown(r, c) for c in cells] + [r.run.info.run_id] if r else ["-"] * (len(cells) + 1))
                      for m, r in chosen.items()]))

    over_seeds = seed_tables(args, rows, swept, objectives)
    over_seeds |= runtime_tables(sweeps, rows, objectives)  # written beside the seed tables
    papers = paper_tables(args.paper, sweeps, rows)
    for title, paper_header, paper_body, notes in papers:
        print(f"{title}: ours (mean ± sd over seeds where several), the paper's value, ours - paper")
        print(render(paper_header, paper_body))
        for note in notes:
            print(f"  {note}")

    studies = []
    for sweep in sweeps:
        study, why = optuna_study(sweep, args.storage)
        if study is not None and [o.name for o in objectives] == sweep.objectives:
            print(agreement(study, rows, sweep))
        studies.append((sweep, study, why))

    out = Path(args.out) if args.out else Path("reports") / "+".join(s.name for s in sweeps)
    summary = [line for sweep in sweeps for line in (f"sweep {sweep.name}: {len(sweep.trials)} trials",
                                                     ran[sweep.name].line())] + fronts
    summary += [f"{title.rsplit(', ', 1)[1]}: {note}" for title, *_, notes in papers for note in notes]
    written = write_outputs(args, out, columns, rows, shown_rows, header, body, sweeps, objectives, studies, summary)
    for title, paper_header, paper_body, notes in papers:
        stem = out / ("paper-" + "".join(ch if ch.isalnum() else "_" for ch in title.rsplit(", ", 1)[1]).lower())
        with open(f"{stem}.csv", "w", newline="") as f:
            csv.writer(f).writerows([paper_header, *paper_body])
        Path(f"{stem}.md").write_text(f"{title}\n\n" + markdown(paper_header, paper_body)
                                      + "".join(f"\n{note}\n" for note in notes))
        Path(f"{stem}.tex").write_text(latex(paper_header, paper_body))
        written += [Path(f"{stem}.{ext}") for ext in ("csv", "md", "tex")]
    for stem, (title, seed_header, seed_body) in over_seeds.items():
        (out / f"{stem}.md").write_text(f"{title}\n\n" + markdown(seed_header, seed_body))
        written.append(out / f"{stem}.md")
    if written:
        print(f"wrote {plural(len(written), 'file')} under {out}")
    if not args.no_log and len(sweeps) == 1:
        log_back(client, sweeps[0], rows, out, volumes.get(sweeps[0].name), reference, objectives)
    failed = sum(r.run.info.status == "FAILED" for r in rows)
    if failed:
        print(f"{plural(failed, 'trial')} failed: see {'its' if failed == 1 else 'their'} `error` tag in MLflow",
              file=sys.stderr)


def write_outputs(args, out: Path, columns, rows, shown_rows, header, body, sweeps, objectives, studies,
                  summary: list[str]) -> list[Path]:
    """The tables (under --out, and where --csv / --markdown / --latex say), and the plots: a PNG each, and all of
    them on one page, report.html, under the report's header lines (`summary`)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path, write in ((args.csv, lambda p: write_csv(p, columns, shown_rows)),
                        (args.markdown, lambda p: Path(p).write_text(markdown(header, body))),
                        (args.latex, lambda p: Path(p).write_text(latex(header, body)))):
        if path:
            write(Path(path))
    write_csv(out / "table.csv", columns, shown_rows)
    (out / "table.md").write_text(markdown(header, body))
    (out / "table.tex").write_text(latex(header, body))
    written += [out / "table.csv", out / "table.md", out / "table.tex"]
    if args.no_plots:
        return written
    from pqsweep.reports import page, plots

    series = [plots.Series(s.name, [point(r.run, s) for r in rows if r.sweep is s],
                           [r.front for r in rows if r.sweep is s],
                           s.baseline.data.metrics if s.baseline else None) for s in sweeps]
    accuracy = next((o.name for o in objectives if o.direction == "maximize"), "top1")
    drawn = plots.plot_standard(series, out, accuracy=accuracy, size=compressed_by(objectives).name)
    for sweep, study, why in studies:
        if study is not None:
            drawn += plots.optuna_views(study, f"optuna-{sweep.name}-" if len(sweeps) > 1 else "optuna_")
    written += [p.png for p in drawn if p.png]
    if drawn:
        written.append(page.write(out / "report.html", "+".join(s.name for s in sweeps), summary, drawn))
    return written


def log_back(client: MlflowClient, sweep: Sweep, rows: list[Row], out: Path, volume, reference, objectives) -> None:
    """The report on the sweep's parent run (artifacts under report/), and `pareto` tags on its trials, so the
    MLflow UI's filter `tags.pareto = "true"` shows the front."""
    parent = sweep.parent.info.run_id
    client.log_artifacts(parent, str(out), "report")
    tags = {"pareto_objectives": ",".join(f"{o.name}:{o.direction[:3]}" for o in objectives),
            "pareto_front_size": str(sum(r.front for r in rows)), "pareto_reference": reference[:5000]}
    if volume is not None:
        tags["pareto_hypervolume"] = f"{volume:.6g}"
    for key, value in tags.items():
        client.set_tag(parent, key, value)
    for row in rows:
        client.set_tag(row.run.info.run_id, "pareto", str(row.front).lower())
    print(f"logged the report to MLflow run {parent} (artifacts report/, trial tags pareto=true|false)")


def early_stopping(sweep: Sweep) -> str | None:
    """What study.early_stop did in a sweep: the trials it stopped and the fine-tune epochs they did not run."""
    stopped = [r for r in sweep.trials if r.data.tags.get("early_stopped") == "true"]
    if not stopped:
        return None
    saved = sum(int(r.data.tags.get("early_stop_epochs_saved", 0)) for r in stopped)
    ran = sum(int(r.data.tags.get("finetune_epochs_run", 0)) for r in sweep.trials)
    return (f"early stopping in {sweep.name}: {len(stopped)} of {len(sweep.trials)} trials stopped (KILLED, "
            f"early_stop_reason tag), {saved:.0f} of {ran + saved:.0f} fine-tune epochs saved "
            f"({saved / (ran + saved):.0%}); benchmarks/early_stop.py runs stopped trials to the end to see whether "
            f"any would have reached the front")


if __name__ == "__main__":
    main()
