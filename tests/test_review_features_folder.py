"""Stage 1 folder SOURCE: image sets linked in (``images/coco -> /datasets/coco``) are listed."""

import os
from pathlib import Path

from babymerge.images import list_images
from test_features import write_images


def test_symlinked_folders_are_followed_once(tmp_path):
    write_images(tmp_path / "store" / "coco", ["a.png", "sub/b.jpg"])
    write_images(tmp_path / "images", ["own.png", ".hidden/x.png"])
    os.symlink(tmp_path / "store" / "coco", tmp_path / "images" / "coco")
    os.symlink(tmp_path / "images", tmp_path / "images" / "loop")  # a link loop must end
    items = list_images(str(tmp_path / "images"))
    assert [i.id for i in items] == ["coco/a", "coco/sub/b", "own"]
    assert items[0].path == str(tmp_path / "images" / "coco" / "a.png")


def test_broken_links_are_named_in_a_warning(tmp_path):
    import pytest

    write_images(tmp_path / "images", ["own.png"])
    os.symlink(tmp_path / "not_mounted", tmp_path / "images" / "coco")
    with pytest.warns(UserWarning, match=r"1 broken symbolic link\(s\) skipped .*images/coco"):
        assert [i.id for i in list_images(str(tmp_path / "images"))] == ["own"]


def test_image_lists_with_a_byte_order_mark(tmp_path):
    write_images(tmp_path, ["a.png"])
    (tmp_path / "l.jsonl").write_text('\ufeff{"image_id": "a", "path": "a.png"}\n', "utf-8")
    (tmp_path / "l.tsv").write_text("\ufeffimage_id\tpath\na\ta.png\n", "utf-8")
    for name in ("l.jsonl", "l.tsv"):
        assert [i.id for i in list_images(str(tmp_path / name))] == ["a"]


def test_jsonl_id_that_is_not_a_string_or_integer_names_the_line(tmp_path):
    import pytest

    from babymerge.images import SourceError

    write_images(tmp_path, ["a.png"])
    for bad in ("null", "[1]", '""', "true"):
        (tmp_path / "l.jsonl").write_text('{"image_id": 7, "path": "a.png"}\n'
                                          f'{{"image_id": {bad}, "path": "a.png"}}\n')
        with pytest.raises(SourceError, match=r"l\.jsonl:2: 'image_id' is "):
            list_images(str(tmp_path / "l.jsonl"))


def test_image_list_that_is_not_utf8_names_the_file_and_line(tmp_path):
    import pytest

    from babymerge.images import SourceError

    write_images(tmp_path, ["a.png"])
    (tmp_path / "l.tsv").write_bytes("a\ta.png\nb\tcaf\u00e9.png\n".encode("latin-1"))
    (tmp_path / "l.jsonl").write_bytes('{"image_id": "a", "path": "a.png"}\n'
                                       '{"image_id": "\u00e9", "path": "a.png"}\n'
                                       .encode("latin-1"))
    for name in ("l.tsv", "l.jsonl"):
        with pytest.raises(SourceError, match=rf"{name}:2: not UTF-8 text"):
            list_images(str(tmp_path / name))


def test_image_list_with_classic_mac_line_ends_reads_line_by_line(tmp_path):
    # the lists were read in text mode, where a lone CR ends a line; the shared line reader
    # splits at line feeds, and read such a list as one line (a malformed-line error)
    write_images(tmp_path, ["a.png", "b.png"])
    (tmp_path / "l.tsv").write_bytes(b"\xef\xbb\xbfa\ta.png\rb\tb.png\r")
    (tmp_path / "l.jsonl").write_bytes(b'{"image_id": "a", "path": "a.png"}\r\r'
                                       b'{"image_id": "b", "path": "b.png"}')
    for name, lines in (("l.tsv", (1, 2)), ("l.jsonl", (1, 3))):
        items = list_images(str(tmp_path / name))
        assert [(i.id, Path(i.path).name) for i in items] == [("a", "a.png"), ("b", "b.png")]
        assert [i.where for i in items] == [f"{tmp_path / name}:{n}" for n in lines]


def test_listing_a_folder_stats_only_its_links(tmp_path, monkeypatch):
    # the directory listing says which entries are files: a stat per image (Path.is_file) was
    # a network round trip per image of a million-image folder before any work
    write_images(tmp_path / "store", ["c.png"])
    names = [f"{i}.png" for i in range(6)] + [f"sub/{i}.jpg" for i in range(4)]
    write_images(tmp_path / "images", names)
    os.symlink(tmp_path / "store", tmp_path / "images" / "linked")
    os.symlink(tmp_path / "store" / "c.png", tmp_path / "images" / "one.png")
    stats = []
    real_stat = os.stat

    def counting_stat(path, *args, **kwargs):
        stats.append(str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting_stat)
    items = list_images(str(tmp_path / "images"))
    monkeypatch.undo()
    assert len(items) == len(names) + 2 and {"linked/c", "one"} <= {i.id for i in items}
    # (the SOURCE itself is stat'ed to tell its kind, and the file link to tell where it goes)
    image_stats = [p for p in stats if p.endswith((".png", ".jpg")) and not p.endswith("one.png")]
    assert image_stats == []
