"""babymerge.images (stage 1's sources and decoding): listing a SOURCE (folders with links, jsonl
and tsv lists, web-dataset .tar shards whole or cut short, a saved ``datasets`` folder) with its
errors, decoding every kind of file to RGB or a recorded failure, EXIF orientation, JPEG drafting,
and the GPU JPEG path (which files are deferred to nvJPEG, the decoder's batching and fallbacks).

On CPU the GPU decoder's ``decode`` is a PIL stand-in with torchvision's signature
(fixtures.pil_decode; torchvision cannot be installed beside the CPU torch here); ``-m gpu`` runs
the real nvJPEG against the workers."""

import io
import json
import os
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from transformers import AutoImageProcessor

from babymerge.featurefile import FAILED, FEATURES, IDS, FeatureTable
from babymerge.features import load_encoder, save_random_dinov2
from babymerge.images import (BadImage, GpuJpegDecoder, ImageDataset, ImageItem, JpegBytes,
                              Preprocess, SourceError, collate, gpu_jpeg_decoder_available,
                              list_images, upright)
from fixtures import (encoder_dir, extract, pil_decode, smooth_image,  # noqa: F401 (a fixture)
                      write_images, write_shard)


# ---------------------------------------------------------------------------------------------
# Listing a SOURCE


def ids_of(path):
    with h5py.File(path, "r") as f:
        return [x.decode() for x in f[IDS][:]]


