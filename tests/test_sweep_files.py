"""Every sweep file in sweeps/, at both scales: it composes and validates, its sweeper's params parse into a grid or
search space over keys the config has, and the paper values kept beside it name params a trial logs, values its
grid holds, and metrics a trial logs (or the papers' own formulas). A new sweep file is checked without a new test."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from nets import compose_cfg, write_data_sets
from omegaconf import OmegaConf

from pqsweep.metrics import METRICS
from pqsweep.schema import GROUPS, SCALES
from pqsweep.validate import validate
from pqsweep.reports import paper
from pqsweep.records import params as flat_params

SWEEPS = Path(__file__).parents[1] / "sweeps"
FILES = sorted(path.stem for path in SWEEPS.glob("*.yaml"))


def composed(name: str, scale: str, *overrides: str):
    """(the config a trial composes, the sweeper's params as the file writes them)."""
    overrides = (f"sweep={name}", f"scale={scale}", *overrides)
    return compose_cfg(*overrides), dict(compose_cfg(*overrides, hydra=True).hydra.sweeper.params or {})


def choices(params: dict) -> dict[str, list[str]]:
    """{swept key: its values as the sweeper gives them to a trial}; a range or interval has none listed."""
    parser = OverridesParser.create()
    out = {}
    for key, value in params.items():
        override = parser.parse_override(f"{key}={value}")
        out[key] = list(override.sweep_string_iterator()) if override.is_discrete_sweep() else []
    return out


def same(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return math.isclose(float(a), float(b))
    except ValueError:
        return False


def test_there_are_sweep_files_for_the_papers():
    assert "mnist_cnn_sparsity_x_precision" in FILES and "alexnet_cifar10_sparsity_x_precision" in FILES


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(write_data_sets(tmp_path_factory.mktemp("data")))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("name", FILES)
def test_the_sweep_file_composes_validates_and_its_grid_parses(name, scale, data_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("PQSWEEP_DATA", data_dir)  # paper scale's sets, as tiny files in their real formats
    cfg, params = composed(name, scale)
    if cfg.model.pretrained:  # paper scale's ImageNet weights: the check asks only that the checkpoint is there
        monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # torch.hub.get_dir(): $TORCH_HOME/hub
        (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
        (tmp_path / "hub" / "checkpoints" / cfg.model.weights).touch()
    validate(cfg)
    assert cfg.scale == scale
    assert params, "a sweep file says what it sweeps"
    # a paper's sweep names its study after itself, with _paper at paper scale, so both find its .paper.csv
    if paper.beside(name) is not None:
        assert cfg.study.name == name + ("_paper" if scale == "paper" else "")
    for key, values in choices(params).items():
        group, _, rest = key.partition(".")
        if not rest:  # a group: each option composes with the rest of the file
            assert group in (*GROUPS, "experiment"), key
            for value in values:
                validate(composed(name, scale, f"{key}={value}")[0])
        else:
            assert OmegaConf.select(cfg, key, throw_on_missing=False) is not None or group in params, key


@pytest.mark.parametrize("name", [n for n in FILES if paper.beside(n) is not None])
def test_the_paper_values_name_logged_params_grid_values_and_logged_metrics(name):
    cells = paper.load(paper.beside(name))
    assert cells, "a .paper.csv holds the paper's cells"
    cfg, params = composed(name, "cpu")
    grid = choices(params)
    logged = flat_params(cfg)
    for cell in cells:
        where = f"{cell.table} / {cell.row} / {cell.column}"
        assert cell.metric in METRICS or cell.metric in paper.DERIVED or cell.metric in paper.UNMEASURED or \
            cell.published is None, f"{where}: {cell.metric} is neither a metric a trial logs nor a formula"
        assert cell.value.strip(), f"{where}: a cell as printed, '-' where the paper prints none"
        for key, value in cell.match.items():
            swept = next((k for k in grid if k == key or key.startswith(k + ".")), None)
            assert key in logged or swept is not None, f"{where}: {key} is no param a trial logs"
            if key in grid and grid[key] and cell.published is not None:  # a "N/A" row need not run
                assert any(same(value, v) for v in grid[key]), f"{where}: {key}={value} is not in the grid"
