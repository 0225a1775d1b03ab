"""The Torch Sweep Storage block: a study database URL kept as a secret."""

import pytest
from prefect.testing.standard_test_suites import BlockStandardTestSuite
from pydantic import ValidationError

from prefect_torch.blocks import SweepStorage
from prefect_torch.blocks.redaction import redact
from prefect_torch.blocks.sweeps import sweep_database
from prefect_torch.errors import ConfigError

URL = "postgresql://optuna:hunter2-secret@db.internal:5432/optuna"


def test_the_url_is_a_secret_and_connects_with_psycopg():
    block = SweepStorage(url=URL)
    assert "hunter2-secret" not in repr(block) and "hunter2-secret" not in str(block.model_dump())
    assert block.database_url() == "postgresql+psycopg://optuna:hunter2-secret@db.internal:5432/optuna"
    assert "hunter2-secret" not in redact(f"could not connect to {URL}")  # registered for log redaction


def test_a_url_that_is_not_a_database_is_refused():
    with pytest.raises(ValidationError, match="database URL"):
        SweepStorage(url="https://example.com/optuna")


def test_an_unknown_block_name_says_how_to_save_one(prefect_harness):
    with pytest.raises(ConfigError, match=r"SweepStorage\(url='postgresql://...'\).save\('no-such-block'\)"):
        sweep_database("no-such-block")


def test_a_saved_block_is_loaded_by_name(prefect_harness):
    SweepStorage(url="sqlite:////tmp/sweeps-test.db").save("sweeps-test", overwrite=True)
    assert sweep_database("sweeps-test") == "sqlite:////tmp/sweeps-test.db"


class TestSweepStorageStandards(BlockStandardTestSuite):
    @pytest.fixture
    def block(self) -> type[SweepStorage]:
        return SweepStorage

    @pytest.mark.skip(reason="Fetches the logo over the network.")
    def test_has_a_valid_image(self, block: type[SweepStorage]) -> None: ...