def test_jsonl_tsv_and_tar_sources(tmp_path, encoder_dir):
    import tarfile

    write_images(tmp_path / "root", ["a.png", "b.jpg", "d/c.png"])
    # Localized Narratives style: one line per narrative, so an image repeats; the path is under
    # --image-root.
    lines = [{"image_id": "a", "path": "a.png", "caption": "x"},
             {"image_id": "b", "path": "b.jpg", "caption": "y"},
             {"image_id": "a", "path": "a.png", "caption": "z"},
             {"image_id": "c", "path": "d/c.png", "caption": "w"}]
    (tmp_path / "ln.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    extract(tmp_path / "ln.jsonl", tmp_path / "j.h5", encoder_dir, image_root=tmp_path / "root")
    assert ids_of(tmp_path / "j.h5") == ["a", "b", "c"]
    # Real Localized Narratives lines carry no path: a template builds it from the line.
    write_images(tmp_path / "oi", ["open_images/a1.jpg", "coco/7.jpg"])
    (tmp_path / "ln2.jsonl").write_text(
        '{"dataset_id": "open_images", "image_id": "a1", "caption": "x"}\n'
        '{"dataset_id": "coco", "image_id": "7", "caption": "y"}\n'
        '{"dataset_id": "coco", "image_id": "7", "caption": "z"}\n')
    extract(tmp_path / "ln2.jsonl", tmp_path / "j2.h5", encoder_dir, image_root=tmp_path / "oi",
            path_column="{dataset_id}/{image_id}.jpg")
    assert ids_of(tmp_path / "j2.h5") == ["a1", "7"]

    (tmp_path / "root" / "list.tsv").write_text("id\tpath\nb\tb.jpg\nc\td/c.png\n")
    extract(tmp_path / "root" / "list.tsv", tmp_path / "t.h5", encoder_dir)
    assert ids_of(tmp_path / "t.h5") == ["b", "c"]

    shards = tmp_path / "shards"
    shards.mkdir()
    for s, keys in enumerate([["k0", "k1"], ["k2"]]):
        with tarfile.open(shards / f"s-{s:02d}.tar", "w") as tar:
            for k in keys:
                tar.add(tmp_path / "root" / "a.png", arcname=f"{k}.png")
                # webdataset's key is up to the first dot: a mask "k.seg.png" is not an image
                # sample of its own, nor does it replace k.png
                tar.add(tmp_path / "root" / "d" / "c.png", arcname=f"{k}.seg.png")
                (tmp_path / "cap.txt").write_text("caption")
                tar.add(tmp_path / "cap.txt", arcname=f"{k}.txt")
    extract(str(shards / "s-{00..01}.tar"), tmp_path / "w.h5", encoder_dir)
    assert ids_of(tmp_path / "w.h5") == ["k0", "k1", "k2"]
    with h5py.File(tmp_path / "w.h5", "r") as w, h5py.File(tmp_path / "j.h5", "r") as j:
        np.testing.assert_array_equal(w[FEATURES][0], j[FEATURES][0])  # same bytes, same feature
    extract(shards, tmp_path / "w2.h5", encoder_dir)  # a folder holding only shards
    assert ids_of(tmp_path / "w2.h5") == ["k0", "k1", "k2"]


def test_datasets_saved_folder_source(tmp_path, encoder_dir):
    """A ``save_to_disk`` folder is memory-mapped in place; a bad image in it is recorded."""
    import datasets

    write_images(tmp_path / "root", ["a.png"])
    good = Image.open(tmp_path / "root" / "a.png")
    features = datasets.Features({"image_id": datasets.Value("string"), "image": datasets.Image()})
    ds = datasets.Dataset.from_dict(
        {"image_id": ["a", "text"], "image": [good, {"bytes": b"not an image", "path": None}]},
        features=features)
    ds.save_to_disk(str(tmp_path / "hf"))
    summary = extract(tmp_path / "hf", tmp_path / "h.h5", encoder_dir, num_workers=1)
    table = FeatureTable(tmp_path / "h.h5", dtype=torch.float32)
    assert table.ids == ["a"] and table.failed["text"].startswith("not an image")
    expected = load_encoder(encoder_dir).encode([good])
    torch.testing.assert_close(table.features, expected, atol=2e-3, rtol=2e-3)
    assert summary["failed"] == 1


def test_duplicate_ids_fail_before_any_work(tmp_path, encoder_dir):
    from babymerge.images import SourceError

    write_images(tmp_path / "imgs", ["x.png", "x.jpg"])
    with pytest.raises(SourceError, match=r"1 duplicate image id\(s\) for different images: 'x'"):
        extract(tmp_path / "imgs", tmp_path / "f.h5", encoder_dir)
    (tmp_path / "l.jsonl").write_text('{"image_id": "x", "path": "imgs/x.png"}\n'
                                      '{"image_id": "x", "path": "imgs/x.jpg"}\n')
    with pytest.raises(SourceError, match=r"l.jsonl:1 and .*l.jsonl:2"):
        extract(tmp_path / "l.jsonl", tmp_path / "f.h5", encoder_dir)
    (tmp_path / "bad.jsonl").write_text('{"image_id": "x"}\n')
    with pytest.raises(SourceError, match=r"bad.jsonl:1: no 'path' key \(set --path-column\)"):
        extract(tmp_path / "bad.jsonl", tmp_path / "f.h5", encoder_dir)
    assert not (tmp_path / "f.h5").exists()


def test_source_errors_name_the_problem(tmp_path, encoder_dir):
    from babymerge.images import SourceError

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    for source, message in [(tmp_path / "empty", "no images in it"),
                            (tmp_path / "nope", "no such file or folder"),
                            (tmp_path / "x-{00..03}.tar", "no .tar shard matches")]:
        with pytest.raises(SourceError, match=message):
            extract(source, tmp_path / "f.h5", encoder_dir)
    (tmp_path / "l.tsv").write_text("a\tb\tc\n")
    with pytest.raises(SourceError, match=r"l.tsv:1: expected 'id<TAB>path'"):
        extract(tmp_path / "l.tsv", tmp_path / "f.h5", encoder_dir)
    (tmp_path / "l.jsonl").write_text("{not json\n")
    with pytest.raises(SourceError, match=r"l.jsonl:1: not valid JSON"):
        extract(tmp_path / "l.jsonl", tmp_path / "f.h5", encoder_dir)
    # on the command line the same errors are a message, not a traceback
    from click.testing import CliRunner

    from babymerge.cli import main

    result = CliRunner().invoke(main, ["extract-features", str(tmp_path / "nope"), "--out",
                                       str(tmp_path / "f.h5"), "--encoder", str(encoder_dir)])
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1 and "Error: SOURCE" in result.output
    assert "no such file or folder" in result.output


def test_symlinked_folders_are_followed_once(tmp_path):
    """Image sets linked in (``images/coco -> /datasets/coco``) are listed."""
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


# ---------------------------------------------------------------------------------------------
# Web-dataset .tar shards cut short


@pytest.mark.parametrize("where", ["header_boundary", "inside_image"])
def test_shard_cut_short_keeps_the_rest_records_and_warns(tmp_path, encoder_dir, where):
    """img2dataset-style web-dataset shards cut short (a download or writer killed)."""
    write_shard(tmp_path / "s-000.tar", 0, 3, seed=0)
    members = write_shard(tmp_path / "s-001.tar", 10000, 3, seed=1)
    data = (tmp_path / "s-001.tar").read_bytes()
    # Cut at the header of the second sample's json (a block boundary: tarfile's iteration just
    # stopped there, silently), or inside the second sample's JPEG (iteration raised ReadError).
    name, offset, offset_data, size = members[5] if where == "header_boundary" else members[3]
    cut = offset if where == "header_boundary" else offset_data + size // 2
    (tmp_path / "s-001.tar").write_bytes(data[:cut])

    with pytest.warns(UserWarning, match=r"s-001\.tar: tar shard cut short"):
        summary = extract(tmp_path / "s-{000..001}.tar", tmp_path / "f.h5", encoder_dir)
    with h5py.File(tmp_path / "f.h5", "r") as f:
        ids = [x.decode() for x in f[IDS][:]]
        failed = dict(zip([x.decode() for x in f[FAILED]["ids"][:]],
                          [x.decode() for x in f[FAILED]["reasons"][:]]))
    assert ids[:3] == ["000000000", "000000001", "000000002"]  # the whole shard is all there
    if where == "header_boundary":
        assert ids[3:] == ["000010000", "000010001"] and not failed
    else:  # the sample whose bytes were cut is recorded, not silently dropped
        assert ids[3:] == ["000010000"] and "cut short" in failed["000010001"]
    assert summary["rows"] + summary["failed"] == 5


def test_whole_shard_lists_without_warning(tmp_path, recwarn):
    write_shard(tmp_path / "s.tar", 7, 2, seed=2)
    assert [i.id for i in list_images(str(tmp_path / "s.tar"))] == ["000000007", "000000008"]
    assert not [w for w in recwarn if "tar" in str(w.message)]


@pytest.mark.parametrize("size", [0, 100])
def test_shard_cut_before_its_first_header_is_skipped_with_a_warning(tmp_path, size):
    """A .tar shard killed before its first header was complete (a 0-byte file, a few bytes) is
    a shard cut short like any other: the run goes on over the others, warning with its name;
    it stopped every run over hundreds of shards with 'not an uncompressed .tar shard'."""
    write_shard(tmp_path / "s-000.tar", 0, 2, seed=0)
    (tmp_path / "s-001.tar").write_bytes(b"\x00" * size)
    with pytest.warns(UserWarning, match=r"s-001.tar: tar shard cut short"):
        items = list_images(str(tmp_path / "s-{000..001}.tar"))
    assert [it.id for it in items] == ["000000000", "000000001"]


def test_a_file_that_is_no_tar_is_still_an_error(tmp_path):
    (tmp_path / "s-000.tar").write_bytes(b"\x1f\x8b" + b"gzip, not tar" * 100)
    with pytest.raises(SourceError, match="not an uncompressed .tar shard"):
        list_images(str(tmp_path / "s-000.tar"))


# ---------------------------------------------------------------------------------------------
# Decoding: every mode to RGB, bad files recorded, JPEG drafting


def _png_header_only(width, height):
    """A PNG whose header claims width x height (a decompression bomb's signature) and no data."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) \
        + chunk(b"IEND", b"")


def test_bad_files_are_converted_or_recorded(tmp_path, encoder_dir):
    rng = np.random.default_rng(3)
    d = tmp_path / "imgs"
    d.mkdir()
    base = smooth_image(rng, 50, 60)
    rgb = {}  # id -> the RGB image its feature must equal
    base.convert("CMYK").save(d / "cmyk.jpg", quality=95)
    rgb["cmyk"] = Image.open(d / "cmyk.jpg").convert("RGB")
    gray16 = (np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(gray16).save(d / "gray16.png")
    assert Image.open(d / "gray16.png").mode == "I;16"
    rgb["gray16"] = base.convert("L").convert("RGB")  # 16 -> 8 bits scaled, not clipped to white
    base.convert("P", palette=Image.Palette.ADAPTIVE).save(d / "palette.png")
    rgb["palette"] = Image.open(d / "palette.png").convert("RGB")
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    rgba.save(d / "rgba.png")
    rgb["rgba"] = Image.alpha_composite(Image.new("RGBA", base.size, "white"), rgba).convert("RGB")
    base.convert("L").save(d / "gray.png")
    rgb["gray"] = base.convert("L").convert("RGB")
    base.save(d / "good.png")
    rgb["good"] = base

    base.save(d / "full.jpg", quality=90)
    data = (d / "full.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[:len(data) // 2])
    (d / "full.jpg").unlink()
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.png").write_text("this is not an image\n")
    (d / "bomb.png").write_bytes(_png_header_only(10_000, 10_000))
    (tmp_path / "list.tsv").write_text("".join(f"{p.stem}\t{p}\n" for p in sorted(d.iterdir()))
                                       + f"missing\t{d / 'missing.png'}\n")

    out = tmp_path / "f.h5"
    summary = extract(tmp_path / "list.tsv", out, encoder_dir, num_workers=2)
    assert summary["rows"] == len(rgb) and summary["failed"] == 5
    table = FeatureTable(out, dtype=torch.float32)
    assert set(table.ids) == set(rgb)
    reasons = table.failed
    assert reasons["truncated"].startswith("truncated or corrupt")
    assert reasons["empty"] == "empty file (0 bytes)"
    assert reasons["notes"].startswith("not an image")
    assert reasons["bomb"].startswith("too large (decompression-bomb guard): 10000x10000")
    assert reasons["missing"].startswith("unreadable (FileNotFoundError")

    encoder = load_encoder(encoder_dir)
    expected = encoder.encode([rgb[i] for i in table.ids])
    torch.testing.assert_close(table.features, expected, atol=2e-3, rtol=2e-3)

    # Failed ids are not retried by default; --retry-failed tries them again.
    base.save(d / "truncated.jpg", quality=90)
    assert extract(tmp_path / "list.tsv", out, encoder_dir)["new"] == 0
    summary = extract(tmp_path / "list.tsv", out, encoder_dir, retry_failed=True)
    assert summary["new"] == 1 and summary["failed"] == 4
    assert "truncated" in FeatureTable(out).row


def test_jpeg_draft_stays_close_to_full_decode(tmp_path):
    """``--jpeg-draft`` (opt-in) lets libjpeg decode a 1280x960 photo at 640x480 (DCT scaling)
    before the resize to 341x256. Measured: mean error 0.5 grey level, max 5, against the processor
    on the full decode; without the draft max 1 grey level. The test bounds the mean at 1 grey
    level."""
    import io
    from dataclasses import replace

    directory = save_random_dinov2(tmp_path / "enc")
    rng = np.random.default_rng(0)
    photo = Image.fromarray((rng.random((60, 80, 3)) * 255).astype(np.uint8)).resize(
        (1280, 960), Image.BICUBIC)
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    processor = AutoImageProcessor.from_pretrained(directory)
    reference = processor([Image.open(io.BytesIO(data))], return_tensors="pt")["pixel_values"][0]
    encoder = load_encoder(directory)
    for draft, mean_bound, max_bound in ((False, 0.05, 1.01), (True, 1.0, 8.0)):
        pixels = replace(encoder.preprocess, jpeg_draft=draft)(data)
        grey_levels = (encoder.normalize(pixels[None])[0] - reference).abs() * encoder.std[0] * 255
        assert grey_levels.mean().item() < mean_bound and grey_levels.max().item() < max_bound


# ---------------------------------------------------------------------------------------------
# EXIF orientation


ORIENTATION = 0x0112


def sideways_jpeg(orientation):
    """A 48x80 (h x w) JPEG whose EXIF says: display rotated (6 = 90 degrees clockwise)."""
    image = smooth_image(np.random.default_rng(3), 48, 80)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def test_exif_rotated_photo_is_encoded_upright_like_datasets(tmp_path, encoder_dir):
    """A photo stored sideways with an EXIF orientation is encoded upright, as ``datasets``
    (the BabyLM evaluation pipeline's image loader) and transformers' ``load_image`` decode
    it."""
    import datasets

    data = sideways_jpeg(6)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "photo.jpg").write_bytes(data)
    # What the evaluation pipeline sees: the datasets Image feature decodes it upright (80x48).
    upright = datasets.Image().decode_example({"bytes": data, "path": None})
    assert upright.size == (48, 80)
    assert upright.size == ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size

    extract(tmp_path / "imgs", tmp_path / "f.h5", encoder_dir)
    got = FeatureTable(tmp_path / "f.h5", dtype=torch.float32).lookup(["photo"])[0]
    encoder = load_encoder(encoder_dir)
    expected = encoder.encode([upright])[0]
    sideways = Image.fromarray(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    stored = encoder.encode([sideways])[0]  # the pixels as stored, no EXIF left on them
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)
    assert (got - stored).abs().max() > 10 * (got - expected).abs().max()
    # A PIL image opened plainly (its EXIF still on it) is encoded as extraction encodes the file
    torch.testing.assert_close(encoder.encode([Image.open(io.BytesIO(data))])[0], got,
                               atol=2e-3, rtol=2e-3)


def test_rotated_jpeg_is_not_deferred_to_nvjpeg():
    """nvJPEG ignores EXIF: a rotated JPEG stays with the workers' PIL decode."""
    preprocess = Preprocess(64, 56, 56, defer_jpeg=True)
    assert preprocess.gpu_decodable(sideways_jpeg(1)) == (80, 48)
    assert preprocess.gpu_decodable(sideways_jpeg(6)) is None
    assert preprocess(sideways_jpeg(6)).shape == (3, 56, 56)


@pytest.mark.parametrize("error", [TypeError, ZeroDivisionError, ValueError])
def test_unwritable_exif_still_turns_the_picture(monkeypatch, error):
    """A photo whose EXIF says how to turn it, but whose EXIF block Pillow cannot write back
    without the orientation tag (its writer has raised TypeError, ZeroDivisionError and
    IndexError on real camera files: python-pillow issues 4238, 7839, 8605), is still decoded
    and turned. Applying the EXIF orientation had put such an image in /failed as a decode error
    (or as 'truncated or corrupt' for a ValueError): an image lost that decoded without it."""
    data = sideways_jpeg(6)
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))

    def broken(self, *args, **kwargs):
        raise error("malformed EXIF value")

    monkeypatch.setattr(Image.Exif, "tobytes", broken)
    got = upright(Image.open(io.BytesIO(data)))
    assert np.array_equal(np.asarray(got), want)
    assert upright(got) is got  # turned once: no orientation left on it
    assert Preprocess(64, 56, 56)(data).shape == (3, 56, 56)


