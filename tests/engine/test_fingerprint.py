"""Dataset fingerprints are remembered by file state, like git's index."""

import os
import sys
import time

from prefect_torch.engine import fingerprint


def hashed_opens(path, action):
    opened = []
    watched = os.path.realpath(path)

    def hook(event, args):
        if event == "open" and isinstance(args[0], (str, os.PathLike)) and os.path.realpath(args[0]) == watched:
            opened.append(args[0])

    hook.active = True
    sys.addaudithook(lambda e, a: hook(e, a) if hook.active else None)
    try:
        result = action()
    finally:
        hook.active = False
    return result, len(opened)


def age(path, seconds=60):
    stamp = time.time() - seconds
    os.utime(path, (stamp, stamp))


def test_an_unchanged_file_is_not_read_again_in_a_new_process(tmp_path):
    data, cache = tmp_path / "d.csv", tmp_path / "fingerprints"
    data.write_text("x,y\n1,2\n")
    age(data)
    key, reads = hashed_opens(data, lambda: fingerprint.source_key(str(data), cache_dir=cache))
    assert key.startswith("xxh3-") and reads == 1
    fingerprint.clear_cache()  # what a new process starts with
    again, reads = hashed_opens(data, lambda: fingerprint.source_key(str(data), cache_dir=cache))
    assert (again, reads) == (key, 0)


def test_any_change_of_the_file_is_hashed_again(tmp_path):
    data, cache = tmp_path / "d.csv", tmp_path / "fingerprints"
    data.write_text("x,y\n1,2\n")
    age(data)
    key = fingerprint.source_key(str(data), cache_dir=cache)
    data.write_text("x,y\n1,3\n")  # same size
    age(data, 30)
    fingerprint.clear_cache()
    changed, reads = hashed_opens(data, lambda: fingerprint.source_key(str(data), cache_dir=cache))
    assert changed != key and reads == 1


def test_a_file_written_just_now_is_not_remembered_across_processes(tmp_path):
    data, cache = tmp_path / "d.csv", tmp_path / "fingerprints"
    data.write_text("x,y\n1,2\n")
    fingerprint.source_key(str(data), cache_dir=cache)
    fingerprint.clear_cache()
    _, reads = hashed_opens(data, lambda: fingerprint.source_key(str(data), cache_dir=cache))
    assert reads == 1
