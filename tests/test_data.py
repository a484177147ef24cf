"""babymerge.data: the text corpus tokenised once into a cache and packed behind the image
prefix, captions joined to their features (skipped, cut and malformed captions reported), the
epoch plan over both sources, and the tokenizer fingerprint that caches and resumed runs compare."""

import json

import numpy as np
import pytest
import torch

from babymerge.data import (CAPTIONS, IGNORE_INDEX, TEXT, DataError, EpochPlan, load_captions,
                            load_text, tokenize_file)
from babymerge.featurefile import FeatureTable
from babymerge.model import IMAGE_TOKEN, image_prefix_ids
from babymerge.tokenizer import iter_lines, load_tokenizer, word_start_mask
from fixtures import caption_of, world  # noqa: F401  (world: fixture)


@pytest.fixture(scope="module")
def tok(world):
    return load_tokenizer(world["tokenizer"])


def test_corpus_cached_once_and_packed_behind_the_image_prefix(world, tok, tmp_path):
    first = tokenize_file(world["text"], tok, tmp_path, "text", progress=False)
    cached = sorted(tmp_path.iterdir())
    stamps = [p.stat().st_mtime_ns for p in cached]
    again = tokenize_file(world["text"], tok, tmp_path, "text", progress=False)
    assert [p.stat().st_mtime_ns for p in sorted(tmp_path.iterdir())] == stamps  # reused
    assert isinstance(again.tokens, np.memmap)
    lines = list(iter_lines([world["text"]]))
    stream = sum((tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id]
                  for t in lines), [])
    assert first.tokens.tolist() == stream and first.meta["documents"] == len(lines)

    seq_len = 24
    packed = load_text([world["text"], world["text"]], tok, tmp_path, seq_len, progress=False)
    chunk = seq_len - 2
    assert len(packed) == 2 * len(stream) // chunk
    idx = np.array([0, len(stream) // chunk, len(packed) - 1])  # incl. one across the two files
    batch = packed.batch(idx)
    both = stream + stream
    for row, i in zip(batch["input_ids"].tolist(), idx):
        assert row == image_prefix_ids(tok) + both[i * chunk:(i + 1) * chunk]
    assert (batch["labels"][:, :2] == IGNORE_INDEX).all()
    assert torch.equal(batch["labels"][:, 2:], batch["input_ids"][:, 2:])
    # words are counted from word-start tokens: whitespace words of what was packed
    n_words = sum(len(t.split()) for t in lines)
    assert packed.words.sum() == word_start_mask(tok)[np.array(both[:len(packed) * chunk])].sum()
    assert abs(packed.words.sum() - 2 * n_words) <= 2 * chunk


def test_image_token_written_in_text_stays_text(tok, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("look <image> here\n")
    tf = tokenize_file(corpus, tok, tmp_path / "cache", "text", progress=False)
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) not in tf.tokens.tolist()


def test_captions_join_features_and_skip_missing_with_a_warning(world, tok, tmp_path):
    table = FeatureTable(world["features"])
    with pytest.warns(UserWarning, match=r"1 image failed in feature extraction, 1 image id not "
                                         r"in feature file; 128 kept"):
        caps = load_captions([world["captions"]], tok, tmp_path, 64, table, progress=False)
    assert len(caps) == len(world["ids"])
    idx = np.array([3, 0, 7])
    batch = caps.batch(idx)
    assert torch.equal(batch["features"], table.lookup([world["ids"][i] for i in idx]))
    for r, i in enumerate(idx):
        want = (image_prefix_ids(tok) + tok(caption_of(int(i)), add_special_tokens=False).input_ids
                + [tok.eos_token_id])
        row = batch["input_ids"][r].tolist()
        assert row[:len(want)] == want and set(row[len(want):]) <= {tok.pad_token_id}
        labels = batch["labels"][r].tolist()
        assert labels[2:len(want)] == want[2:] and set(labels[:2] + labels[len(want):]) == {-100}
    assert caps.words[0] == len(caption_of(0).split())
    # cut to --seq-len: the prefix and the first caption tokens, EOS only where it fits
    want = image_prefix_ids(tok) + tok(caption_of(0), add_special_tokens=False).input_ids
    for seq_len in (4, len(want), len(want) + 1):
        with pytest.warns(UserWarning):
            short = load_captions([world["captions"]], tok, tmp_path, seq_len, table,
                                  progress=False)
        row = short.batch(np.array([0, 1]))["input_ids"][0].tolist()
        assert row == (want + [tok.eos_token_id])[:seq_len]


def test_bad_caption_and_corpus_inputs_are_clear_errors(world, tok, tmp_path):
    table = FeatureTable(world["features"])
    absent = tmp_path / "absent.tsv"
    absent.write_text("nope1\ta red cat.\nnope2\ta blue dog.\n")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no usable caption"):
        load_captions([absent], tok, tmp_path, 32, table, progress=False)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"image_id": "img000", "caption": "x"}) + "\n{\"image_id\": 1}\n")
    with pytest.raises(DataError, match=r"broken.jsonl:2: expected a JSON object"):
        load_captions([broken], tok, tmp_path, 32, table, progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty.txt: no text"):
        load_text([empty], tok, tmp_path, 32, progress=False)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("the cat.\nthe caf\u00e9.\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt:2: not UTF-8"):
        load_text([latin1], tok, tmp_path, 32, progress=False)


def test_epoch_plan_orders_and_rank_slices(world, tok, tmp_path):
    table = FeatureTable(world["features"])
    text = load_text([world["text"]], tok, tmp_path, 16, progress=False)
    with pytest.warns(UserWarning):
        caps = load_captions([world["captions"]], tok, tmp_path, 16, table, progress=False)
    sources = {TEXT: text, CAPTIONS: caps}
    mixed = EpochPlan(sources, 8, 2, "mixed", per_step=2, seed=1)
    kinds = [s for s, _ in mixed.batches(0)]
    assert set(kinds) == {TEXT, CAPTIONS} and kinds != sorted(kinds)  # interleaved
    again = EpochPlan(sources, 8, 2, "mixed", per_step=2, seed=1).batches(0)
    assert all(a[0] == b[0] and np.array_equal(a[1], b[1]) for a, b in zip(mixed.batches(0), again))
    assert not np.array_equal(mixed.batches(0)[0][1], mixed.batches(1)[0][1])
    mm_first = EpochPlan(sources, 8, 2, "multimodal-first", per_step=2, seed=1)
    assert ([{s for s, _ in mm_first.batches(e)} for e in range(4)]
            == [{CAPTIONS}] * 2 + [{TEXT}] * 2)
    text_first = EpochPlan(sources, 8, 2, "text-first", per_step=2, seed=1)
    assert ([{s for s, _ in text_first.batches(e)} for e in range(4)]
            == [{TEXT}] * 2 + [{CAPTIONS}] * 2)
    # every caption appears exactly once per epoch it is in (minus the dropped tail)
    seen = np.concatenate([i for s, i in mm_first.batches(0)])
    assert len(np.unique(seen)) == len(seen) and len(seen) >= len(caps) - 8 * 2
    # two ranks x accumulation 2 split each step's 4 global batches between them, no overlap
    plan = EpochPlan(sources, 4, 1, "mixed", per_step=4, seed=0)
    batches = plan.batches(0)
    for step in range(plan.steps[0]):
        mine = [id(b) for r in range(2) for b in plan.step_batches(batches, step, r, 2, 2)]
        assert sorted(mine) == sorted(id(b) for b in batches[step * 4:(step + 1) * 4])


def test_captions_cut_to_seq_len_are_reported_and_count_only_kept_words(world, tok, tmp_path):
    # a Localized Narratives caption can run to hundreds of words: what --seq-len cuts off was
    # dropped without a word, and still counted in the word budget (the checkpoint schedule)
    long = " ".join(["the red cat sees the blue dog."] * 12)
    captions = tmp_path / "long.jsonl"
    captions.write_text("".join(json.dumps({"image_id": f"img{i:03d}", "caption": c}) + "\n"
                                for i, c in enumerate(["a red cat is here.", long])))
    table = FeatureTable(world["features"])
    seq_len = 24
    with pytest.warns(UserWarning, match=r"1 caption longer than --seq-len 24 cut"):
        caps = load_captions([captions], tok, tmp_path / "cache", seq_len, table,
                             progress=False)
    body = tok(long, add_special_tokens=False).input_ids
    kept = body[:seq_len - 2]
    assert caps.truncated == {"captions": 1, "tokens": len(body) - len(kept)}
    assert caps.words[1] == word_start_mask(tok)[np.array(kept)].sum() < len(long.split())
    assert caps.words[0] == 5


def test_caption_that_is_not_a_string_is_an_error(world, tok, tmp_path):
    # json null became the caption "None"
    captions = tmp_path / "null.jsonl"
    captions.write_text(json.dumps({"image_id": "img000", "caption": "a red cat."}) + "\n"
                        + json.dumps({"image_id": "img001", "caption": None}) + "\n")
    with pytest.raises(DataError, match=r"null.jsonl:2: .*caption"):
        load_captions([captions], tok, tmp_path / "cache", 32, FeatureTable(world["features"]),
                      progress=False)


def test_caption_ids_absent_from_the_feature_file_are_shown_beside_its_ids(world, tok, tmp_path):
    # only counts were given: an id format mismatch (zero padding, a dataset prefix) read as
    # "N image id not in feature file" with nothing to compare
    absent = tmp_path / "absent.tsv"
    absent.write_text("7\ta red cat.\n8\ta blue dog.\n")
    with pytest.warns(UserWarning, match="caption ids '7', '8'"), \
            pytest.raises(DataError, match=r"caption ids '7', '8'; the feature file's ids look "
                                           r"like 'img000', 'img001', 'img002'"):
        load_captions([absent], tok, tmp_path / "cache", 32, FeatureTable(world["features"]),
                      progress=False)


def test_tsv_empty_caption_is_skipped_and_a_byte_order_mark_is_no_error(world, tok, tmp_path):
    # "id<TAB>" lost its tab to strip() and stopped the run as a malformed line; a BOM made a
    # jsonl file's first line invalid JSON and a TSV file's first id unknown
    tsv = tmp_path / "c.tsv"
    tsv.write_bytes("\ufeffimg000\ta red cat is here.\r\nimg001\t\r\nimg002\ta dog.\n"
                    .encode("utf-8"))
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_bytes(("\ufeff" + json.dumps({"image_id": "img000", "caption": "a red cat."})
                       + "\n").encode("utf-8"))
    table = FeatureTable(world["features"])
    with pytest.warns(UserWarning, match=r"captions skipped .*: 1 empty caption; 2 kept$"):
        caps = load_captions([tsv], tok, tmp_path / "cache", 32, table, progress=False)
    assert caps.rows.tolist() == [table.row["img000"], table.row["img002"]]
    caps = load_captions([jsonl], tok, tmp_path / "cache", 32, table, progress=False)
    assert caps.rows.tolist() == [table.row["img000"]]


def test_tokenizer_fingerprint_is_its_content_not_its_runtime_state(world, tok, tmp_path):
    """The fingerprint that a resumed run and the token cache compare: a tokenizer that was
    called with truncation and padding (transformers leaves them set on the backend) is still
    the same tokenizer; another vocabulary is not."""
    from babymerge.data import tokenizer_fingerprint
    from babymerge.tokenizer import TokenizerConfig, train_tokenizer

    before = tokenizer_fingerprint(tok)
    tok.backend_tokenizer.enable_truncation(max_length=7)
    tok.backend_tokenizer.enable_padding(length=9, pad_id=tok.pad_token_id)
    try:
        assert tokenizer_fingerprint(tok) == before
    finally:
        tok.backend_tokenizer.no_truncation()
        tok.backend_tokenizer.no_padding()
    corpus = tmp_path / "other.txt"
    corpus.write_text("zebras quietly juggle violet umbrellas.\n" * 50)
    other = train_tokenizer(TokenizerConfig(corpus=[corpus], out=tmp_path / "tok",
                                            vocab_size=400, progress=False))["out"]
    assert tokenizer_fingerprint(load_tokenizer(other)) != before


def test_tokenizer_fingerprint_tells_apart_tokenizers_that_split_differently(world, tok, tmp_path):
    """Transformers rebuilds our tokenizer from its vocabulary and merges, and what else it reads
    (here tokenizer_config.json's add_prefix_space) changes how it splits: the same vocabulary,
    merges and added tokens with other ids for every line. A token cache or a resumed run made
    with one must not be taken for the other."""
    import shutil

    from babymerge.data import tokenizer_fingerprint

    other_dir = shutil.copytree(world["tokenizer"], tmp_path / "no_prefix_space")
    config_path = other_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "add_prefix_space": False}))
    other = load_tokenizer(other_dir)
    assert other.get_vocab() == tok.get_vocab()
    text = "the red cat sees the blue dog."
    assert (other(text, add_special_tokens=False)["input_ids"]
            != tok(text, add_special_tokens=False)["input_ids"])
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)
    assert tokenizer_fingerprint(load_tokenizer(world["tokenizer"])) == tokenizer_fingerprint(tok)
