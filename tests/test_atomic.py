import os

import pytest

from tokenflow.atomic import atomic_path


def test_atomic_path_replaces_on_success_with_normal_permissions(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    old_umask = os.umask(0o022)
    try:
        with atomic_path(target) as tmp:
            assert tmp.endswith(".txt") and os.path.dirname(tmp) == str(tmp_path)
            with open(tmp, "w") as f:
                f.write("new")
            assert target.read_text() == "old"  # nothing replaced until the block succeeds
    finally:
        os.umask(old_umask)
    assert target.read_text() == "new"
    assert oct(os.stat(target).st_mode & 0o777) == oct(0o644)
    assert os.listdir(tmp_path) == ["out.txt"]


def test_atomic_path_leaves_the_target_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]
