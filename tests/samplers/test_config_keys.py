"""One source for the config keys, in the spirit of diffusers' "Copied from" checks.

Every registered scheduler spells its config out in its own ``__init__`` (``@register_to_config`` records what the
signature lists); ``diffalign.samplers.config.SharedConfig`` is the source these copies must agree with: each shared
key present, with the same type and default (or the scheduler's own default in ``OWN_DEFAULTS``, set by
measurement). Enumerated keys carry ``Literal`` types, and each scheduler accepts exactly what its ``Literal`` says
for the keys it validates.
"""

import dataclasses
import inspect
import math
import types
import typing
import warnings

import pytest

from diffalign.samplers import SCHEDULERS
from diffalign.samplers.config import OWN_DEFAULTS, SharedConfig

SHARED = {f.name: f for f in dataclasses.fields(SharedConfig)}
SHARED_TYPES = typing.get_type_hints(SharedConfig)
ENUMERATED = (
    "beta_schedule",
    "prediction_type",
    "variance_type",
    "timestep_spacing",
    "final_sigmas_type",
    "solver_type",
    "solver_mode",
    "algorithm_type",
    "time_shift_type",
    "timestep_type",
    "interpolation_type",
)
VALIDATED = ("beta_schedule", "prediction_type", "timestep_spacing", "final_sigmas_type", "solver_type", "solver_mode")
"""Keys whose value every scheduler that uses it checks when it is built (the others are accepted and ignored)."""


def _same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _literal_values(annotation) -> tuple:
    """The values of ``Literal[...]`` or ``Literal[...] | None``; () for any other annotation."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = typing.get_args(annotation) if union else (annotation,)
    literals = [a for a in args if typing.get_origin(a) is typing.Literal]
    return typing.get_args(literals[0]) if len(literals) == 1 else ()


def _init(cls):
    return inspect.signature(cls.__init__).parameters, typing.get_type_hints(cls.__init__)


def _build(cls, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(**config)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_init_takes_every_shared_key_with_its_type_and_default(name):
    params, hints = _init(SCHEDULERS[name])
    missing = sorted(set(SHARED) - set(params))
    assert not missing, f"{name} lacks shared config keys {missing}; copy them from SharedConfig"
    own = OWN_DEFAULTS.get(name, {})
    for key, field in SHARED.items():
        expected = own.get(key, field.default)
        assert _same(params[key].default, expected), (key, params[key].default, expected)
        assert hints[key] == SHARED_TYPES[key], (key, hints[key], SHARED_TYPES[key])


def test_own_defaults_name_registered_schedulers_and_shared_keys_with_allowed_values():
    for name, keys in OWN_DEFAULTS.items():
        assert name in SCHEDULERS, name
        for key, value in keys.items():
            assert key in SHARED, key
            values = _literal_values(SHARED_TYPES[key])
            assert not values or value in values, (name, key, value)
            assert not _same(value, SHARED[key].default), f"{name}.{key}: same as the shared default, remove it"


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_enumerated_keys_are_literals_that_hold_their_default(name):
    params, hints = _init(SCHEDULERS[name])
    for key in ENUMERATED:
        if key not in params:
            continue
        values = _literal_values(hints[key])
        assert values, f"{name}.{key} is annotated {hints[key]}; use a Literal from diffalign.samplers.config"
        default = params[key].default
        assert default is None or default in values, (key, default, values)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_validated_keys_accept_exactly_their_literal_values(name):
    cls = SCHEDULERS[name]
    params, hints = _init(cls)
    for key in VALIDATED:
        if key not in params or params[key].default is None:  # a foreign key this scheduler ignores
            continue
        for value in _literal_values(hints[key]):
            _build(cls, **{key: value})  # raises if the scheduler refuses a value its Literal offers
        with pytest.raises(ValueError, match=key):
            _build(cls, **{key: "not_a_" + key})


def test_shared_keys_are_all_recorded_in_the_config():
    """``@register_to_config`` records every key of the signature, so ``save_pretrained`` writes them all."""
    for cls in SCHEDULERS.values():
        assert set(SHARED) <= set(_build(cls).config), cls.__name__
