"""Each program declares its options once; ``check_options`` refuses what does not apply, by name, with a fix."""

from __future__ import annotations

import pytest

from genserve.core.families import FAMILIES
from genserve.core.spec import DataSpec
from genserve.server.programs import PROGRAMS, program_class
from genserve.server.programs.base import InvalidOption

LEVELS = DataSpec("levels", (4,), "discrete", levels=3)
ROWS = DataSpec("rows", (2,), "continuous")


def test_one_table_of_families_for_programs_and_contracts() -> None:
    from genserve.export.contract import FAMILIES as CONTRACTS

    assert set(PROGRAMS) == set(FAMILIES) == set(CONTRACTS)
    for name, info in FAMILIES.items():
        assert program_class(name).operations == info.operations == CONTRACTS[name].operations


@pytest.mark.parametrize(("family", "spec", "operation", "given", "field", "message"), [
    ("linear_gaussian", LEVELS, "log_likelihood", {"importance_samples": 5}, "importance_samples",
     "does not apply to log_likelihood"),
    ("flow", ROWS, "log_likelihood", {"draws": 4}, "draws", "takes no options"),  # exact: nothing to draw
    ("autoregressive", LEVELS, "log_likelihood", {"langevin_steps": 3}, "langevin_steps", "does not apply"),
    ("latent_variable", LEVELS, "log_likelihood", {"importance_samples": 0}, "importance_samples", "outside 1.."),
    ("latent_variable", LEVELS, "log_likelihood", {"importance_samples": 2.5}, "importance_samples", "whole number"),
    ("latent_variable", LEVELS, "encode", {"sample": "yes"}, "sample", "not true or false"),
    ("implicit", ROWS, "decode", {"sample": True}, "sample", "deterministic map with nothing to draw from"),
    ("energy", ROWS, "sample", {"langevin_step_size": 0.0}, "langevin_step_size", "outside"),
    ("energy", ROWS, "sample", {"langevin_steps": float("nan")}, "langevin_steps", "not a whole number"),
])
def test_an_option_that_does_not_apply_or_is_out_of_range_is_named(family, spec, operation, given, field,
                                                                   message) -> None:
    program = program_class(family)(spec, {})
    with pytest.raises(InvalidOption, match=message) as err:
        program.check_options(operation, given, model="m")
    assert err.value.field == field


def test_valid_options_are_typed_and_capped_by_the_server() -> None:
    vae = program_class("latent_variable")(LEVELS, {})
    assert vae.check_options("log_likelihood", {"importance_samples": 7.0}) == {"importance_samples": 7}
    with pytest.raises(InvalidOption, match="outside 1..5"):
        vae.check_options("log_likelihood", {"importance_samples": 7}, caps={"importance_samples": 5})
    assert program_class("flow")(LEVELS, {}).check_options("log_likelihood", {"draws": 3}) == {"draws": 3}
    assert vae.sampled == ("encode", "decode") and program_class("linear_gaussian")(ROWS, {}).sampled == ("decode",)