# ---------------------------------------------------------------------------------------------
# The GPU JPEG path: which files are deferred to nvJPEG, the decoder's batching and
# fallbacks


def jpeg_bytes(image, **save_kw):
    buf = io.BytesIO()
    image.save(buf, "JPEG", **save_kw)
    return buf.getvalue()


def test_only_plain_whole_jpegs_are_deferred(encoder_dir):
    preprocess = load_encoder(encoder_dir).preprocess
    rng = np.random.default_rng(0)
    photo = smooth_image(rng, 60, 80)
    baseline = jpeg_bytes(photo)
    assert preprocess.gpu_decodable(baseline) == (80, 60)
    assert preprocess.gpu_decodable(jpeg_bytes(photo.convert("L"))) == (80, 60)
    assert preprocess.gpu_decodable(jpeg_bytes(photo, progressive=True)) is None
    assert preprocess.gpu_decodable(jpeg_bytes(photo.convert("CMYK"))) is None
    assert preprocess.gpu_decodable(baseline[:-100]) is None  # truncated: PIL's check decides
    with pytest.raises(BadImage, match="truncated"):
        preprocess.gpu_decodable(baseline[:200])  # cut inside the header
    png = io.BytesIO()
    photo.save(png, "PNG")
    assert preprocess.gpu_decodable(png.getvalue()) is None
    with pytest.raises(BadImage, match="empty"):
        preprocess.gpu_decodable(b"")
    with pytest.raises(BadImage, match="not an image"):
        preprocess.gpu_decodable(b"\xff\xd8\xff hello")


