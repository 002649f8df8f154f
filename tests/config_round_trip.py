"""The one check of `get_config` / `from_config`, shared by the tests of every configurable class."""

import copy

import keras


def assert_config_round_trip(instance, **expected):
    """Rebuilds `instance` from its config, directly and as a .keras file stores it; returns the rebuilt one.

    `expected` are constructor arguments as the test passed them (the independent reference): each
    must appear in the config with that value, and survive as the rebuilt object's config. The rebuilt
    object has the same type and the same complete config, also after `keras.saving.serialize_keras_object`
    and `deserialize_keras_object` (registered name, nested layers, tuples).
    """
    config = instance.get_config()
    for name, value in expected.items():
        assert name in config, f"{type(instance).__name__}.get_config() lacks {name!r}"
        assert config[name] == value, f"{name}: config has {config[name]!r}, the constructor got {value!r}"
    # A copy: Keras' functional deserialisation pops keys from the nested configs it is given.
    restored = type(instance).from_config(copy.deepcopy(config))
    assert type(restored) is type(instance)
    assert restored.get_config() == config
    deserialized = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(instance))
    assert type(deserialized) is type(instance)
    assert deserialized.get_config() == config
    return restored
