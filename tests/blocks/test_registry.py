"""ModelRegistry: versions, aliases and concurrent updates, on a local folder and
on a real S3 server (SeaweedFS), with real saved models."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path

import pytest
from prefect.testing.standard_test_suites import BlockStandardTestSuite

from prefect_torch.blocks import ModelRegistry, RegistryConflictError, RegistryLookupError, TorchStorage
from prefect_torch.blocks.registry import ANY, load_stored_model, save_model_folder
from prefect_torch.engine.models import ModelSpec, build_model
from prefect_torch.engine.persist import save_model
from prefect_torch.engine.split import SplitSpec, split_table
from prefect_torch.errors import ConfigError, IntegrityError
from tests.datasets import noisy_linear

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def storage(request, tmp_path) -> TorchStorage:
    if request.param == "local":
        return TorchStorage(basepath=str(tmp_path / "store"))
    s3_server = request.getfixturevalue("s3_server")
    return TorchStorage(**s3_server.block_fields(f"registry-{uuid.uuid4().hex[:8]}"))


@pytest.fixture
def registry(storage: TorchStorage) -> ModelRegistry:
    return ModelRegistry(storage=storage)


def stored_model(storage: TorchStorage, path: str, seed: int = 0) -> str:
    """Save a small real model (weights differ by ``seed``) into ``storage``."""
    splits = split_table(noisy_linear(60, features=3), SplitSpec(target="y"))
    spec = ModelSpec(hidden=[4], seed=seed)
    model = build_model(spec, splits.info.n_features, splits.info.n_outputs)
    with tempfile.TemporaryDirectory() as scratch:
        save_model(model, spec, splits.info, scratch, extra={"metrics": {"r2": 0.5}})
        save_model_folder(storage, scratch, path)
    return path


def test_register_load_and_promote(registry: ModelRegistry) -> None:
    first = registry.register(
        "housing",
        stored_model(registry.storage, "models/a", seed=1),
        metrics={"r2": 0.8},
        problem="regression",
        data_key="sha256-aaa",
        dataset_uri="s3://bucket/housing/2026-01.csv",
        specs={"model": {"hidden": [4]}},
        code_version={"prefect_torch": "0.1.0"},
    )
    second = registry.register("housing", stored_model(registry.storage, "models/b", seed=2), metrics={"r2": 0.9})
    assert (first.version, second.version) == (1, 2)
    assert registry.model_names() == ["housing"]
    assert [v.version for v in registry.list_versions("housing")] == [1, 2]
    assert registry.latest_version("housing") == second
    again = registry.get_version("housing", 1)
    assert again == first
    assert (again.data_key, again.metrics, again.specs) == ("sha256-aaa", {"r2": 0.8}, {"model": {"hidden": [4]}})
    assert again.code_version == {"prefect_torch": "0.1.0"}
    assert again.model_uri == registry.storage.url("models/a")

    record = registry.set_alias("housing", "champion", 1, expected_version=None, reason="first")
    assert (record.generation, record.version, record.previous_version) == (1, 1, None)
    registry.set_alias("housing", "champion", 2, expected_version=1, reason="better")
    assert registry.get_alias("housing").version == 2
    assert registry.aliases("housing") == {"champion": 2}
    assert [(r.generation, r.version, r.reason) for r in registry.alias_history("housing")] == [
        (1, 1, "first"), (2, 2, "better"),
    ]

    champion = registry.load_model("housing")
    by_version = registry.load_model("housing", version=1)
    assert champion.uri == registry.storage.url("models/b")
    assert by_version.uri == registry.storage.url("models/a")
    assert champion.document["weights_sha256"] != by_version.document["weights_sha256"]
    assert registry.resolve("housing", alias="champion").version == 2


def test_documents_are_plain_json(registry: ModelRegistry) -> None:
    registry.register("m", stored_model(registry.storage, "models/x"), metrics={"r2": 1.0})
    registry.set_alias("m", "champion", 1)
    for path in registry.storage.list("registry"):
        document = json.loads(registry.storage.read_path(path))
        assert document["format"].startswith("prefect-torch-registry-")
    assert registry.storage.list("registry") == [
        "registry/m/aliases/champion/00000001.json",
        "registry/m/versions/00000001.json",
    ]


def test_missing_entries_have_clear_errors(registry: ModelRegistry) -> None:
    with pytest.raises(RegistryLookupError, match=r"No model named 'nope'.*registered models: none"):
        registry.load_model("nope")
    with pytest.raises(RegistryLookupError, match=r"no saved model at .*models/missing"):
        registry.register("m", "models/missing")
    registry.register("m", stored_model(registry.storage, "models/x"))
    with pytest.raises(RegistryLookupError, match=r"Model 'm' has no version 7; its versions are 1"):
        registry.get_version("m", 7)
    with pytest.raises(RegistryLookupError, match=r"Model 'm' has no alias 'champion'.*set_alias"):
        registry.load_model("m")
    with pytest.raises(RegistryLookupError, match="no alias 'staging'"):
        registry.resolve("m", alias="staging")
    with pytest.raises(RegistryLookupError, match="no version 3"):
        registry.set_alias("m", "champion", 3)
    with pytest.raises(ConfigError, match="Invalid model name '../etc'"):
        registry.register("../etc", "models/x")
    with pytest.raises(ConfigError, match="either alias or version"):
        registry.resolve("m", alias="champion", version=1)


def test_compare_and_swap_refuses_a_stale_expectation(registry: ModelRegistry) -> None:
    for name in ("a", "b", "c"):
        registry.register("m", stored_model(registry.storage, f"models/{name}"))
    registry.set_alias("m", "champion", 1, expected_version=None)
    registry.set_alias("m", "champion", 2, expected_version=1)
    with pytest.raises(RegistryConflictError, match="points at version 2, not version 1"):
        registry.set_alias("m", "champion", 3, expected_version=1)
    with pytest.raises(RegistryConflictError, match="points at version 2, not nothing"):
        registry.set_alias("m", "champion", 3, expected_version=None)
    assert registry.get_alias("m").version == 2


def test_concurrent_registrations_get_distinct_versions(registry: ModelRegistry) -> None:
    stored_model(registry.storage, "models/shared")
    workers = 6
    barrier = threading.Barrier(workers)
    results, errors = [], []

    def register(i: int) -> None:
        # Each thread has its own block (and S3 client), like separate processes.
        own = ModelRegistry(storage=registry.storage.model_copy())
        barrier.wait()
        try:
            results.append(own.register("m", "models/shared", description=f"writer {i}"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert sorted(r.version for r in results) == list(range(1, workers + 1))
    stored = {v.version: v.description for v in registry.list_versions("m")}
    assert stored == {r.version: r.description for r in results}


def test_concurrent_promotions_one_wins_nothing_is_overwritten(registry: ModelRegistry) -> None:
    for name in ("a", "b", "c", "d", "e"):
        registry.register("m", stored_model(registry.storage, f"models/{name}"))
    registry.set_alias("m", "champion", 1, expected_version=None)
    contenders = [2, 3, 4, 5]
    barrier = threading.Barrier(len(contenders))
    won, lost = [], []

    def promote(version: int) -> None:
        own = ModelRegistry(storage=registry.storage.model_copy())
        barrier.wait()
        try:
            won.append(own.set_alias("m", "champion", version, expected_version=1))
        except RegistryConflictError:
            lost.append(version)

    threads = [threading.Thread(target=promote, args=(v,)) for v in contenders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(won) == 1 and len(lost) == len(contenders) - 1
    history = registry.alias_history("m")
    assert [(r.generation, r.previous_version) for r in history] == [(1, None), (2, 1)]
    assert registry.get_alias("m").version == won[0].version


def test_unconditional_moves_stack_up_instead_of_overwriting(registry: ModelRegistry) -> None:
    for name in ("a", "b", "c", "d"):
        registry.register("m", stored_model(registry.storage, f"models/{name}"))
    threads = [
        threading.Thread(target=ModelRegistry(storage=registry.storage.model_copy()).set_alias,
                         args=("m", "champion", v), kwargs={"expected_version": ANY})
        for v in (1, 2, 3, 4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    history = registry.alias_history("m")
    assert [r.generation for r in history] == [1, 2, 3, 4]
    assert sorted(r.version for r in history) == [1, 2, 3, 4]


def test_a_damaged_document_is_named(registry: ModelRegistry) -> None:
    registry.register("m", stored_model(registry.storage, "models/x"))
    registry.storage.write_path("registry/m/versions/00000001.json", b"{not json")
    with pytest.raises(IntegrityError, match=r"00000001.json is not valid JSON"):
        registry.get_version("m", 1)
    registry.storage.write_path("registry/m/versions/00000001.json", json.dumps({"format": "other"}).encode())
    with pytest.raises(IntegrityError, match="foreign file"):
        registry.get_version("m", 1)


def test_stored_models_load_with_the_blocks_credentials(storage: TorchStorage) -> None:
    stored_model(storage, "models/creds", seed=4)
    model = load_stored_model(storage, "models/creds")
    assert model.uri == storage.url("models/creds")
    assert model.info.target == "y"
    assert len(model.predict(noisy_linear(5, features=3))) == 5


@pytest.mark.usefixtures("prefect_harness")
def test_saved_block_round_trip(tmp_path: Path) -> None:
    name = f"registry-{uuid.uuid4().hex[:8]}"
    ModelRegistry(storage=TorchStorage(basepath=str(tmp_path)), folder="models-registry").save(name)
    loaded = ModelRegistry.load(name)
    assert loaded.folder == "models-registry"
    assert loaded.storage.basepath == str(tmp_path)


def test_importing_the_registry_does_not_import_torch() -> None:
    code = "import sys, prefect_torch.blocks.registry; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


class TestModelRegistryStandards(BlockStandardTestSuite):
    @pytest.fixture
    def block(self) -> type[ModelRegistry]:
        return ModelRegistry

    @pytest.mark.skip(reason="Fetches the logo over the network.")
    def test_has_a_valid_image(self, block: type[ModelRegistry]) -> None: ...