def test_decoder_matches_workers_and_falls_back(encoder_dir):
    """Batches split by pixel budget, a refused batch retried one by one, a refused image decoded
    by PIL: crops equal the worker path's exactly (the stand-in decodes as PIL does)."""
    preprocess = load_encoder(encoder_dir, jpeg_draft=False).preprocess
    rng = np.random.default_rng(1)
    blobs = [jpeg_bytes(smooth_image(rng, h, w)) for h, w in [(60, 80), (120, 90), (64, 64)]]
    refused = blobs[1]
    calls = []

    def decode(data, device):
        calls.append(len(data))
        if any(d.numpy().tobytes() == refused for d in data):
            raise RuntimeError("nvjpeg refused it")
        return pil_decode(data, device)

    jpegs = [JpegBytes(b, *preprocess.gpu_decodable(b)) for b in blobs]
    decoder = GpuJpegDecoder(preprocess, torch.device("cpu"), decode=decode,
                             max_batch_pixels=80 * 60 + 120 * 90)
    crops = decoder(jpegs)
    # chunks [0, 1] and [2]; chunk [0, 1] refused, then 0 and 1 alone (1 refused -> PIL)
    assert calls == [2, 1, 1, 1]
    for crop, blob in zip(crops, blobs):
        assert torch.equal(crop, preprocess(blob))


