"""Stage 1 on cluster file systems whose mounts have no file locks (Lustre noflock, NFS without
lockd): flock fails there with ENOSYS/ENOLCK, which must not stop extraction."""

import errno

import pytest

from babymerge import features
from test_features import encoder_dir, extract, write_images  # noqa: F401 (a fixture)


def test_extraction_runs_where_flock_is_not_supported(tmp_path, encoder_dir, monkeypatch):  # noqa: F811
    write_images(tmp_path / "imgs", ["a.png", "b.png"])

    def no_locks(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(features.fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="no file locks"):
        summary = extract(tmp_path / "imgs", tmp_path / "f.h5", encoder_dir)
    assert summary["rows"] == 2 and not (tmp_path / "f.h5.partial").exists()
