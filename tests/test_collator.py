"""MLMCollator against transformers' DataCollatorForLanguageModeling: same keys, shapes, padding and label
convention; masking statistics; pad_to_multiple_of; seeds."""
import math

import pytest
import torch

from mlmfast.collator import MLMCollator
from mlmfast.errors import UserError

transformers = pytest.importorskip("transformers")
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
N_WORDS = 300


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A BERT WordPiece tokenizer from a vocab.txt: offline, no hub."""
    d = tmp_path_factory.mktemp("tok")
    (d / "vocab.txt").write_text("\n".join(SPECIALS + [f"w{i}" for i in range(N_WORDS)]) + "\n")
    return transformers.BertTokenizerFast.from_pretrained(str(d))


def texts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 40, (n,), generator=g).tolist()
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, N_WORDS, (k,), generator=g)) for k in lengths]


def features(tokenizer, n=32, seed=0, special_mask=True):
    return [tokenizer(t, return_special_tokens_mask=special_mask) for t in texts(n, seed)]


@pytest.mark.parametrize("pad_to_multiple_of", [None, 8])
@pytest.mark.parametrize("special_mask", [True, False])
def test_same_keys_shapes_and_padding_as_hf(tokenizer, pad_to_multiple_of, special_mask):
    feats = features(tokenizer, special_mask=special_mask)
    hf = transformers.DataCollatorForLanguageModeling(tokenizer, pad_to_multiple_of=pad_to_multiple_of, seed=0)(feats)
    ours = MLMCollator(tokenizer, pad_to_multiple_of=pad_to_multiple_of, seed=0)(feats)
    assert type(ours) is type(hf)
    assert sorted(ours.keys()) == sorted(hf.keys())
    for k in hf.keys():
        assert ours[k].shape == hf[k].shape and ours[k].dtype == hf[k].dtype, k
    for k in ("attention_mask", "token_type_ids"):
        assert torch.equal(ours[k], hf[k])
    if pad_to_multiple_of:
        assert ours["input_ids"].shape[1] % pad_to_multiple_of == 0
    # unmasked positions keep their ids; labelled positions hold the original ids; padding never labelled
    original = tokenizer.pad(feats, return_tensors="pt", pad_to_multiple_of=pad_to_multiple_of)["input_ids"]
    sel = ours["labels"] != -100
    assert torch.equal(ours["input_ids"][~sel], original[~sel])
    assert torch.equal(ours["labels"][sel], original[sel])
    special = torch.isin(original, torch.tensor(tokenizer.all_special_ids))
    assert not (sel & special).any() and not (sel & (ours["attention_mask"] == 0)).any()


def test_list_inputs_and_left_padding(tokenizer):
    rows = [tokenizer(t)["input_ids"] for t in texts(8, seed=1)]
    hf = transformers.DataCollatorForLanguageModeling(tokenizer, seed=0)(rows)
    ours = MLMCollator(tokenizer, seed=0)(rows)
    assert sorted(ours.keys()) == sorted(hf.keys()) == ["input_ids", "labels"]
    assert ours["input_ids"].shape == hf["input_ids"].shape
    left = transformers.BertTokenizerFast.from_pretrained(tokenizer.name_or_path, padding_side="left")
    out = MLMCollator(left, seed=0)(rows)
    short = min(range(len(rows)), key=lambda i: len(rows[i]))
    assert (out["input_ids"][short, : out["input_ids"].shape[1] - len(rows[short])] == left.pad_token_id).all()


def test_masking_statistics_match_hf(tokenizer):
    feats = features(tokenizer, n=64, seed=2)
    hf_c = transformers.DataCollatorForLanguageModeling(tokenizer, seed=0)
    ours_c = MLMCollator(tokenizer, seed=0)
    stats = {}
    for name, collate in (("hf", hf_c), ("ours", ours_c)):
        n_tok = n_sel = n_mask = n_same = 0
        for _ in range(20):
            b = collate(feats)
            original = tokenizer.pad(feats, return_tensors="pt")["input_ids"]
            eligible = (b["attention_mask"] == 1) & ~torch.isin(original, torch.tensor(tokenizer.all_special_ids))
            sel = b["labels"] != -100
            n_tok += int(eligible.sum())
            n_sel += int(sel.sum())
            n_mask += int((b["input_ids"][sel] == tokenizer.mask_token_id).sum())
            n_same += int((b["input_ids"][sel] == original[sel]).sum())
        stats[name] = (n_sel / n_tok, n_mask / n_sel, n_same / n_sel, n_tok, n_sel)
    p_sel, p_mask, p_same, n_tok, n_sel = stats["ours"]
    assert abs(p_sel - 0.15) < 5 * math.sqrt(0.15 * 0.85 / n_tok)
    assert abs(p_mask - 0.8) < 5 * math.sqrt(0.8 * 0.2 / n_sel)
    assert abs(p_same - 0.1) < 5 * math.sqrt(0.1 * 0.9 / n_sel) + 1 / N_WORDS  # kept, or replaced by itself
    hf_sel = stats["hf"][0]
    assert abs(p_sel - hf_sel) < 6 * math.sqrt(0.15 * 0.85 / n_tok)


def test_seed_determinism(tokenizer):
    feats = features(tokenizer, n=16, seed=3)
    a, b = MLMCollator(tokenizer, seed=5), MLMCollator(tokenizer, seed=5)
    first = [a(feats)["labels"] for _ in range(3)]
    assert all(torch.equal(x, b(feats)["labels"]) for x in first)
    assert not torch.equal(first[0], first[1])  # successive batches get fresh masks
    assert not torch.equal(first[0], MLMCollator(tokenizer, seed=6)(feats)["labels"])
    torch.manual_seed(0)
    x = MLMCollator(tokenizer)(feats)["labels"]  # seed=None: torch's default generator
    torch.manual_seed(0)
    assert torch.equal(x, MLMCollator(tokenizer)(feats)["labels"])


def test_probabilities_and_no_mlm(tokenizer):
    feats = features(tokenizer, n=16, seed=4)
    all_mask = MLMCollator(tokenizer, mask_replace_prob=1.0, random_replace_prob=0.0, mlm_probability=0.5,
                           seed=1)(feats)
    sel = all_mask["labels"] != -100
    assert (all_mask["input_ids"][sel] == tokenizer.mask_token_id).all()
    clm = MLMCollator(tokenizer, mlm=False)(feats)
    hf = transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False)(feats)
    assert torch.equal(clm["labels"], hf["labels"]) and torch.equal(clm["input_ids"], hf["input_ids"])


def test_probability_one_labels_what_hf_labels(tokenizer):
    """mlm_probability = 1.0: every non-special, non-padding token is a target, exactly HF's label set (at p = 1
    the selection is not random); the replacement split stays BERT's."""
    feats = features(tokenizer, n=24, seed=7)
    ours = MLMCollator(tokenizer, mlm_probability=1.0, seed=3)(feats)
    hf = transformers.DataCollatorForLanguageModeling(tokenizer, mlm_probability=1.0)(feats)
    assert torch.equal(ours["labels"], hf["labels"])
    sel = ours["labels"] != -100
    masked = (ours["input_ids"][sel] == tokenizer.mask_token_id).float().mean().item()
    assert 0.7 < masked < 0.9, masked


