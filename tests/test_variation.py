"""A variation of a sweep file is named after what differs: readable, stable across resumes, never shared."""

from __future__ import annotations

import json
import re

from hydra.core.override_parser.overrides_parser import OverridesParser

from pqsweep.sweeper.variation import differences, suffix

FILE = {"dataset._target_": json.dumps("pqsweep.data.mnist5k"), "train.epochs": "20", "study.seeds": "1"}
TRY = {"dataset._target_": json.dumps("pqsweep.data.digits"), "train.epochs": "1", "study.seeds": "1"}


def test_the_name_says_what_differs_and_hashes_its_values():
    differing = differences(TRY, FILE)
    assert differing == {"dataset._target_": json.dumps("pqsweep.data.digits"), "train.epochs": "1"}
    name = suffix(differing, {"dataset": "digits"}, [])
    assert re.fullmatch(r"@dataset-digits\+epochs-1\.[0-9a-f]{6}", name)


def test_the_same_command_gets_the_same_name_and_other_values_another():
    first = suffix(differences(TRY, FILE), {"dataset": "digits"}, [])
    assert suffix(differences(dict(TRY), dict(FILE)), {"dataset": "digits"}, []) == first  # a resume finds it
    other = dict(TRY, **{"train.epochs": "2"})
    assert suffix(differences(other, FILE), {"dataset": "digits"}, []) != first
    # values cut from the readable part still tell two variations apart by the hash
    long_a, long_b = ({"train.lr_schedule": json.dumps(f"cosine_with_a_very_long_name_{i}")} for i in (1, 2))
    assert suffix(long_a, {}, []) != suffix(long_b, {}, [])


def test_a_key_the_file_does_not_sweep_is_named_and_a_long_name_is_cut():
    assert suffix({}, {}, ["train.lr"]).startswith("@lr-swept.")
    many = {f"train.field_{i}": str(i) for i in range(12)}
    readable = suffix(many, {}, []).split(".")[0]
    assert len(readable) <= 46 and readable.endswith("+more")


def test_a_variation_name_is_typed_back_as_study_name_without_quotes():
    name = "mnist_cnn_sparsity_x_precision" + suffix({"train.note": json.dumps("x y,z=1"), "train.lr": "0.1"},
                                                     {"dataset": "cpu/mnist"}, ["quantization.bits_w"])
    assert OverridesParser.create().parse_override(f"study.name={name}").value() == name
