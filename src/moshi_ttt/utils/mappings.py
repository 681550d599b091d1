"""Config mappings merged key by key: a partial section changes only what it names."""

import typing as tp


def deep_merged(base: tp.Mapping[str, tp.Any], change: tp.Mapping[str, tp.Any]) -> dict[str, tp.Any]:
    """`base` with `change` over it, nested mappings merged rather than replaced (neither is modified;
    values are shared, not copied)."""
    out = dict(base)
    for key, value in change.items():
        both = isinstance(value, tp.Mapping) and isinstance(out.get(key), tp.Mapping)
        out[key] = deep_merged(out[key], value) if both else value
    return out