def test_decoder_resizes_each_size_once_and_keeps_order(encoder_dir, monkeypatch):
    """A chunk of mixed sizes: one resize_crop call per size, on the stacked images, and each
    crop equals resizing that image alone, bit for bit, at its place in the input order."""
    preprocess = load_encoder(encoder_dir, jpeg_draft=False).preprocess
    rng = np.random.default_rng(7)
    sizes = [(60, 80), (64, 64), (60, 80), (120, 90), (64, 64), (60, 80)]
    blobs = [jpeg_bytes(smooth_image(rng, h, w)) for h, w in sizes]
    alone = [preprocess.resize_crop(image) for image in pil_decode(
        [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs], "cpu")]
    batches = []
    resize_crop = Preprocess.resize_crop

    def spy(self, x):
        batches.append(tuple(x.shape))
        return resize_crop(self, x)

    monkeypatch.setattr(Preprocess, "resize_crop", spy)
    jpegs = [JpegBytes(b, *preprocess.gpu_decodable(b)) for b in blobs]
    crops = GpuJpegDecoder(preprocess, torch.device("cpu"), decode=pil_decode)(jpegs)
    assert batches == [(3, 3, 60, 80), (2, 3, 64, 64), (1, 3, 120, 90)]
    assert len(crops) == len(blobs)
    for crop, expected in zip(crops, alone, strict=True):
        assert crop.shape == expected.shape and torch.equal(crop, expected)


