"""Names of a package that load with their module on first use (PEP 562), so that importing
the package, or running `--help`, does not import torch and moshi."""

import importlib
import typing as tp


def lazy_names(package: str, from_module: dict[str, str]) -> tp.Callable[[str], tp.Any]:
    """The package's `__getattr__`: `from_module` maps each name to the submodule (".x") holding it."""
    def __getattr__(name: str) -> tp.Any:
        if name in from_module:
            return getattr(importlib.import_module(from_module[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__
