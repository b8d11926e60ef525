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
    for bad in (1e9, top + 1, float("inf"), 1e300):  # 1e300: a whole number, once a TypeError in numpy
        with pytest.raises(ValueError, match=f"manifest parameter '{parameter}'.*re-export"):
            make(spec, {parameter: bad})
    with pytest.raises(InvalidOption, match=f"outside 1..{top}"):  # a server cap above the bound does not lift it
        make(spec, {}).check_options(operation, {option: top + 1}, caps={option: 10 * top})


def test_sizes_and_loop_counts_from_the_manifest_are_checked_when_the_program_is_made() -> None:
    """A damaged manifest's latent_dim (1e9: gigabytes of noise a row) or iterative-inverse pass count (1e9:
    a decode that never ends) fails the program, naming the parameter, before any warm-up runs it."""
    from genserve.server.programs.base import GraphSignature

    decoder = {"decoder": GraphSignature({"z": (-1, 16)}, ("x",))}
    vae = program_class("latent_variable")
    assert vae(LEVELS, {"latent_dim": 16.0}, decoder).param("latent_dim") == 16
    for bad, message in ((1e9, "whole number in 1..16"), (17.0, "whole number in 1..16"), (0.0, "1..16"),
                         (2.5, "whole number"), (float("nan"), "whole number")):
        with pytest.raises(ValueError, match=f"'latent_dim'.*{message}.*re-export"):
            vae(LEVELS, {"latent_dim": bad}, decoder)
    two = {**decoder, "prior": GraphSignature({"z": (-1, 8)}, ("p",))}
    with pytest.raises(ValueError, match="'latent_dim' is 12, but the graphs take z of width 8 or 16"):
        vae(LEVELS, {"latent_dim": 12.0}, two)
    with pytest.raises(ValueError, match="'latent_dim'.*1..1048576"):  # no graphs known: a bound still holds
        program_class("implicit")(ROWS, {"latent_dim": 1e9})

    energy = program_class("energy")
    for key in ("langevin_step_size", "langevin_noise"):  # 1e300 overflowed every chain to infinity
        energy(ROWS, {key: 1e3})
        with pytest.raises(ValueError, match=f"'{key}'.*outside.*1000.*re-export"):
            energy(ROWS, {key: 1e300})

    flow = program_class("flow")
    passes = {"forward": GraphSignature({"x": (-1, 2)}, ("z", "log_prob")),
              "inverse_pass_0": GraphSignature({"y": (-1, 2), "x": (-1, 2)}, ("x_next",)),
              "inverse_pass_1": GraphSignature({"y": (-1, 2), "x": (-1, 2)}, ("x_next",))}
    good = {"inverse_stages": 2.0, "inverse_passes_0": 30.0, "inverse_passes_1": 30.0}
    flow(ROWS, good, passes)
    for key, bad in (("inverse_passes_1", 1e9), ("inverse_passes_0", 0.0), ("inverse_stages", 3.0),
                     ("inverse_stages", float("inf"))):
        with pytest.raises(ValueError, match=f"'{key}'.*re-export"):
            flow(ROWS, {**good, key: bad}, passes)
    with pytest.raises(ValueError, match="'inverse_stages' is 1, but the manifest lists 2"):
        flow(ROWS, {**good, "inverse_stages": 1.0}, passes)