def test_decoder_gives_the_reason_of_an_unusable_image(encoder_dir):
    preprocess = load_encoder(encoder_dir).preprocess
    good = jpeg_bytes(smooth_image(np.random.default_rng(2), 60, 80))
    # a header that claims a size the data does not hold: the decoder refuses, PIL names it
    broken = good[:200] + b"\x00" * 50 + b"\xff\xd9"
    jpegs = [JpegBytes(b, 80, 60)
             for b in (good, broken)]
    out = GpuJpegDecoder(preprocess, torch.device("cpu"), decode=pil_decode)(jpegs)
    assert isinstance(out[0], torch.Tensor) and out[0].dtype == torch.uint8
    assert isinstance(out[1], str) and "truncated or corrupt" in out[1]


def test_decoded_image_of_another_size_than_the_header_goes_to_pil(encoder_dir):
    """An image the decoder returns at a size other than the header's is not resized into a
    crop (it would be one of the right shape, of the wrong picture): PIL decodes it again."""
    preprocess = load_encoder(encoder_dir, jpeg_draft=False).preprocess
    blob = jpeg_bytes(smooth_image(np.random.default_rng(8), 60, 80))

    def transposed(data, device):
        return [image.transpose(1, 2) for image in pil_decode(data, device)]

    crops = GpuJpegDecoder(preprocess, torch.device("cpu"), decode=transposed)(
        [JpegBytes(blob, 80, 60)])
    assert torch.equal(crops[0], preprocess(blob))


