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


@pytest.mark.parametrize(("family", "parameter", "option", "operation"), [
    ("energy", "langevin_steps", "langevin_steps", "sample"),
    ("latent_variable", "importance_samples", "importance_samples", "log_likelihood"),
    ("flow", "dequant_draws", "draws", "log_likelihood"),
])
def test_a_manifest_default_beyond_any_request_fails_the_program(family, parameter, option, operation) -> None:
    """A model's own default for a step or sample count obeys the bound a request does, whatever the server's
    limits: a default of 1e9 (a damaged manifest) is refused when the program is made, naming the parameter,
    instead of loading and running its warm-up and every default request for days."""
    from genserve.server.programs.base import MOST_STEPS

    make = program_class(family)
    spec = LEVELS
    top = 4096 if option == "draws" else MOST_STEPS
    assert make(spec, {parameter: top}).check_options(operation, {option: top}) == {option: top}
    for bad in (1e9, top + 1, float("inf")):
        with pytest.raises(ValueError, match=f"manifest parameter '{parameter}'.*re-export"):
            make(spec, {parameter: bad})
    with pytest.raises(InvalidOption, match=f"outside 1..{top}"):  # a server cap above the bound does not lift it
        make(spec, {}).check_options(operation, {option: top + 1}, caps={option: 10 * top})
