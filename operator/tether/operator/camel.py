"""The base of every MLTask model: camelCase on the wire, snake_case in Python, unknown fields refused.

Apart from `model` so that the spec's parts in their own modules (`federated`)
and the status models (`task_status`) share it without an import loop.
Pure: pydantic only.
"""

from __future__ import annotations

import pydantic
from pydantic import alias_generators


class CamelModel(pydantic.BaseModel):
    """Common configuration: camelCase aliases, unknown fields refused, immutable values."""

    model_config = pydantic.ConfigDict(
        alias_generator=alias_generators.to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )

    def to_json(self) -> dict[str, object]:
        """The wire form: camelCase keys, JSON types, unset optionals left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
