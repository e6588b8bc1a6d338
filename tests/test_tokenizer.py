"""MLMTokenizer: training, special ids, save/load round trips, and loading by (and from) transformers."""
import json
import os

import pytest

from mlmfast.data import builtin_corpus
from mlmfast.errors import UserError
from mlmfast.tokenizer import MLMTokenizer, train_tokenizer

TEXTS = [
    "Hello, World! The quick brown fox jumps over the lazy dog.",
    "Ünïcödé café naïve résumé, Straße; 北京 and 東京 are cities.",
    "def f(x):\n\treturn x ** 2  # squares, don't they?",
    "UPPER lower MiXeD 12345 3.14159 e-mail@example.com",
    "",
    "a [MASK] b",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]


@pytest.fixture(scope="module")
def corpus():
    return builtin_corpus()[:800]


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer(corpus, vocab_size=1500)


@pytest.fixture(scope="module")
def tok_cased(corpus):
    return train_tokenizer(corpus, vocab_size=1500, lowercase=False)


def test_train_special_ids(tok):
    assert [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id] == [
        0, 1, 2, 3, 4]
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tok.special_token_ids == [0, 1, 2, 3, 4]
    assert tok.mask_token == "[MASK]"
    assert 100 < tok.vocab_size <= 1500 and len(tok) == tok.vocab_size
    assert tok.lowercase
    assert any(t.startswith("##") for t in tok.get_vocab())


def test_encode_and_inverse_ops(tok):
    ids = tok.encode_batch(TEXTS)
    assert len(ids) == len(TEXTS) and ids[4] == []
    assert all(tok.cls_token_id not in row and tok.sep_token_id not in row for i, row in enumerate(ids) if i != 5)
    assert tok.encode_for_model(TEXTS[0]) == [tok.cls_token_id, *ids[0], tok.sep_token_id]
    assert tok.convert_tokens_to_ids(tok.tokenize(TEXTS[0])) == ids[0]
    assert tok.convert_ids_to_tokens(ids[0]) == tok.tokenize(TEXTS[0])
    assert tok.convert_tokens_to_ids("no-such-token-xyz") == tok.unk_token_id
    assert tok.decode(tok.encode_for_model("The quick fox.")) == "the quick fox."
    assert tok.decode(tok.encode_for_model("The quick fox."), skip_special_tokens=False).startswith("[CLS]")
    with pytest.raises(TypeError):
        tok.encode_batch("one string")


def test_word_ids_follow_wordpiece(tok):
    ids, words = tok.encode_batch_with_words(TEXTS)
    assert ids == tok.encode_batch(TEXTS)
    for row, wrow in zip(ids, words):
        assert len(row) == len(wrow)
        tokens = tok.convert_ids_to_tokens(row)
        for k, (t, w) in enumerate(zip(tokens, wrow)):
            if k == 0:
                assert w == 0
            elif t.startswith("##"):
                assert w == wrow[k - 1]  # a continuation belongs to the previous token's word
            else:
                assert w == wrow[k - 1] + 1


