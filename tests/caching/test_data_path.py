"""The data path of a cached rerun: Data Load keeps a reference to the source, Data
Split one tensor file that cache hits map; nothing reads or copies the dataset that
does not have to, and every guarantee of the verified records still holds."""

import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from prefect import flow

from prefect_torch.engine.data import LoadSpec
from prefect_torch.engine.split import SplitSpec
from prefect_torch.tasks import data_load, data_split
from prefect_torch.tasks._common import persisted_in
from tests.caching.test_flow_caching import cached, params, run_here
from tests.datasets import noisy_linear

REPO = Path(__file__).resolve().parents[2]


def written_earlier(path: Path) -> Path:
    """Date the file back a minute: a file hashed within a second of its last write is
    not remembered across processes (a second write in the same timestamp tick could
    go unseen), and these tests are about a dataset written before the first run."""
    stamp = time.time() - 60
    os.utime(path, (stamp, stamp))
    return path


@pytest.fixture
def data(tmp_path, request):
    path = tmp_path / "data.csv"
    # A seed of its own per test: results are keyed by content, and the session shares storage.
    noisy_linear(400, seed=zlib.crc32(request.node.name.encode()) % 10_000).to_csv(path, index=False)
    return written_earlier(path)


def prefect_home() -> Path:
    from prefect.settings import PREFECT_HOME

    return Path(PREFECT_HOME.value())


@pytest.mark.usefixtures("prefect_harness")
class TestCachedData:
    def test_a_model_change_in_a_new_process_never_opens_the_dataset(self, data):
        from prefect.settings import PREFECT_API_URL

        run_here(params(data))
        request = params(data)
        request["model"] = {"hidden": [24]}
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(prefect_home()),
               "WATCH_PATH": str(data)}
        out = subprocess.run([sys.executable, "-m", "tests.caching.run_audited", json.dumps(request)],
                             capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
        assert out.returncode == 0, out.stderr[-3000:]
        *_, result, audit = out.stdout.strip().splitlines()
        cards = json.loads(result)["cards"]
        assert cached(cards) == {"data_load", "data_split"} and cards["train"] == "Completed"
        assert json.loads(audit)["opened_by"] == []

    def test_the_cli_reads_a_new_dataset_once_and_a_rerun_with_another_model_not_at_all(self, data):
        """The command reads a dataset the cache has not seen while it starts (in the
        background), splits it there and writes the split's tensor file there; Data Load
        and Data Split take that table and those splits, and the card only renames the
        file into storage. A rerun only peeks at the header to check the columns before
        Prefect starts, and splits and writes nothing."""
        from prefect.settings import PREFECT_API_URL

        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(prefect_home()),
               "WATCH_PATH": str(data)}

        def train(hidden: str) -> tuple[dict, list[str], list[str], list[str]]:
            argv = ["train", str(data), "--target", "y", "--epochs", "1", "--hidden", hidden, "--json"]
            out = subprocess.run([sys.executable, "-m", "tests.caching.run_audited", "--cli", json.dumps(argv)],
                                 capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
            assert out.returncode == 0, out.stderr[-3000:]
            *_, result, audit = out.stdout.strip().splitlines()
            audit = json.loads(audit)
            return json.loads(result), audit["opened_by"], audit["split_in"], audit["tensor_files_written_in"]

        first, opened_by, split_in, written_in = train("16")
        assert sorted(opened_by) == ["_read_early", "check_columns"]
        assert len(split_in) == 1 and split_in[0].startswith("prefect-torch-prefetch-split-"), split_in
        assert written_in == split_in  # one tensor file, written by the early split
        (stored,) = split_files(data)
        assert not list((prefect_home() / "prefect-torch" / "cache" / "tensors").glob(".staged.*"))
        again, opened_by, split_in, written_in = train("24")
        assert (opened_by, split_in, written_in) == (["check_columns"], [], [])
        assert again["data_key"] == first["data_key"] and split_files(data) == [stored]

    def test_a_split_cache_hit_maps_the_stored_tensor_file(self, data):
        @flow
        def load_and_split(uri: str):
            load, split = persisted_in(None, data_load, data_split)
            return split(load(LoadSpec(uri=uri)), SplitSpec(target="y"))

        computed = load_and_split(str(data))
        hit = load_and_split(str(data))
        stored = Path(hit.stored["uri"])
        assert stored.parent == prefect_home() / "prefect-torch" / "tensors"
        for name, tensor in hit.tensors().items():
            assert mapping_of(tensor.data_ptr()) == str(stored), name
            assert tensor.equal(computed.tensors()[name])
        assert mapping_of(computed.train.X.data_ptr()) != str(stored)  # computed tensors live in memory

    def test_a_damaged_tensor_file_is_detected_and_recomputed(self, data, caplog):
        first = run_here(params(data))
        (stored,) = split_files(data)
        raw = bytearray(stored.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        stored.write_bytes(raw)
        again = run_here(params(data))
        assert again["cards"]["data_split"] == "Completed" and again["cards"]["data_load"] == "Cached"
        assert again["metrics"] == first["metrics"]
        assert any("is damaged" in r.getMessage() and str(stored) in r.getMessage() for r in caplog.records)
        fresh = run_here(params(data))  # the recomputed split replaced the damaged file
        assert cached(fresh["cards"]) >= {"data_load", "data_split"}

    def test_a_source_replaced_with_other_bytes_recomputes_load_and_everything_after(self, data):
        first = run_here(params(data))
        noisy_linear(400, seed=99_999).to_csv(data, index=False)
        written_earlier(data)
        again = run_here(params(data))
        assert cached(again["cards"]) == set()
        assert again["metrics"] != first["metrics"]


def split_files(data: Path) -> list[Path]:
    """The stored tensor files of the default split of ``data`` (named by the split's key)."""
    from prefect_torch.engine.fingerprint import source_key
    from prefect_torch.engine.split import _splits_key
    from prefect_torch.flows.params import DatasetSpec

    spec = DatasetSpec(uri=str(data), target="y").split_spec()
    key = _splits_key(source_key(str(data)), spec)
    return sorted((prefect_home() / "prefect-torch" / "tensors").glob(f"{key}.*.safetensors"))


def mapping_of(address: int) -> str | None:
    """The file mapped at ``address`` in this process, from /proc/self/maps."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(v, 16) for v in fields[0].split("-"))
        if start <= address < end:
            return fields[5].strip() if len(fields) == 6 else None
    return None


@pytest.mark.s3
@pytest.mark.slow
def test_with_s3_storage_no_object_the_size_of_the_dataset_is_written(s3_server, data, tmp_path):
    storage = s3_server.block_fields("data-path")
    request = {**params(data), "storage": storage}
    env = {**os.environ, **s3_server.client_env(), "PREFECT_HOME": str(tmp_path / "home")}
    env.pop("PREFECT_API_URL", None)
    out = subprocess.run([sys.executable, "-m", "tests.caching.run_train_flow", json.dumps(request)],
                         capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert cached(json.loads(out.stdout.strip().splitlines()[-1])["cards"]) == set()
    fs = s3_server.filesystem()
    sizes = {path: info["size"] for path, info in fs.find(storage["basepath"], detail=True).items()}
    assert any("/tensors/" in path for path in sizes)  # the split is stored once, as float32
    dataset = data.stat().st_size
    assert max(sizes.values()) < 0.4 * dataset, {p: s for p, s in sizes.items() if s >= 0.4 * dataset}