def test_cpu_fallback_records_any_decoder_exception(encoder_dir):
    """As in the workers, an unexpected exception of the PIL fallback is one /failed reason."""
    preprocess = load_encoder(encoder_dir).preprocess

    def refuse(data, device):
        raise RuntimeError("nvjpeg refused it")

    decoder = GpuJpegDecoder(preprocess, torch.device("cpu"), decode=refuse)
    decoder.preprocess = lambda data: 1 / 0  # only the fallback calls it like this
    good = jpeg_bytes(smooth_image(np.random.default_rng(7), 60, 80))
    assert decoder([JpegBytes(good, 80, 60)]) == ["decode error (ZeroDivisionError: division by "
                                                  "zero)"]


def test_collate_keeps_deferred_jpegs_apart(tmp_path, encoder_dir):
    preprocess = replace(load_encoder(encoder_dir).preprocess, defer_jpeg=True)
    rng = np.random.default_rng(3)
    data = [jpeg_bytes(smooth_image(rng, 60, 80)),
            jpeg_bytes(smooth_image(rng, 60, 80), progressive=True), b""]
    items = []
    for i, blob in enumerate(data):
        (tmp_path / f"{i}.jpg").write_bytes(blob)
        items.append(ImageItem(id=str(i), path=str(tmp_path / f"{i}.jpg")))
    dataset = ImageDataset(items, preprocess)
    batch = collate([dataset[i] for i in range(3)])
    assert batch.jpegs == [0] and batch.good == [1] and batch.bad == [2]
    assert batch.pixels.shape[0] == 1 and batch.jpeg_bytes[0].width == 80


def test_nvjpeg_probe_needs_a_decode_that_works(monkeypatch):
    """torchvision that imports but cannot decode (built without nvJPEG) counts as absent."""
    import sys
    import types

    from babymerge import images

    def probe(decode_jpeg):
        fake = types.ModuleType("torchvision.io")
        fake.ImageReadMode = types.SimpleNamespace(RGB="RGB")
        fake.decode_jpeg = decode_jpeg
        monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
        monkeypatch.setitem(sys.modules, "torchvision.io", fake)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        images.gpu_jpeg_decoder_available.cache_clear()
        try:
            return images.gpu_jpeg_decoder_available()
        finally:
            images.gpu_jpeg_decoder_available.cache_clear()

    def broken(data, mode, device):
        raise RuntimeError("torchvision was not compiled with nvjpeg support")

    assert probe(broken) is False
    assert probe(lambda data, mode, device: pil_decode(data, "cpu")) is True


@pytest.mark.gpu
@pytest.mark.parametrize("subsampling, mean_levels, min_cosine", [(0, 1.0, 0.999),
                                                                  (2, 2.5, 0.998)],
                         ids=["444", "420"])
def test_nvjpeg_against_workers_on_cuda(tmp_path, subsampling, mean_levels, min_cosine):
    """Real nvJPEG vs PIL at DINOv2's geometry on photo-like images. With full-resolution chroma
    (4:4:4) only the IDCT's rounding differs: crops agree to a mean under one grey level. With
    4:2:0 chroma (most photos) nvJPEG repeats chroma samples where libjpeg interpolates: about a
    grey level on average, more at colour edges (an emulation with libjpeg-turbo's
    non-interpolating upsampling gave a mean of 0.8 to 1.3 and a feature cosine >= 0.9988)."""
    if not (torch.cuda.is_available() and gpu_jpeg_decoder_available()):
        pytest.skip("needs CUDA and torchvision")
    encoder = load_encoder(save_random_dinov2(tmp_path / "enc"), "cuda", jpeg_draft=False)
    rng = np.random.default_rng(5)
    blobs = [jpeg_bytes(smooth_image(rng, h, w), quality=90, subsampling=subsampling)
             for h, w in [(480, 640), (375, 500), (640, 427), (256, 256), (1000, 1500),
                          (480, 640), (256, 256)]]
    jpegs = [JpegBytes(b, *encoder.preprocess.gpu_decodable(b)) for b in blobs]
    decoder = GpuJpegDecoder(encoder.preprocess, torch.device("cuda"))
    gpu = torch.stack(decoder(jpegs))
    for crop, jpeg in zip(gpu, jpegs):  # resized with its size group = resized alone, exactly
        alone = encoder.preprocess.resize_crop(decoder.decode([jpeg.tensor()], device="cuda")[0])
        assert torch.equal(crop, alone)
    cpu = torch.stack([encoder.preprocess(b) for b in blobs]).cuda()
    diff = (gpu.float() - cpu.float()).abs()
    assert diff.mean().item() < mean_levels, diff.mean().item()
    a, b = encoder.encode_pixels(gpu), encoder.encode_pixels(cpu)
    assert torch.nn.functional.cosine_similarity(a, b).min().item() > min_cosine


