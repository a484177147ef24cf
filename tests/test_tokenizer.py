"""babymerge.tokenizer: the trained tokenizer loads as transformers' Llama tokenizer and segments
like its training, the BOS + image prefix convention, its files loadable by transformers 4 (the
BabyLM evaluation pipeline's), the word/subword statistics, reading the corpus, and the CLI."""

import json

import pytest
from click.testing import CliRunner
from tokenizers import Tokenizer
from transformers import AutoTokenizer, LlamaTokenizer

from babymerge.cli import main
from babymerge.model import IMAGE_TOKEN, image_prefix_ids
from babymerge.tokenizer import (TokenizerConfig, TokenizerError, iter_lines, load_tokenizer,
                                 train_tokenizer, word_start_mask)
from fixtures import world  # noqa: F401  (fixture)


def test_auto_tokenizer_is_llama_and_segments_like_the_bert_pretokenized_training(world):
    tok = AutoTokenizer.from_pretrained(world["tokenizer"])
    assert isinstance(tok, LlamaTokenizer) and tok.is_fast
    trained = Tokenizer.from_file(str(world["tokenizer"] / "bpe_bert_pretokenizer.json"))
    lines = list(iter_lines([world["text"], world["captions"].with_suffix(".txt")]))
    lines += ["Odd  spacing, (brackets) and \u201cquotes\u201d: don't!", "unseen zebra-words 42",
              "na\u00efve caf\u00e9 \u4f60\u597d!"]  # unseen characters go to byte tokens
    for line in lines:
        ids = tok(line, add_special_tokens=False).input_ids
        assert ids == trained.encode(line, add_special_tokens=False).ids, line
        if "  " not in line:
            assert tok.decode(ids) == line  # exact round trip of normalised text


def test_bos_then_image_prefix_convention(world):
    tok = load_tokenizer(world["tokenizer"])
    sentence = "the red cat sees the blue dog."
    body = tok(sentence, add_special_tokens=False).input_ids
    # the evaluation pipeline's "<image> " + sentence, BOS added by the tokenizer
    assert tok("<image> " + sentence).input_ids == image_prefix_ids(tok) + body
    assert tok(sentence).input_ids == [tok.bos_token_id] + body
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id,
                tok.convert_tokens_to_ids(IMAGE_TOKEN)}) == 5
    assert tok.padding_side == "right"
    # one word-start token per whitespace word
    assert word_start_mask(tok)[body].sum() == len(sentence.split())


def test_reports_word_to_subword_ratio(world):
    record = json.loads((world["tokenizer"] / "babymerge_tokenizer.json").read_text())
    stats = record["stats"]
    assert stats["subwords_per_word"] == pytest.approx(stats["subwords"] / stats["words"], abs=1e-3)
    assert 1.0 <= stats["subwords_per_word"] < 2.0


def test_cli_and_empty_corpus_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(TokenizerError, match="empty"):
        train_tokenizer(TokenizerConfig(corpus=[empty], out=tmp_path / "tok"))
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat.\nthe dog sat too.\n" * 20)
    result = CliRunner().invoke(main, ["tokenizer", str(corpus), "--out", str(tmp_path / "tok"),
                                       "--vocab-size", "300", "--min-frequency", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["vocab_size"] <= 300
    assert load_tokenizer(tmp_path / "tok").convert_tokens_to_ids(IMAGE_TOKEN) == 4
    result = CliRunner().invoke(main, ["tokenizer", str(tmp_path / "nope.txt")])
    assert result.exit_code == 2 and "not a file" in result.output


def _loadable_by_transformers_4(directory) -> None:
    # transformers 4.50-4.57 (the BabyLM evaluation pipeline pins 4.51.3) read
    # extra_special_tokens as a dict: `special_tokens.keys()`; the list transformers 5 wrote
    # made every tokenizer and checkpoint of ours fail to load there with AttributeError
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert isinstance(config.get("extra_special_tokens", {}), dict), config


def test_tokenizer_files_load_in_transformers_4_and_keep_the_named_image_token(world, tmp_path):
    _loadable_by_transformers_4(world["tokenizer"])
    tok = load_tokenizer(world["tokenizer"])
    for step in range(2):  # every checkpoint re-saves the tokenizer it was given
        out = tmp_path / f"resaved{step}"
        tok.save_pretrained(out)
        _loadable_by_transformers_4(out)
        tok = load_tokenizer(out)
        assert tok.image_token_id == tok.convert_tokens_to_ids(IMAGE_TOKEN) == 4
        assert IMAGE_TOKEN in tok.all_special_tokens
        assert tok("<image> the red cat").input_ids[:2] == [tok.bos_token_id, 4]


def test_byte_order_mark_is_not_text(world, tmp_path):
    # U+FEFF is no whitespace to str.split: it stayed on the first line and was tokenised
    plain, marked = tmp_path / "plain.txt", tmp_path / "marked.txt"
    plain.write_text("the red cat.\nthe dog.\n", encoding="utf-8")
    marked.write_text("\ufeffthe red cat.\nthe dog.\n", encoding="utf-8")
    assert list(iter_lines([marked])) == list(iter_lines([plain])) == ["the red cat.", "the dog."]