def test_mlmfast_tokenizer_and_dataloader(tokenizer):
    from mlmfast.tokenizer import MLMTokenizer

    tok = MLMTokenizer.load(tokenizer.name_or_path)  # the same vocab.txt through mlmfast's own tokenizer
    feats = [{"input_ids": [tok.cls_token_id] + ids + [tok.sep_token_id]} for ids in tok.encode_batch(texts(12))]
    loader = torch.utils.data.DataLoader(feats, batch_size=4, collate_fn=MLMCollator(tok, seed=0))
    b = next(iter(loader))
    assert sorted(b) == ["attention_mask", "input_ids", "labels"]
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape


def test_bad_arguments(tokenizer):
    with pytest.raises(UserError, match="return_tensors"):
        MLMCollator(tokenizer, return_tensors="np")
    with pytest.raises(UserError, match="whole_word_mask"):
        MLMCollator(tokenizer, whole_word_mask=True)
    with pytest.raises(UserError, match="exceed"):
        MLMCollator(tokenizer, mask_replace_prob=0.9, random_replace_prob=0.2)
    with pytest.raises(UserError, match="pad_to_multiple_of"):
        MLMCollator(tokenizer, pad_to_multiple_of=0)
    with pytest.raises(UserError, match="return_tensors"):
        MLMCollator(tokenizer)([{"input_ids": [2, 5, 3]}], return_tensors="np")
    with pytest.raises(UserError, match="mlm=False"):
        MLMCollator(tokenizer, mlm_probability=None)


def test_signature_and_call_match_hf(tokenizer):
    """Positional arguments mean what they mean in DataCollatorForLanguageModeling; __call__ takes return_tensors."""
    import inspect

    from transformers import DataCollatorForLanguageModeling

    hf = list(inspect.signature(DataCollatorForLanguageModeling).parameters)
    ours = list(inspect.signature(MLMCollator).parameters)
    assert ours[:len(hf)] == hf
    assert MLMCollator(tokenizer, True, False, 0.4).mlm_probability == 0.4
    assert "labels" in MLMCollator(tokenizer, seed=0)([{"input_ids": [2, 5, 6, 3]}], return_tensors="pt")
    assert "labels" in MLMCollator(tokenizer, mlm=False, mlm_probability=None)([{"input_ids": [2, 5, 3]}])


@pytest.mark.gpu
def test_device_masking(tokenizer, cuda_device):
    feats = features(tokenizer, n=16, seed=5)
    b = MLMCollator(tokenizer, seed=0, device=cuda_device)(feats)
    assert all(v.device.type == "cuda" for v in b.values())
    cpu = MLMCollator(tokenizer, seed=0)(feats)  # same Philox stream on both devices: the same bits
    assert torch.equal(b["labels"].cpu(), cpu["labels"]) and torch.equal(b["input_ids"].cpu(), cpu["input_ids"])
