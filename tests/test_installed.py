"""The installed app: the wheel built from this checkout, installed into a fresh virtualenv outside it, composes its
packaged configs (pkg://pqsweep.conf) and runs, with nothing read from the checkout.

How the fresh venv gets torch & co. without seeing the checkout. Installing the dependencies from scratch would take
minutes (a CUDA torch is gigabytes), so the new venv borrows the ones this interpreter already has: a `.pth` file in
its site-packages lists this interpreter's site-packages directory. Python adds a path listed in a `.pth` file to
sys.path, but it processes `.pth` files only in site directories proper, never inside a directory a `.pth` added.
The editable install of pqsweep *is* such a `.pth` file (`_editable_impl_pqsweep.pth`, holding `<checkout>/src`) in
the borrowed directory, so the checkout's src/ never reaches the new venv's sys.path. The wheel's own copy sits in
the new venv's site-packages, which comes first on sys.path. `hydra_plugins` is a namespace package, merged from
every sys.path entry that has one (the borrowed one holds Hydra's Optuna and joblib plugins); since <checkout>/src
is not on sys.path, the only `pqsweep_sweeper` in it is the wheel's. The tests below check all of this rather than
trusting it: where the modules, the configs and the plugin come from, and that no path under <checkout>/src is
ever touched (`python -v` names the file of every module it loads).

The wheel is built by pip (`pip wheel --no-deps`), which fetches hatchling into an isolated build environment from
the package index, unless hatchling is installed here; installing it reads nothing but the wheel (`--no-index`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml
from nets import experiment_ids

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CHECKOUT_SRC = str(REPO / "src")


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 600,
        check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-4000:]}"
    return done


def has_hatchling() -> bool:
    try:
        import hatchling  # noqa: F401
    except ImportError:
        return False
    return True


class Installed:
    def __init__(self, root: Path):
        self.root = root
        self.wheel: Path
        self.venv = root / "venv"
        self.site: Path  # the new venv's site-packages
        self.elsewhere = root / "elsewhere"  # the working directory of every command: outside the checkout
        self.elsewhere.mkdir()
        # No PYTHONPATH (it would put directories of its own in front), no user site-packages.
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        self.env["PYTHONNOUSERSITE"] = "1"

    def python(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return run([str(self.venv / "bin" / "python"), *args], self.elsewhere, self.env, **kwargs)

    def pqsweep(self, *args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
        return run([str(self.venv / "bin" / "pqsweep"), *args], self.elsewhere, {**self.env, **(env or {})}, **kwargs)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    root = tmp_path_factory.mktemp("installed")
    assert not root.resolve().is_relative_to(REPO)
    app = Installed(root)

    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q",
             "-w", str(root / "dist"), str(REPO)]
    if has_hatchling():
        build.insert(4, "--no-build-isolation")  # no index needed
    run(build, root)
    (app.wheel,) = (root / "dist").glob("pqsweep-*.whl")

    run([sys.executable, "-m", "venv", "--without-pip", str(app.venv)], root)
    app.site = Path(app.python("-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    borrowed = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (app.site / "_borrowed_dependencies.pth").write_text("".join(f"{path}\n" for path in borrowed))
    run([sys.executable, "-m", "pip", "--python", str(app.venv / "bin" / "python"), "install", "--no-deps",
         "--no-index", "--disable-pip-version-check", "-q", str(app.wheel)], root)
    return app


def test_the_wheel_carries_the_configs_and_the_plugin(installed):
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    assert "pqsweep/conf/config.yaml" in names and "pqsweep/conf/__init__.py" in names
    # a paper sweep's scale, its data sets at both scales, and the paper's values beside it
    assert {"pqsweep/conf/scale/cpu.yaml", "pqsweep/conf/dataset/cpu/cifar10.yaml",
            "pqsweep/conf/dataset/paper/cifar10.yaml"} <= names
    assert any(name.endswith("alexnet_cifar10_sparsity_x_precision.paper.csv") for name in names)
    assert "hydra_plugins/pqsweep_sweeper/__init__.py" in names
    assert "hydra_plugins/__init__.py" not in names  # a namespace package: it must not shadow Hydra's plugins
    sweeps = {Path(n).name for n in names if re.fullmatch(r"pqsweep/conf/sweep/[^/]+\.yaml", n)}
    assert sweeps and sweeps == {p.name for p in (REPO / "sweeps").glob("*.yaml")}
    papers = {Path(n).name for n in names if re.fullmatch(r"pqsweep/conf/sweep/[^/]+\.paper\.csv", n)}
    assert papers and papers == {p.name for p in (REPO / "sweeps").glob("*.paper.csv")}  # the report reads them
    assert "pqsweep/reports/papers.csv" in names  # the papers' titles, authors and years, which the report cites
    # every config of the checkout, the linked sweeps/ included, and nothing else
    in_checkout = {str(Path(folder, name).relative_to(REPO / "conf"))
                   for folder, _, files in os.walk(REPO / "conf", followlinks=True)
                   for name in files if name.endswith(".yaml")}
    in_wheel = {n.removeprefix("pqsweep/conf/") for n in names if n.startswith("pqsweep/conf/") and n.endswith(".yaml")}
    assert in_wheel == in_checkout


WHERE = """
import importlib.metadata, importlib.resources, sys
import hydra_plugins, hydra_plugins.pqsweep_sweeper, pqsweep, pqsweep.cli
print(pqsweep.__file__)
print(hydra_plugins.pqsweep_sweeper.__file__)
print(importlib.resources.files("pqsweep.conf").joinpath("config.yaml"))
print(importlib.metadata.distribution("pqsweep").locate_file("pqsweep/__init__.py"))
print(*hydra_plugins.__path__, sep="|")
print(*sys.path, sep="|")
"""


def test_the_installed_package_is_the_wheel_not_the_checkout(installed):
    lines = installed.python("-c", WHERE).stdout.splitlines()
    package, plugin, config, distribution = map(Path, lines[:4])
    namespace, path = lines[4].split("|"), lines[5].split("|")
    site = installed.site
    assert package == site / "pqsweep" / "__init__.py"
    assert plugin == site / "hydra_plugins" / "pqsweep_sweeper" / "__init__.py"
    assert config == site / "pqsweep" / "conf" / "config.yaml" and config.is_file()
    assert distribution == package  # importlib.metadata finds the wheel's distribution first
    assert not any(p.startswith(CHECKOUT_SRC) for p in namespace + path), (namespace, path)
    assert str(site / "hydra_plugins") in namespace  # and Hydra's own plugins still merge in from the borrowed dir
    assert any((Path(p) / "hydra_optuna_sweeper").is_dir() for p in namespace)


def _modules_loaded_from(stderr: str, module_file: str) -> set[str]:
    """Files named `module_file` (e.g. pqsweep/cli.py) that `python -v` reports loading."""
    return set(re.findall(rf"(/\S*/{re.escape(module_file)})\b", stderr))


def test_the_installed_app_composes_its_packaged_config(installed):
    done = installed.pqsweep("--cfg", "job", env={"PYTHONVERBOSE": "1"})
    cfg = yaml.safe_load(done.stdout)
    assert cfg["model"] == {"_target_": "pqsweep.models.small_cnn", "name": "cnn", "pretrained": False,
                            "min_image_size": 4, "weights": None, "batchnorm": False, "graph": True}  # its facts
    assert cfg["dataset"]["_target_"] == "pqsweep.data.digits"
    assert cfg["pruning"]["name"] == "none" and cfg["quantization"]["name"] == "none"
    assert CHECKOUT_SRC not in done.stderr
    for module_file in ["pqsweep/cli.py", "pqsweep/preflight.py", "pqsweep/validate.py",
                        "hydra_plugins/pqsweep_sweeper/__init__.py"]:
        assert _modules_loaded_from(done.stderr, module_file) == {str(installed.site / module_file)}, module_file


def test_the_installed_app_composes_a_packaged_sweep_file(installed):
    # resolved: a paper sweep writes its scale-dependent values as ${paper_cpu:..} (scale=cpu by default)
    job = yaml.safe_load(installed.pqsweep("--cfg", "job", "--resolve", "sweep=mnist_cnn_sparsity_x_precision").stdout)
    assert job["study"] == {"name": "mnist_cnn_sparsity_x_precision", "objectives": ["top1", "size_gzip_mb"],
                            "storage": None, "constraints": [], "seeds": 1,  # default store: optuna.journal
                            "early_stop": {"enabled": False, "min_epoch": 2, "margin": 1.0, "min_trials": 4},
                            "allocations": []}
    # the sweeper sets them for each trial it launches
    assert job["launch"] == {"trial": None, "run_id": None, "study": None, "storage": None}
    assert job["dataset"]["name"] == "mnist5k" and job["pruning"]["name"] == "global_magnitude"  # its experiment
    sweeper = yaml.safe_load(installed.pqsweep("--cfg", "hydra", "sweep=mnist_cnn_sparsity_x_precision").stdout)
    sweeper = sweeper["hydra"]["sweeper"]
    assert sweeper["_target_"] == "pqsweep.sweeper.OptunaSweeper"
    assert sweeper["sampler"]["_target_"] == "optuna.samplers.GridSampler"
    assert sweeper["params"] == {"pruning.amount": "choice(0, 0.5, 0.75, 0.9, 0.95, 0.99)",
                                 "quantization": "choice(none, fp16, static_int8)"}


def test_the_installed_app_runs_and_logs_a_finished_run(installed):
    out = installed.root / "run"
    out.mkdir()  # the store's folder: a store in one that does not exist is refused
    done = installed.pqsweep(
        "train.epochs=0", "measure.warmup=1", "measure.repeats=3", f"tracking.uri=sqlite:///{out}/mlflow.db",
        f"cache.dir={out}/cache", f"hydra.run.dir={out}/outputs", env={"PYTHONVERBOSE": "1"})
    # the run's own stages came from the wheel too, not only the CLI
    assert CHECKOUT_SRC not in done.stderr
    for module_file in ["pqsweep/pipeline.py", "pqsweep/tracking.py", "pqsweep/data.py", "pqsweep/models.py"]:
        assert _modules_loaded_from(done.stderr, module_file) == {str(installed.site / module_file)}, module_file

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    experiments = experiment_ids(client)
    (trial,) = client.search_runs(experiments, "tags.stage = 'trial'")
    (baseline,) = client.search_runs(experiments, "tags.stage = 'baseline'")
    assert trial.info.status == "FINISHED" and baseline.info.status == "FINISHED"
    assert trial.data.params["model"] == "cnn" and trial.data.params["dataset"] == "digits"
    assert trial.data.params["train.epochs"] == "0"
    assert trial.data.metrics["params_total"] == 18346  # small_cnn on 8x8 digits, 10 classes
    assert 0 <= trial.data.metrics["top1"] <= 100 and trial.data.metrics["sparsity"] == 0
    assert (out / "outputs" / ".hydra" / "config.yaml").is_file()
    assert list(installed.elsewhere.iterdir()) == []  # every path pointed into tmp: nothing in the working dir
