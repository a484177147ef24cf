"""Stage 1: extending a feature file with a second SOURCE whose ids are already stored (from the
first source) says so; a resume or re-run of a source already in the file does not."""

import json
import warnings

import h5py
import pytest

from test_features import encoder_dir, extract, write_images  # noqa: F401 (a fixture)


def test_second_source_with_stored_ids_warns_and_resume_does_not(tmp_path, encoder_dir):  # noqa: F811
    write_images(tmp_path / "a", ["1.png", "2.png"], seed=0)
    write_images(tmp_path / "b", ["2.png", "3.png"], seed=1)  # its "2" is another image
    out = tmp_path / "f.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        extract(tmp_path / "a", out, encoder_dir)
    with pytest.warns(UserWarning, match=r"1 image id\(s\) of SOURCE .*b are already in .*: 2;"):
        summary = extract(tmp_path / "b", out, encoder_dir)
    assert summary["rows"] == 3 and summary["skipped"] == 1
    with h5py.File(out, "r") as f:
        sources = json.loads(f.attrs["config"])["sources"]
    assert sources == sorted(str((tmp_path / d).resolve()) for d in "ab")
    with warnings.catch_warnings():  # both sources are known now: re-runs are resumes
        warnings.simplefilter("error")
        assert extract(tmp_path / "b", out, encoder_dir)["skipped"] == 2
        assert extract(tmp_path / "a", out, encoder_dir)["skipped"] == 2


def test_file_written_before_sources_were_recorded(tmp_path, encoder_dir):  # noqa: F811
    """A file whose config has only its one ``source``: re-running that source resumes quietly,
    another source with the same ids warns."""
    write_images(tmp_path / "a", ["1.png"], seed=0)
    write_images(tmp_path / "b", ["1.png"], seed=1)
    out = tmp_path / "f.h5"
    extract(tmp_path / "a", out, encoder_dir)
    with h5py.File(out, "r+") as f:
        config = json.loads(f.attrs["config"])
        del config["sources"]
        f.attrs["config"] = json.dumps(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert extract(tmp_path / "a", out, encoder_dir)["skipped"] == 1
    with pytest.warns(UserWarning, match=r"1 image id\(s\) of SOURCE .*b are already in"):
        extract(tmp_path / "b", out, encoder_dir)


def test_joined_file_records_every_shards_source(tmp_path, encoder_dir):  # noqa: F811
    from babymerge.features import JoinConfig, join_features

    write_images(tmp_path / "a", ["1.png"], seed=0)
    write_images(tmp_path / "b", ["2.png"], seed=1)
    extract(tmp_path / "a", tmp_path / "a.h5", encoder_dir)
    extract(tmp_path / "b", tmp_path / "b.h5", encoder_dir)
    join_features(JoinConfig(shards=[tmp_path / "a.h5", tmp_path / "b.h5"], out=tmp_path / "j.h5"))
    with warnings.catch_warnings():  # b's images are in the joined file: re-running b resumes
        warnings.simplefilter("error")
        assert extract(tmp_path / "b", tmp_path / "j.h5", encoder_dir)["skipped"] == 1


def test_virtual_join_counts_the_failed_it_writes(tmp_path, encoder_dir):  # noqa: F811
    """An id failed in one shard but with a feature in another is not failed: the summary and
    the file agree (the virtual join's summary counted it)."""
    from babymerge.features import JoinConfig, join_features

    write_images(tmp_path / "a", ["1.png"], seed=0)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "1.png").write_bytes(b"broken")
    extract(tmp_path / "a", tmp_path / "a.h5", encoder_dir)
    extract(tmp_path / "b", tmp_path / "b.h5", encoder_dir)
    for virtual in (False, True):
        out = tmp_path / f"j{virtual}.h5"
        summary = join_features(JoinConfig(shards=[tmp_path / "a.h5", tmp_path / "b.h5"],
                                           out=out, virtual=virtual))
        with h5py.File(out, "r") as f:
            assert summary["failed"] == len(f["failed"]["ids"]) == 0
