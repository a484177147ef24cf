"""Review findings on the tokenizer files (stage 2): each test failed before its fix."""

import json

from babymerge.model import IMAGE_TOKEN
from babymerge.tokenizer import iter_lines, load_tokenizer
from test_data_fixtures import world  # noqa: F401  (world: fixture)


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
