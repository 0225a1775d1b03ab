"""TorchStorage: local and S3 (a real SeaweedFS server), failures, secrets, Prefect."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_HOME, temporary_settings
from prefect.testing.cli import invoke_and_assert
from prefect.testing.standard_test_suites import BlockStandardTestSuite
from prefect.testing.utilities import prefect_test_harness

from prefect_torch.blocks import (
    StorageNotFoundError,
    TorchResultStorage,
    TorchStorage,
    default_storage,
)
from prefect_torch.blocks.storage import _RETRY_DEADLINE_S as RETRY_DEADLINE_S
from prefect_torch.blocks.storage import _S3_CONNECT_TIMEOUT_S as CONNECT_TIMEOUT_S
from prefect_torch.errors import ConfigError, StorageError
from tests.support.s3 import S3Server, retry_figures, running_s3_server

REPO_ROOT = Path(__file__).resolve().parents[2]
CANARY_KEY_ID = "CANARYKEYID7Q2W"
CANARY_SECRET = "canary-secret-9f8e7d6c5b4a"
CANARY_TOKEN = "canary-token-1a2b3c4d"


@pytest.fixture(scope="module")
def prefect_api():
    """A throwaway Prefect server and database for this module."""
    with prefect_test_harness(server_startup_timeout=120):
        yield


def run_python(code: str, env: dict[str, str] | None = None, timeout: int = 120):
    """Run ``code`` in a fresh interpreter with the repo importable."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def full_text(exc: BaseException) -> str:
    """The message and the whole formatted traceback, chained causes included."""
    return "".join(traceback.format_exception(exc))


# -- local ----------------------------------------------------------------------------


def test_local_round_trip(tmp_path: Path) -> None:
    storage = TorchStorage(basepath=str(tmp_path / "store"))

    written = storage.write_path("ckpt/run1/step-10.rec", b"weights")

    assert written == str(tmp_path / "store" / "ckpt" / "run1" / "step-10.rec")
    assert storage.read_path("ckpt/run1/step-10.rec") == b"weights"
    assert storage.exists("ckpt/run1/step-10.rec")
    assert storage.url("ckpt/run1/step-10.rec") == written
    storage.write_path("ckpt/run1/step-20.rec", b"more")
    storage.write_path("ckpt/run10/step-5.rec", b"other run")
    assert storage.list("ckpt/run1") == ["ckpt/run1/step-10.rec", "ckpt/run1/step-20.rec"]
    assert storage.list("nothing-here") == []
    storage.write_path("ckpt/run1/step-10.rec", b"replaced")
    assert storage.read_path("ckpt/run1/step-10.rec") == b"replaced"
    storage.delete("ckpt/run1/step-10.rec")
    storage.delete("ckpt/run1/step-10.rec")  # deleting twice is fine
    assert not storage.exists("ckpt/run1/step-10.rec")


def test_full_paths_inside_the_basepath_are_accepted(tmp_path: Path) -> None:
    # Prefect's ResultStore resolves keys with _resolve_path and hands them back.
    storage = TorchStorage(basepath=str(tmp_path))
    full = storage.write_path(str(tmp_path / "a" / "b"), b"1")
    assert storage.read_path(full) == b"1"
    assert storage._resolve_path("a/b") == Path(full)


@pytest.mark.parametrize("path", ["../escape", "a/../../escape", "/etc/passwd"])
def test_paths_outside_the_basepath_are_refused(tmp_path: Path, path: str) -> None:
    storage = TorchStorage(basepath=str(tmp_path / "store"))
    with pytest.raises(ConfigError, match="outside the storage basepath"):
        storage.write_path(path, b"x")


def test_default_basepath_is_under_the_prefect_home(tmp_path: Path) -> None:
    with temporary_settings({PREFECT_HOME: str(tmp_path / "home")}):
        storage = default_storage()
        assert storage.basepath is None
        assert storage.url("x") == str(tmp_path / "home" / "prefect-torch" / "x")
        storage.write_path("x", b"1")
        assert (tmp_path / "home" / "prefect-torch" / "x").read_bytes() == b"1"


def test_missing_file_raises_a_not_found_storage_error(tmp_path: Path) -> None:
    storage = TorchStorage(basepath=str(tmp_path))
    with pytest.raises(StorageNotFoundError) as caught:
        storage.read_path("missing.rec")
    assert isinstance(caught.value, FileNotFoundError)
    assert isinstance(caught.value, StorageError)
    assert str(tmp_path / "missing.rec") in str(caught.value)


