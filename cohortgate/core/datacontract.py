"""The data contract's file format (issue 20): what a model's inputs and outputs may hold.

Pydantic models only, so the policy schema (a backend's ``contract:``, inline) and the sidecar (which
compiles a contract against its model, `sidecar.contract`) validate one format, defined once here.
The format and the rules are described in `sidecar.contract` and docs/sidecar.md.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class FeatureSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    tensor: str | None = Field(default=None, description="the model tensor; default: the only input (output)")
    column: int | None = Field(default=None, ge=0, description="column of a [-1, k] tensor")
    type: Literal["float", "int", "bool", "category"] = "float"
    min: float | None = None
    max: float | None = None
    allowed: list[float] | None = Field(default=None, min_length=1)
    nullable: bool = False
    reference: dict[str, Any] | None = None
    positive: float | None = Field(
        default=None, description="an output category that is the positive prediction (the four-fifths rule)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> FeatureSpec:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"feature {self.name!r}: min {self.min} is above max {self.max}")
        if self.type == "category" and self.allowed is None:
            raise ValueError(f"feature {self.name!r}: a category needs its `allowed` values")
        if self.type != "category" and self.allowed is not None:
            raise ValueError(f"feature {self.name!r}: `allowed` is for type category only")
        if self.type in ("bool", "category") and (self.min is not None or self.max is not None):
            raise ValueError(f"feature {self.name!r}: min/max are for float and int features")
        if self.positive is not None and (self.type != "category" or self.positive not in (self.allowed or ())):
            raise ValueError(f"feature {self.name!r}: `positive` must be one of the `allowed` values of a category")
        return self


class ContractSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    model: str | None = None
    mode: Literal["observe", "enforce"] = "observe"
    inputs: list[FeatureSpec] = Field(default_factory=list)
    outputs: list[FeatureSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> ContractSpec:
        names = [f.name for f in (*self.inputs, *self.outputs)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"feature names must be unique across inputs and outputs: {', '.join(dupes)}")
        return self


def is_inline(contract: str) -> bool:
    """A `--contract` / backend ``contract:`` value that is the contract itself (JSON, as `cohortgate up`
    passes a policy's inline one), not the name of a file."""
    return contract.lstrip().startswith("{")
