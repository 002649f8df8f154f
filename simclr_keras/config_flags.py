"""Frozen config dataclasses and their absl flags, written once: each field says how it is a flag.

A config's field is declared with one of `string_field`, `integer_field`, `float_field`, `bool_field`,
`enum_field` or `list_field`, which keep the help text, the choices and the old spellings as field
metadata. `define_flags` turns the fields into absl flags (same names, same defaults), and
`config_from_flags` reads them back into a config: the command line's flags and the library's config
cannot drift apart. Nothing here imports TensorFlow.
"""

import dataclasses
import re
import typing

from absl import flags

_KINDS = ("string", "integer", "float", "bool", "enum", "list")

# The flags `define_flags` defines belong to the module calling it (absl's key flags: --helpshort lists them).
flags.disclaim_key_flags()


def _field(kind, default, help_text, choices=None, aliases=(), required=False):
    metadata = {"kind": kind, "help": help_text, "choices": choices, "aliases": tuple(aliases), "required": required}
    return dataclasses.field(default=default, metadata=metadata)


def string_field(default, help_text, **options):
    return _field("string", default, help_text, **options)


def integer_field(default, help_text, **options):
    return _field("integer", default, help_text, **options)


def float_field(default, help_text, **options):
    return _field("float", None if default is None else float(default), help_text, **options)


def bool_field(default, help_text, **options):
    return _field("bool", default, help_text, **options)


def enum_field(default, choices, help_text, **options):
    return _field("enum", default, help_text, choices=tuple(choices), **options)


def list_field(default, help_text, **options):
    """A comma-separated list of strings on the command line; a tuple in the config (it is frozen)."""
    return _field("list", tuple(default), help_text, **options)


def _inferred_kind(annotation):
    """The kind of a field declared without the functions above, from its type (`int | None` -> integer)."""
    for python_type, kind in ((bool, "bool"), (int, "integer"), (float, "float"), (str, "string")):
        if annotation is python_type or python_type in getattr(annotation, "__args__", ()):
            return kind
    raise TypeError(f"a config field must be bool, int, float or str (or one of them | None), got {annotation}.")


def flag_fields(config_class):
    """The fields of `config_class`, in declaration order, each with complete flag metadata.

    Fields declared with the functions above carry it; for others (a plain `dataclasses.field` with
    metadata {"help": ...}) the kind comes from the type annotation.
    """
    hints = typing.get_type_hints(config_class)
    fields = []
    for field in dataclasses.fields(config_class):
        if field.metadata.get("kind") not in _KINDS:
            inferred = dataclasses.field(default=field.default, metadata={
                "kind": _inferred_kind(hints[field.name]), "help": field.metadata.get("help", ""),
                "choices": None, "aliases": (), "required": False,
            })  # fmt: skip
            inferred.name = field.name
            field = inferred
        fields.append(field)
    return fields


def define_flags(config_class, flag_values=flags.FLAGS, enforce_required=True):
    """Defines one absl flag per field of `config_class` in `flag_values` (and its old spellings as aliases).

    With enforce_required, parsing fails without the fields marked `required` (absl's own message).
    """
    for field in flag_fields(config_class):
        kind, help_text = field.metadata["kind"], field.metadata["help"]
        common = dict(flag_values=flag_values)
        if kind == "enum":
            flags.DEFINE_enum(field.name, field.default, list(field.metadata["choices"]), help_text, **common)
        elif kind == "list":
            flags.DEFINE_list(field.name, list(field.default), help_text, **common)
        else:
            define = {"string": flags.DEFINE_string, "integer": flags.DEFINE_integer,
                      "float": flags.DEFINE_float, "bool": flags.DEFINE_bool}[kind]  # fmt: skip
            define(field.name, field.default, help_text, **common)
        for alias in field.metadata["aliases"]:
            flags.DEFINE_alias(alias, field.name, flag_values=flag_values)
        if field.metadata["required"] and enforce_required:
            flags.mark_flag_as_required(field.name, flag_values=flag_values)


def config_from_flags(config_class, flag_values=flags.FLAGS):
    """A `config_class` holding the parsed values of its flags."""
    values = {}
    for field in flag_fields(config_class):
        value = flag_values[field.name].value
        values[field.name] = tuple(value) if field.metadata["kind"] == "list" else value
    return config_class(**values)


def read_flagfile(config_class, path):
    """A `config_class` from a flag file (`--name=value` lines, e.g. a run's flags.txt); unset flags keep
    their defaults. Raises ValueError naming the file when it does not parse."""
    flag_values = flags.FlagValues()
    define_flags(config_class, flag_values, enforce_required=False)
    try:
        flag_values(["config", f"--flagfile={path}"])
    except flags.Error as error:
        raise ValueError(f"{path} does not parse as {config_class.__name__} flags: {error}") from error
    return config_from_flags(config_class, flag_values)


def flag_lines(config):
    """`--name=value` (booleans `--name` / `--noname`) for each field of `config` that is not None, as absl
    writes them: a flag file that `read_flagfile` and `--flagfile` read back to the same config."""
    flag_values = flags.FlagValues()
    define_flags(type(config), flag_values)
    flag_values.mark_as_parsed()
    lines = []
    for field in flag_fields(type(config)):
        value = getattr(config, field.name)
        if value is not None:
            flag_values[field.name].value = list(value) if field.metadata["kind"] == "list" else value
            lines.append(flag_values[field.name].serialize())
    return lines


def _type_problem(field, value):
    kind, choices = field.metadata["kind"], field.metadata["choices"]
    if value is None:
        return None if field.default is None else f"{field.name} must be set (default {field.default!r}), got None."
    expected = {
        "string": ("a string", lambda: isinstance(value, str)),
        "integer": ("an integer", lambda: isinstance(value, int) and not isinstance(value, bool)),
        "float": ("a number", lambda: isinstance(value, (int, float)) and not isinstance(value, bool)),
        "bool": ("True or False", lambda: isinstance(value, bool)),
        "enum": (f"one of {list(choices or ())}", lambda: value in (choices or ())),
        "list": ("a tuple of strings", lambda: isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value)),
    }[kind]  # fmt: skip
    return None if expected[1]() else f"{field.name} must be {expected[0]}, got {value!r}."


def type_problems(config):
    """One line per field of `config` whose value is not of its field's kind (or not one of its choices)."""
    problems = [_type_problem(field, getattr(config, field.name)) for field in flag_fields(type(config))]
    return [problem for problem in problems if problem]


def as_flag_message(message, config_class):
    """A library message about `config_class`'s fields written for the command line: `name=value`,
    a leading `name` and every field name with an underscore become `--name`.

    "batch_size=15 is not divisible ..." -> "--batch_size=15 is not divisible ..."
    """
    names = sorted((field.name for field in flag_fields(config_class)), key=len, reverse=True)
    any_name = "|".join(map(re.escape, names))
    underscored = "|".join(re.escape(name) for name in names if "_" in name)
    message = re.sub(rf"^({any_name})(?=[\s=:])", r"--\1", message)
    message = re.sub(rf"(?<![\w\-/.])({any_name})(?==)", r"--\1", message)
    if underscored:
        message = re.sub(rf"(?<![\w\-/.])({underscored})(?=[\s:,;.)]|$)", r"--\1", message)
    return message