def test_save_load_round_trip(tok, tmp_path):
    out = tok.save(tmp_path / "tok")
    assert sorted(os.listdir(out)) == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
                                       "vocab.txt"]  # no temporary files left behind
    vocab_lines = (out / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
    assert vocab_lines == tok.convert_ids_to_tokens(range(tok.vocab_size))
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["do_lower_case"] is True and config["mask_token"] == "[MASK]"
    loaded = MLMTokenizer.load(out)
    assert loaded.fingerprint() == tok.fingerprint()
    assert loaded.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
    assert loaded.special_token_ids == tok.special_token_ids
    tok.save(out)  # overwriting is fine


@pytest.mark.parametrize("cased", [False, True])
def test_vocab_txt_only_load(tok, tok_cased, cased, tmp_path):
    ref = tok_cased if cased else tok
    out = ref.save(tmp_path / "tok")
    (out / "tokenizer.json").unlink()
    loaded = MLMTokenizer.load(out)  # BERT WordPiece over vocab.txt; do_lower_case from tokenizer_config.json
    assert loaded.lowercase is not cased
    assert loaded.encode_batch(TEXTS) == ref.encode_batch(TEXTS)
    assert loaded.encode_for_model(TEXTS[0]) == ref.encode_for_model(TEXTS[0])
    assert loaded.special_token_ids == ref.special_token_ids


@pytest.mark.parametrize("cased", [False, True])
def test_transformers_loads_our_directory(tok, tok_cased, cased, tmp_path):
    transformers = pytest.importorskip("transformers")
    ref = tok_cased if cased else tok
    out = ref.save(tmp_path / "tok")
    for loader in (transformers.BertTokenizerFast, transformers.AutoTokenizer):
        hf = loader.from_pretrained(str(out))
        assert hf.mask_token_id == ref.mask_token_id and hf.pad_token_id == ref.pad_token_id
        assert hf.cls_token_id == ref.cls_token_id and hf.sep_token_id == ref.sep_token_id
        for text in TEXTS:
            assert hf(text)["input_ids"] == ref.encode_for_model(text), text
            assert hf.tokenize(text) == ref.tokenize(text), text
        assert hf.decode(hf("The quick fox.")["input_ids"], skip_special_tokens=True) == ref.decode(
            ref.encode_for_model("The quick fox."))
    # the vocab.txt alone is also a valid transformers tokenizer directory
    (out / "tokenizer.json").unlink()
    hf = transformers.BertTokenizerFast.from_pretrained(str(out))
    assert [hf(t)["input_ids"] for t in TEXTS] == [ref.encode_for_model(t) for t in TEXTS]


def _bert_like_vocab():
    # real BERT layout: [PAD]=0, [unused*], [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103
    words = ["the", "cat", "sat", "on", "mat", "a", "dog", "##s", "##ed", "run", ".", ",", "!", "b"]
    return ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words


def test_load_directory_saved_by_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    src = tmp_path / "vocab_only"
    src.mkdir()
    (src / "vocab.txt").write_text("\n".join(_bert_like_vocab()) + "\n", encoding="utf-8")
    ours_from_vocab = MLMTokenizer.load(src)
    hf = transformers.BertTokenizerFast.from_pretrained(str(src))
    saved = tmp_path / "hf_saved"
    hf.save_pretrained(str(saved))
    ours = MLMTokenizer.load(saved)
    assert [ours.pad_token_id, ours.unk_token_id, ours.cls_token_id, ours.sep_token_id, ours.mask_token_id] == [
        0, 100, 101, 102, 103]
    assert ours.special_token_ids == [0, 100, 101, 102, 103]
    texts = ["The cats sat on a mat.", "A dog runs!", "The Zebra ran, b."]
    for text in texts:
        assert ours.encode_for_model(text) == hf(text)["input_ids"]
        assert ours_from_vocab.encode_for_model(text) == hf(text)["input_ids"]
    assert ours.encode_batch(texts) == ours_from_vocab.encode_batch(texts)
    assert ours.unk_token_id in ours.encode_batch(["zebra"])[0]


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist.*mlmfast tokenizer"):
        MLMTokenizer.load(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=f"no tokenizer in {empty}.*tokenizer.json or vocab.txt"):
        MLMTokenizer.load(empty)
    nomask = tmp_path / "nomask"
    nomask.mkdir()
    vocab = [t for t in _bert_like_vocab() if t != "[MASK]"]
    (nomask / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"nomask.*\[MASK\].*mlmfast tokenizer"):
        MLMTokenizer.load(nomask)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="could not read"):
        MLMTokenizer.load(bad)


def test_train_errors():
    with pytest.raises(UserError, match="vocab_size"):
        train_tokenizer(["some text"], vocab_size=3)
    with pytest.raises(UserError, match="empty"):
        train_tokenizer([])
