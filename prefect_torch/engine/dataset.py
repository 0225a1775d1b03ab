"""Where the data is and how to split it: the dataset parameter of every training flow.

It lives in the engine, not beside the flows, so the command line can build the very
spec a flow will use (its load and split specs) before it imports Prefect.
"""

from __future__ import annotations

from pydantic import Field

from prefect_torch.engine.data import DataFormat, LoadSpec
from prefect_torch.engine.problem import ProblemChoice
from prefect_torch.engine.spec import Spec
from prefect_torch.engine.split import SplitSpec


class DatasetSpec(Spec):
    """Where the data is and how to learn from it."""

    uri: str = Field(title="URI", description="Local path or URL (s3://bucket/key.csv) of a CSV or Parquet file.")
    target: str = Field(description="Name of the column to predict.")
    features: list[str] | None = Field(default=None, description="Feature columns; every other column when empty.")
    format: DataFormat = Field(default="auto", description="File format; 'auto' decides from name and content.")
    problem: ProblemChoice = Field(default="auto", description="regression, binary or multiclass; 'auto' infers it.")
    val_fraction: float = Field(default=0.15, ge=0.0, lt=1.0, description="Share of rows for validation.")
    test_fraction: float = Field(default=0.15, ge=0.0, lt=1.0, description="Share of rows held out for the final test.")
    split_seed: int = Field(default=0, ge=0, description="Seed of the train/val/test split.")
    stratify: bool = Field(default=True, description="Keep class proportions in every split (classification).")
    standardize: bool = Field(default=True, description="Standardise features (and a regression target) on train statistics.")

    def load_spec(self) -> LoadSpec:
        return LoadSpec(uri=self.uri, format=self.format)

    def split_spec(self) -> SplitSpec:
        return SplitSpec(
            target=self.target, features=self.features, problem=self.problem,
            val_fraction=self.val_fraction, test_fraction=self.test_fraction,
            seed=self.split_seed, stratify=self.stratify, standardize=self.standardize,
        )


__all__ = ["DatasetSpec"]
