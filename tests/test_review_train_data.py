"""Review findings on training data (stage 2): each test failed before its fix."""

import json

import numpy as np
import pytest

from babymerge.data import DataError, load_captions
from babymerge.featurefile import FeatureTable
from babymerge.tokenizer import load_tokenizer, word_start_mask
from test_data_fixtures import world  # noqa: F401  (world: fixture)


@pytest.fixture(scope="module")
def tok(world):
    return load_tokenizer(world["tokenizer"])


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
