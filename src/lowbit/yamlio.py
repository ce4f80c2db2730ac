"""YAML reading with YAML 1.2 numbers: ``5e-4`` is a float, as every ML config writes it.

PyYAML implements YAML 1.1, whose float pattern needs a dot and a signed exponent (``5.0e-4``),
so ``lr: 5e-4`` comes back as the *string* ``"5e-4"``. :func:`load_yaml` uses a safe loader whose
float resolver also accepts the YAML 1.2 core schema forms (``5e-4``, ``1E3``, ``.5``, ``+1.``);
everything else reads as :func:`yaml.safe_load` reads it. Only this module imports the loader.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

_FLOAT_12 = re.compile(
    r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _Loader(yaml.SafeLoader):
    """SafeLoader plus the YAML 1.2 float forms (integers stay integers)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Parse ``text`` like :func:`yaml.safe_load`, reading YAML 1.2 floats (``5e-4``) as floats."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects
