"""Each command's own --help: what it does, two examples, where its output goes, and (for the Hydra apps) the groups
a user composes, without pqsweep's internal schema/* groups."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.object_type import ObjectType

from pqsweep import helptext
from pqsweep.preflight import CONFIG_MODULE

BIN = Path(sys.executable).parent


def shown(command: str, tmp_path: Path) -> str:
    done = subprocess.run([str(BIN / command), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("command", ["pqsweep", "pqsweep-sensitivity", "pqsweep-report"])
def test_each_command_says_what_it_does_two_examples_and_where_output_goes(command, tmp_path):
    out = shown(command, tmp_path)
    head = out.split("\n", 1)[0]
    assert head.startswith(f"{command}: ") or head.startswith(f"usage: {command}")
    examples = out.lower().split("examples:", 1)[1].split("output:", 1)[0]
    assert sum(1 for line in examples.splitlines() if line.strip().startswith(command.split("-")[0])) >= 2
    assert "output:" in out.lower() and "mlflow" in out.lower()
    assert "schema/" not in out and "Powered by Hydra" not in out
    assert list(tmp_path.iterdir()) == []  # help writes nothing


def test_the_two_hydra_apps_help_differently_and_list_the_groups_hydra_composes(tmp_path):
    main, scan = shown("pqsweep", tmp_path), shown("pqsweep-sensitivity", tmp_path)
    assert main != scan and "sensitivity.tolerance" in scan and "sensitivity.tolerance" not in main
    listed = helptext.groups()
    assert {"model", "dataset", "pruning", "quantization", "train", "sweep", "scale", "dataset/cpu"} <= set(listed)
    assert "  pruning: " + ", ".join(listed["pruning"]) in main
    # the same options Hydra composes from, group by group
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE):
        loader = GlobalHydra.instance().config_loader()
        for group, options in listed.items():
            assert sorted(loader.get_group_options(group, ObjectType.CONFIG)) == options, group
    GlobalHydra.instance().clear()
