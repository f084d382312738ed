"""written_whole: what every writer of stores, states and cells relies on."""

import os

import pytest

from recbole_llmk.files import written_whole


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "state.bin"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with written_whole(str(path)) as tmp, open(tmp, "w") as f:
            f.write("half of the new")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["state.bin"]
    with written_whole(path) as tmp, open(tmp, "w") as f:  # a pathlib path too
        f.write("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["state.bin"]


def test_a_folder_replaces_a_folder_and_a_killed_writers_leftover_is_cleared(tmp_path):
    path = tmp_path / "store"
    (tmp_path / "store.partial").mkdir()  # what a killed build left
    (tmp_path / "store.partial" / "stale").write_text("x")
    for content in ("first", "second"):
        with written_whole(str(path) + "/") as tmp:
            os.makedirs(tmp)
            (tmp_path / os.path.basename(tmp) / "meta.json").write_text(content)
        assert os.listdir(path) == ["meta.json"] and (path / "meta.json").read_text() == content
    assert sorted(os.listdir(tmp_path)) == ["store"]


def test_writers_in_other_processes_get_their_own_temporary(tmp_path):
    with written_whole(str(tmp_path / "f"), per_process=True) as tmp:
        assert tmp.endswith(f".{os.getpid()}.partial")
        open(tmp, "w").close()
    assert os.listdir(tmp_path) == ["f"]