def test_unwritable_location_fails_fast_with_a_hint(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"not a folder")
    storage = TorchStorage(basepath=str(blocker))
    with pytest.raises(StorageError, match="Could not write") as caught:
        storage.write_path("x.rec", b"1")
    assert "attempts" not in str(caught.value)  # permanent errors are not retried
    assert str(blocker / "x.rec") in str(caught.value)
    assert "Check" in str(caught.value)


def test_crash_mid_write_leaves_the_previous_file_readable(tmp_path: Path) -> None:
    storage = TorchStorage(basepath=str(tmp_path))
    storage.write_path("model.rec", b"previous version")
    # The child writes a new version but is killed after the data hit its temporary
    # file and before the rename: the moment a crash does the most harm.
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import os, sys, time
                from prefect_torch.blocks import TorchStorage
                real_fsync = os.fsync
                def fsync_then_hang(fd):
                    real_fsync(fd)
                    print("IN-FLIGHT", flush=True)
                    time.sleep(600)
                os.fsync = fsync_then_hang
                TorchStorage(basepath={str(tmp_path)!r}).write_path(
                    "model.rec", b"new version " * 100_000
                )
                """
            ),
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "IN-FLIGHT"
        leftovers = [p for p in tmp_path.iterdir() if p.name != "model.rec"]
        assert leftovers, "the child should have a temporary file open"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)

    assert storage.read_path("model.rec") == b"previous version"
    assert storage.list("") == ["model.rec"]  # the dead temporary file is not listed
    storage.write_path("model.rec", b"next version")
    assert storage.read_path("model.rec") == b"next version"


def test_async_callers_get_coroutines(tmp_path: Path) -> None:
    storage = TorchStorage(basepath=str(tmp_path))

    async def main() -> None:
        # Prefect's convention: in async code the same methods return coroutines.
        await storage.write_path("a.rec", b"async")
        assert await storage.read_path("a.rec") == b"async"
        assert await storage.aread_path("a.rec") == b"async"
        assert storage.read_path("a.rec", _sync=True) == b"async"

    asyncio.run(main())


def test_importing_the_blocks_does_not_import_torch() -> None:
    result = run_python(
        """
        import sys
        import prefect_torch.blocks
        from prefect.serializers import Serializer
        assert Serializer(type="prefect-torch").type == "prefect-torch"
        print("torch imported:", "torch" in sys.modules)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "torch imported: False" in result.stdout


# -- secrets ----------------------------------------------------------------------------


def canary_storage(**fields: object) -> TorchStorage:
    return TorchStorage(
        aws_access_key_id=CANARY_KEY_ID,
        aws_secret_access_key=CANARY_SECRET,
        aws_session_token=CANARY_TOKEN,
        **fields,
    )


def assert_no_canary(text: str) -> None:
    for canary in (CANARY_KEY_ID, CANARY_SECRET, CANARY_TOKEN):
        assert canary not in text


def test_secrets_are_not_in_repr_or_str() -> None:
    storage = canary_storage(basepath="s3://bucket/prefix", endpoint_url="http://x")
    assert_no_canary(repr(storage))
    assert_no_canary(str(storage))
    assert_no_canary(repr(TorchResultStorage(storage=storage)))
    assert_no_canary(storage.model_dump_json())


def test_saved_block_hides_secrets_and_loads_them_back(prefect_api: None) -> None:
    storage = canary_storage(basepath="s3://bucket/prefix", endpoint_url="http://x")
    block_id = storage.save("canary-storage", overwrite=True)

    with get_client(sync_client=True) as client:
        hidden = client.read_block_document(block_id, include_secrets=False)
    assert_no_canary(repr(hidden))
    assert_no_canary(hidden.model_dump_json())

    loaded = TorchStorage.load("canary-storage")
    assert loaded.aws_secret_access_key is not None
    assert loaded.aws_secret_access_key.get_secret_value() == CANARY_SECRET
    assert loaded.basepath == "s3://bucket/prefix"


