"""YAML files read one way: ``yaml.safe_load``, a missing or invalid file one line naming it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from biometry.errors import BiometryInputError


def read_yaml(path: str | Path, *, missing: str) -> Any:
    """The parsed file; ``missing`` says what the file should be when it is not there."""
    path = Path(path)
    if not path.is_file():
        raise BiometryInputError(f"{path}: not found ({missing})")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise BiometryInputError(f"{path}: invalid YAML ({err})") from None