def test_a_brace_range_with_missing_shards_is_an_error(tmp_path):
    """A range names each shard: one absent would lose its images silently (~10k per CC3M
    shard). A glob takes what is there."""
    for key, name in ((0, "00000.tar"), (10, "00002.tar")):
        write_shard(tmp_path / name, key, 1, seed=key)
    with pytest.raises(SourceError, match=r"1 of the 3 shards it names are missing "
                                          r"\(.*00001.tar\); .*glob"):
        list_images(f"{tmp_path}/{{00000..00002}}.tar")
    assert len(list_images(f"{tmp_path}/*.tar")) == 2


def test_files_left_out_for_their_extension_are_counted(tmp_path):
    """An image saved under an extension that is not read vanished without a word; now every
    such file is counted and named (captions and other sidecars are not images: not counted).
    MPO (cameras' multi-picture JPEG) and APNG are read."""
    write_images(tmp_path, ["a.png", "b.mpo", "c.apng"])
    (tmp_path / "a.txt").write_text("a caption")
    (tmp_path / "d.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (tmp_path / "e.jp2").write_bytes(b"\x00\x00\x00\x0cjP  ")
    with pytest.warns(UserWarning, match=r"3 image\(s\) taken, 2 file\(s\) skipped for their "
                                         r"extension \(.heic x1, .jp2 x1; e.g. d.heic, e.jp2\)"):
        items = list_images(str(tmp_path))
    assert sorted(i.id for i in items) == ["a", "b", "c"]


def test_a_tsv_of_urls_is_refused_naming_the_format(tmp_path):
    tsv = tmp_path / "Train_GCC-training.tsv"
    tsv.write_text("a dog on a beach\thttps://example.com/1.jpg\n")
    with pytest.raises(SourceError, match=r"Train_GCC-training.tsv:1: the path is a URL.*"
                                          r"'caption<TAB>url', is not"):
        list_images(str(tsv))


def test_every_id_clash_is_named(tmp_path):
    write_images(tmp_path, ["x.jpg", "x.png", "y.jpg", "y.webp", "z.png"])
    with pytest.raises(SourceError, match=r"2 duplicate image id\(s\) for different images: "
                                          r"'x' .*; 'y' "):
        list_images(str(tmp_path))


def test_an_id_template_keeps_two_datasets_bare_ids_apart(tmp_path):
    """Localized Narratives' COCO and Flickr30k ids are bare numbers: "7" of each is another
    image. As a key they clash (refused, naming both); as a template they are kept apart."""
    write_images(tmp_path / "root", ["coco/7.jpg", "flickr30k/7.jpg"])
    (tmp_path / "ln.jsonl").write_text(
        '{"dataset_id": "coco", "image_id": "7"}\n'
        '{"dataset_id": "flickr30k", "image_id": "7"}\n')
    template = "{dataset_id}/{image_id}.jpg"
    with pytest.raises(SourceError, match="'7'"):
        list_images(str(tmp_path / "ln.jsonl"), tmp_path / "root", path_column=template)
    items = list_images(str(tmp_path / "ln.jsonl"), tmp_path / "root", path_column=template,
                        id_column="{dataset_id}_{image_id}")
    assert [(i.id, Path(i.path).relative_to(tmp_path / "root").as_posix()) for i in items] == [
        ("coco_7", "coco/7.jpg"), ("flickr30k_7", "flickr30k/7.jpg")]


def test_the_shards_a_pattern_meant_are_recorded(tmp_path, encoder_dir):
    """The saved config kept only the folder: which shards a range or glob took is now in it."""
    import json

    import h5py

    for key, name in ((0, "00000.tar"), (10, "00001.tar")):
        write_shard(tmp_path / name, key, 1, seed=key)
    extract(f"{tmp_path}/{{00000..00001}}.tar", tmp_path / "f.h5", encoder_dir)
    with h5py.File(tmp_path / "f.h5") as f:
        assert json.loads(f.attrs["config"])["shards"] == ["00000.tar", "00001.tar"]
