"""The input contract travels with the model: ensembles and exports carry the training images' type."""

from __future__ import annotations

import dataclasses

import pytest

from medxfer.ensemble import _check_members, _meta
from medxfer.errors import MedxferError
from medxfer.export import contract
from medxfer.runs import Run


def test_an_ensemble_records_its_members_input_type_and_refuses_a_mix(tiny_run):
    run = Run.load(tiny_run)
    assert run.model.input_dtype == "uint8"
    assert _meta([run, run], [1.0, 1.0], run.image_size).input_dtype == "uint8"
    other = dataclasses.replace(run, model=run.model.replace(input_dtype="uint16"))
    with pytest.raises(MedxferError, match="input type"):
        _check_members([run, other])


def test_the_exported_contract_holds_what_preprocessing_needs(tiny_run):
    meta = Run.load(tiny_run).model
    c = contract(meta)
    for key in ("input_dtype", "tta", "spatial_dims", "inflate", "image_size", "read"):
        assert key in c, key
    assert c["input_dtype"] == "uint8" and c["tta"] == meta.tta and c["spatial_dims"] == 2
