"""YAML files read for a user: a missing file or bad YAML is one line that names the file."""

from pathlib import Path

import yaml


def read_yaml(path: Path, what: str) -> dict:
    """The mapping a YAML file holds (empty for an empty file); a missing file or bad YAML is one
    line that names the file (and the line and column)."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {one_line(error)}") from None


def one_line(error: yaml.YAMLError) -> str:
    """A YAML error as one line: what is wrong, at which line and column (1-based)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return problem if mark is None else f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
