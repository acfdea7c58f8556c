"""The tests' one fixture layer: configs with every path at tmp_path, the digits splits, the trained small nets."""

from __future__ import annotations

import copy

import pytest
import torch

from nets import NETS, TINY, compose_cfg, train_briefly


@pytest.fixture(scope="session", autouse=True)
def in_session_tmp_path(tmp_path_factory):
    """Session and module fixtures run in a temporary directory too: the configs' relative paths (cache.dir,
    tracking.uri, outputs) never land in the checkout, whoever forgets to set them."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("session"))
        yield


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Every test runs in its own tmp_path: a relative path a test forgets to set lands there, not in the checkout.
    mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID; it is unset again after each test, so no later test's
    subprocess inherits an experiment of another test's store."""
    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "PQSWEEP_PARENT_RUN_ID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def make_cfg(tmp_path):
    """make_cfg(*overrides, tiny=True, config_name="config") -> the composed config, shrunk by TINY (unless
    tiny=False), with the MLflow store and the baseline cache under tmp_path."""

    def make(*overrides: str, tiny: bool = True, config_name: str = "config"):
        paths = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"cache.dir={tmp_path}/cache"]
        return compose_cfg(*(TINY if tiny else []), *paths, *overrides, config_name=config_name)

    return make


@pytest.fixture(autouse=True)
def keep_quantized_engine():
    """The int8 quantizers set torch's global quantized engine; leave it as the next test expects it."""
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine


@pytest.fixture
def recorded_latency(monkeypatch):
    """measure.latency replaced by a recorder of its arguments (the timing itself is measure.py's to test)."""
    calls = []

    def latency(model, example, threads, warmup, repeats):
        calls.append((model, example, threads, warmup, repeats))
        return {"latency_ms_p50": 1.0, "latency_ms_p90": 2.0}

    monkeypatch.setattr("pqsweep.measure.latency", latency)
    return calls


@pytest.fixture(scope="session")
def digits():
    """The embedded digits splits (8x8, 10 classes) as the pipeline loads them."""
    from pqsweep import pipeline

    return pipeline.load_data(compose_cfg("dataset=digits"))[0]


@pytest.fixture(scope="session")
def _trained_nets(digits):
    """Each small net trained once per session: small_cnn 10 epochs, wide_convnet 2 (94.7 and 96.9 % test top-1)."""
    return {name: train_briefly(build(), digits.train, epochs) for name, build, epochs in
            [("small_cnn", NETS["small_cnn"], 10), ("wide_convnet", NETS["wide_convnet"], 2)]}


@pytest.fixture(scope="module")
def trained_cnn(_trained_nets):
    """small_cnn trained on digits; each test module gets its own copy, so no module sees another's edits."""
    return copy.deepcopy(_trained_nets["small_cnn"])


@pytest.fixture(scope="module")
def trained_wide(_trained_nets):
    """wide_convnet trained on digits (logits with real structure, a file dominated by its weights); one copy per
    module."""
    return copy.deepcopy(_trained_nets["wide_convnet"])