def test_default_storage_can_name_a_saved_block(
    prefect_api: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    TorchStorage(basepath=str(tmp_path / "shared")).save("team-storage", overwrite=True)
    monkeypatch.setenv("PREFECT_TORCH_STORAGE_BLOCK", "torch-storage/team-storage")
    assert default_storage().basepath == str(tmp_path / "shared")
    monkeypatch.setenv("PREFECT_TORCH_STORAGE_BLOCK", "no-such-block")
    with pytest.raises(ConfigError, match="no-such-block"):
        default_storage()


def test_block_types_register_with_the_api(prefect_api: None) -> None:
    for block in (TorchStorage, TorchResultStorage):
        block.register_type_and_schema()
        with get_client(sync_client=True) as client:
            block_type = client.read_block_type_by_slug(block.get_block_type_slug())
        assert block_type.name == block._block_type_name
        assert block_type.documentation_url
    assert TorchStorage.get_block_type_slug() == "torch-storage"


def test_prefect_block_register_cli_finds_the_blocks(prefect_api: None) -> None:
    # `prefect block register -m prefect_torch.blocks`, run in-process against the
    # harness server, then read back through the API.
    invoke_and_assert(
        ["block", "register", "-m", "prefect_torch.blocks"],
        expected_code=0,
        expected_output_contains=["Torch Storage", "Torch Result Storage"],
        echo=False,
    )
    with get_client(sync_client=True) as client:
        slugs = {block_type.slug for block_type in client.read_block_types()}
    assert {"torch-storage", "torch-result-storage"} <= slugs


class TestTorchStorageStandards(BlockStandardTestSuite):
    @pytest.fixture
    def block(self) -> type[TorchStorage]:
        return TorchStorage

    @pytest.mark.skip(reason="Fetches the logo over the network.")
    def test_has_a_valid_image(self, block: type[TorchStorage]) -> None: ...


class TestTorchResultStorageStandards(BlockStandardTestSuite):
    @pytest.fixture
    def block(self) -> type[TorchResultStorage]:
        return TorchResultStorage

    @pytest.mark.skip(reason="Fetches the logo over the network.")
    def test_has_a_valid_image(self, block: type[TorchResultStorage]) -> None: ...


# -- S3 -----------------------------------------------------------------------------


@pytest.mark.s3
def test_s3_round_trip(s3_server: S3Server) -> None:
    storage = TorchStorage(**s3_server.block_fields("round-trip"))
    url = storage.write_path("ckpt/run1/step-10.rec", b"weights")

    assert url == f"s3://{s3_server.bucket}/round-trip/ckpt/run1/step-10.rec"
    assert storage.url("ckpt/run1/step-10.rec") == url
    assert storage.read_path("ckpt/run1/step-10.rec") == b"weights"
    assert storage.read_path(url) == b"weights"
    assert storage.exists("ckpt/run1/step-10.rec")
    storage.write_path("ckpt/run1/step-20.rec", b"more")
    storage.write_path("ckpt/run10/step-5.rec", b"other run")
    assert storage.list("ckpt/run1") == ["ckpt/run1/step-10.rec", "ckpt/run1/step-20.rec"]
    assert storage.list("nothing-here") == []
    storage.delete("ckpt/run1/step-10.rec")
    assert not storage.exists("ckpt/run1/step-10.rec")
    with pytest.raises(StorageNotFoundError, match=s3_server.bucket):
        storage.read_path("ckpt/run1/step-10.rec")


@pytest.mark.s3
def test_s3_paths_outside_the_basepath_are_refused(s3_server: S3Server) -> None:
    storage = TorchStorage(**s3_server.block_fields("inside"))
    with pytest.raises(ConfigError):
        storage.read_path(f"s3://{s3_server.bucket}/elsewhere/x")
    with pytest.raises(ConfigError):
        storage.read_path("a/../../x")


@pytest.mark.s3
def test_s3_sees_another_process_writes_at_once(s3_server: S3Server) -> None:
    storage = TorchStorage(**s3_server.block_fields("freshness"))
    assert not storage.exists("shared.rec")
    assert storage.list("") == []

    def other_process(action: str) -> None:
        result = run_python(
            f"""
            import os
            from prefect_torch.blocks import TorchStorage
            storage = TorchStorage(
                basepath="s3://" + os.environ["TEST_S3_BUCKET"] + "/freshness",
                endpoint_url=os.environ["TEST_S3_ENDPOINT_URL"],
                region=os.environ["AWS_DEFAULT_REGION"],
                aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
                aws_secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
            )
            {action}
            """,
            env=s3_server.client_env(),
        )
        assert result.returncode == 0, result.stderr

    other_process('storage.write_path("shared.rec", b"first")')
    assert storage.exists("shared.rec")
    assert storage.list("") == ["shared.rec"]
    assert storage.read_path("shared.rec") == b"first"

    other_process('storage.write_path("shared.rec", b"second")')
    assert storage.read_path("shared.rec") == b"second"

    other_process('storage.delete("shared.rec")')
    assert not storage.exists("shared.rec")
    assert storage.list("") == []


@pytest.mark.s3
def test_s3_missing_bucket_names_the_bucket(s3_server: S3Server) -> None:
    fields = {**s3_server.block_fields("x"), "basepath": "s3://no-such-bucket/x"}
    storage = TorchStorage(**fields)
    with pytest.raises(StorageError) as caught:
        storage.write_path("a.rec", b"1")
    message = str(caught.value)
    assert "no-such-bucket" in message
    assert s3_server.endpoint_url in message
    assert "exists" in message


@pytest.mark.s3
def test_s3_wrong_credentials_say_so_without_leaking_them(s3_server: S3Server) -> None:
    storage = TorchStorage(
        **{
            **s3_server.block_fields("x"),
            "aws_access_key_id": CANARY_KEY_ID,
            "aws_secret_access_key": CANARY_SECRET,
            "aws_session_token": CANARY_TOKEN,
        }
    )
    for attempt in (
        lambda: storage.write_path("a.rec", b"1"),
        lambda: storage.read_path("a.rec"),
    ):
        with pytest.raises(StorageError) as caught:
            attempt()
        assert "aws_secret_access_key" in str(caught.value)  # the hint names the field
        assert s3_server.bucket in str(caught.value)
        assert_no_canary(full_text(caught.value))


@pytest.mark.s3
@pytest.mark.slow
def test_s3_down_fails_fast_and_recovers(tmp_path: Path) -> None:
    with running_s3_server(
        tmp_path, access_key=CANARY_KEY_ID, secret_key=CANARY_SECRET
    ) as s3:
        storage = TorchStorage(**s3.block_fields("outage"))
        storage.write_path("before.rec", b"safe")

        s3.stop()
        with pytest.raises(StorageError) as caught:
            storage.write_path("during.rec", b"lost")
        message = str(caught.value)
        assert s3.endpoint_url in message
        assert s3.bucket in message
        # It gave up within its retry window (the error reports the storage's own count). No
        # attempt starts that is expected to end past the window; one slower than the attempt
        # before it (a loaded machine) can overrun it by at most a connect timeout.
        attempts, seconds = retry_figures(message)
        assert attempts > 1 and seconds <= RETRY_DEADLINE_S + CONNECT_TIMEOUT_S, message
        assert "reachable" in message
        assert_no_canary(full_text(caught.value))
        with pytest.raises(StorageError) as caught_read:
            storage.read_path("before.rec")
        assert_no_canary(full_text(caught_read.value))

        s3.start()  # same endpoint, same data; the same block instance reconnects
        assert storage.read_path("before.rec") == b"safe"
        storage.write_path("after.rec", b"back")
        assert storage.read_path("after.rec") == b"back"


@pytest.mark.s3
@pytest.mark.slow
def test_s3_hung_endpoint_fails_within_30_seconds(tmp_path: Path) -> None:
    with running_s3_server(tmp_path) as s3:
        storage = TorchStorage(**s3.block_fields("hung"))
        storage.write_path("before.rec", b"safe")
        s3.pause()
        try:
            with pytest.raises(StorageError, match=s3.endpoint_url) as caught:
                storage.write_path("during.rec", b"lost")
            # Each attempt is cut off by the socket and write timeouts, so the retry
            # window ends in time (the error reports the storage's own count).
            attempts, seconds = retry_figures(str(caught.value))
            assert attempts > 1 and seconds < 30, str(caught.value)
            # The next call knows the endpoint is down and tries once.
            with pytest.raises(StorageError, match="tried once") as caught:
                storage.read_path("before.rec")
            assert s3.endpoint_url in str(caught.value)
        finally:
            s3.resume()
        assert storage.read_path("before.rec") == b"safe"
