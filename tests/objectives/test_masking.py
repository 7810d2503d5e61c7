import pytest
import torch

from objectives import IGNORE_INDEX, gather_selected, mask_tokens
from objectives.masking import gather_at, max_selected, selected_positions
from tests.helpers import CLS, MASK, PAD, SEP, SPECIAL_IDS

VOCAB = 1000


def corpus(rows: int = 1000, length: int = 1100, seed: int = 0):
    """Over 1M maskable tokens, framed by [CLS] ... [SEP] and with padding at the end of every other row."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (rows, length), generator=generator)
    ids[:, 0], ids[:, -1] = CLS, SEP
    ids[::2, -50:] = PAD
    return ids


def test_bert_fractions_over_a_million_tokens():
    ids = corpus()
    maskable = ~torch.isin(ids, torch.tensor(SPECIAL_IDS))
    assert maskable.sum() > 1_000_000
    corrupted, labels = mask_tokens(ids, mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL_IDS,
                                    generator=torch.Generator().manual_seed(1))
    selected = labels != IGNORE_INDEX
    assert abs(selected.sum().item() / maskable.sum().item() - 0.15) < 0.002
    assert not (selected & ~maskable).any()  # never special tokens or padding
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(corrupted[~selected], ids[~selected])  # nothing else changes
    n = selected.sum().item()
    became_mask = (corrupted[selected] == MASK).sum().item() / n
    unchanged = (corrupted[selected] == ids[selected]).sum().item() / n
    random = 1 - became_mask - unchanged
    # a random draw can hit the original token (1 in ~995): those count as unchanged
    assert abs(became_mask - 0.8) < 0.005 and abs(random - 0.1) < 0.005 and abs(unchanged - 0.1) < 0.005
    replaced = selected & (corrupted != MASK) & (corrupted != ids)
    assert not torch.isin(corrupted[replaced], torch.tensor(SPECIAL_IDS)).any()  # random tokens are never special


def test_each_row_has_round_fraction_of_its_maskable_tokens_selected():
    """Google BERT's count rule: max(1, round(0.15 n)) of a row's n maskable tokens; never more than the static
    size the output layer is given."""
    lengths = [0, 1, 3, 7, 10, 40, 97, 126]  # real tokens between [CLS] and [SEP]; padding after
    ids = torch.full((len(lengths), 128), PAD)
    for row, n in enumerate(lengths):
        ids[row, 0], ids[row, 1:n + 1], ids[row, n + 1] = CLS, torch.randint(5, VOCAB, (n,)), SEP
    for seed in range(20):
        _, labels = mask_tokens(ids, mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL_IDS,
                                generator=torch.Generator().manual_seed(seed))
        counts = (labels != IGNORE_INDEX).sum(1).tolist()
        assert counts == [0 if n == 0 else max(1, round(0.15 * n)) for n in lengths]
        assert max(counts) <= max_selected(128, 0.15) == 20


def test_selection_is_uniform_over_the_maskable_positions():
    ids = torch.randint(5, VOCAB, (20_000, 22))
    ids[:, 0], ids[:, -1] = CLS, SEP  # 20 maskable tokens per row: 3 selected
    _, labels = mask_tokens(ids, mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL_IDS,
                            generator=torch.Generator().manual_seed(0))
    frequency = (labels != IGNORE_INDEX).float().mean(0)
    assert frequency[0] == 0 and frequency[-1] == 0
    assert ((frequency[1:-1] - 3 / 20).abs() < 0.01).all()  # standard error 0.0025


def test_attention_mask_excludes_padding_whatever_its_id():
    ids = torch.randint(5, VOCAB, (50, 100))
    attention_mask = torch.ones_like(ids)
    attention_mask[:, 60:] = 0
    _, labels = mask_tokens(ids, mask_token_id=MASK, vocab_size=VOCAB, special_ids=[MASK], mask_prob=0.5,
                            attention_mask=attention_mask)
    assert (labels[:, 60:] == IGNORE_INDEX).all() and (labels[:, :60] != IGNORE_INDEX).any()


def test_random_replacements_avoid_every_special_id():
    ids = torch.randint(5, 12, (200, 200))
    specials = [0, 1, 2, 3, 4, 7, 11]  # some inside the range of ordinary ids too
    corrupted, labels = mask_tokens(ids, mask_token_id=3, vocab_size=12, special_ids=specials, mask_prob=0.5,
                                    replace_probs=(0.0, 1.0, 0.0))
    assert not torch.isin(corrupted[labels != IGNORE_INDEX], torch.tensor(specials)).any()
    assert set(corrupted[labels != IGNORE_INDEX].unique().tolist()) == {5, 6, 8, 9, 10}


def test_whole_word_masking_never_masks_part_of_a_word():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (200, 300), generator=generator)
    ids[:, 0] = CLS
    word_starts = torch.rand(200, 300, generator=generator) < 0.4
    word_starts[:, 1] = True
    _, labels = mask_tokens(ids, mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL_IDS,
                            word_starts=word_starts, generator=generator)
    selected = labels != IGNORE_INDEX
    word_index = word_starts.long().cumsum(1)
    for row in range(200):
        for word in word_index[row, 1:].unique():
            in_word = selected[row][(word_index[row] == word) & (torch.arange(300) > 0)]
            assert in_word.all() or not in_word.any()
    fraction = selected[:, 1:].float().mean().item()
    assert 0.12 < fraction < 0.18


def test_fixed_count_per_row():
    ids = corpus(rows=20, length=100)
    corrupted, labels = mask_tokens(ids, mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL_IDS,
                                    num_masked=15)
    assert ((labels != IGNORE_INDEX).sum(1) == 15).all()
    short = torch.tensor([[CLS, 10, 11, SEP, PAD, PAD]])
    _, labels = mask_tokens(short, mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL_IDS, num_masked=4)
    assert (labels != IGNORE_INDEX).sum() == 2  # only two maskable tokens in the row


def test_same_generator_seed_same_masks():
    ids = corpus(rows=4, length=64)
    kwargs = dict(mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL_IDS)
    a = mask_tokens(ids, **kwargs, generator=torch.Generator().manual_seed(3))
    b = mask_tokens(ids, **kwargs, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("kwargs, message", [
    (dict(replace_probs=(0.8, 0.1, 0.2)), "sum to 1"),
    (dict(mask_prob=0.0), "mask_prob"),
    (dict(num_masked=3, word_starts=torch.ones(1, 4, dtype=torch.bool)), "cannot be combined"),
])
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mask_tokens(torch.ones(1, 4, dtype=torch.long) * 9, mask_token_id=MASK, vocab_size=VOCAB,
                    special_ids=SPECIAL_IDS, **kwargs)


def test_gather_selected_static_and_dynamic_agree():
    hidden = torch.randn(3, 10, 8)
    labels = torch.full((3, 10), IGNORE_INDEX)
    labels[0, [1, 4]] = torch.tensor([7, 8])
    labels[2, [0, 9]] = torch.tensor([5, 6])
    dynamic_hidden, dynamic_labels = gather_selected(hidden, labels)
    assert dynamic_hidden.shape == (4, 8) and dynamic_labels.tolist() == [7, 8, 5, 6]
    static_hidden, static_labels = gather_at(hidden, labels, selected_positions(labels, 2))
    assert static_hidden.shape == (6, 8)
    kept = static_labels != IGNORE_INDEX
    assert sorted(static_labels[kept].tolist()) == [5, 6, 7, 8]
    for vector, label in zip(static_hidden[kept], static_labels[kept], strict=True):
        row, column = (labels == label).nonzero()[0]
        assert torch.equal(vector, hidden[row, column])
