"""Decoding: greedy, sampling, top-k/top-p, beam search, the KV cache, batched prompts."""

import math

import pytest
import torch

from models import LMHead, Transformer, TransformerConfig
from pretrain.downstream.generate import LanguageModel, filter_logits, generate

VOCAB = 24


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = TransformerConfig.preset("gpt2-tiny", vocab_size=VOCAB, max_position_embeddings=64, dropout=0.0,
                                      attention_dropout=0.0, initializer_range=0.2)  # peaky, varied predictions
    backbone = Transformer(config).eval()
    return LanguageModel(backbone, LMHead(backbone, transform=False, bias=False))


PROMPTS = [[3, 7, 1, 9, 4], [5], [8, 8, 2]]


def full_forward_logits(model, tokens):
    return model.head(model.backbone(torch.tensor([tokens]))[0, -1]).float()


def test_greedy_is_the_argmax_of_a_full_forward_at_every_step(model):
    for prompt, new in zip(PROMPTS, generate(model, PROMPTS, "greedy", max_new_tokens=12), strict=True):
        assert len(new) == 12
        for step, token in enumerate(new):
            assert token == int(full_forward_logits(model, prompt + new[:step]).argmax())


def test_cache_gives_the_same_logits_and_tokens(model):
    tokens = [3, 7, 1, 9, 4, 11, 2, 6, 6, 0]
    cache = model.new_cache()
    with torch.no_grad():
        cached = [model.logits(torch.tensor([tokens[:4]]), torch.ones(1, 4, dtype=torch.long),
                               torch.arange(4)[None], cache)]
        for t in range(4, len(tokens)):
            cached.append(model.logits(torch.tensor([[tokens[t]]]), torch.ones(1, t + 1, dtype=torch.long),
                                       torch.tensor([[t]]), cache))
        for t, logits in enumerate(cached, start=3):
            assert (logits[0] - full_forward_logits(model, tokens[:t + 1])).abs().max() < 1e-5
    for strategy, kwargs in (("greedy", {}), ("sample", dict(seed=3)), ("beam", dict(num_beams=3))):
        with_cache = generate(model, PROMPTS, strategy, max_new_tokens=10, **kwargs)
        without = generate(model, PROMPTS, strategy, max_new_tokens=10, use_cache=False, **kwargs)
        assert with_cache == without, strategy


def test_top_k_one_and_temperature_near_zero_are_greedy(model):
    greedy = generate(model, PROMPTS, "greedy", max_new_tokens=8)
    assert generate(model, PROMPTS, "sample", top_k=1, seed=0, max_new_tokens=8) == greedy
    assert generate(model, PROMPTS, "sample", temperature=1e-6, seed=1, max_new_tokens=8) == greedy


def test_sampled_first_tokens_follow_the_softmax(model):
    prompt = [3, 7, 1]
    n = 20_000
    samples = generate(model, [prompt] * n, "sample", seed=0, max_new_tokens=1)
    counts = torch.bincount(torch.tensor([s[0] for s in samples]), minlength=VOCAB).double()
    expected = full_forward_logits(model, prompt).double().softmax(-1) * n
    big = expected >= 5  # pool the rare tokens into one cell, as the chi-square test requires
    observed, expected = counts[big], expected[big]
    if (~big).any():
        observed = torch.cat([observed, counts[~big].sum()[None]])
        expected = torch.cat([expected, (n - expected.sum())[None]])
    assert len(observed) >= 5  # the test has power: several tokens are likely
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    dof = len(observed) - 1
    critical = dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3  # p = 0.001 (Wilson-Hilferty)
    assert chi2 < critical, f"chi2 {chi2:.1f} >= {critical:.1f} with {dof} degrees of freedom"


def test_filters_keep_the_right_tokens():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert torch.isfinite(filter_logits(logits, top_k=2, top_p=None)).tolist() == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, top_k=None, top_p=0.7)).tolist() == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, top_k=None, top_p=0.5)).tolist() == [True, False, False, False]
    assert torch.isfinite(filter_logits(logits, top_k=None, top_p=0.95)).tolist() == [True, True, True, False]


def test_batched_prompts_of_different_lengths_equal_each_alone(model):
    batched = generate(model, PROMPTS, "greedy", max_new_tokens=10)
    assert batched == [generate(model, [p], "greedy", max_new_tokens=10)[0] for p in PROMPTS]


def sequence_log_probability(model: LanguageModel, prompt: list[int], continuation: list[int]) -> float:
    """log P(continuation | prompt), by one uncached forward pass."""
    with torch.no_grad():
        logits = model.head(model.backbone(torch.tensor([prompt + continuation]))[0, len(prompt) - 1:-1])
        return float(logits.float().log_softmax(-1).gather(1, torch.tensor(continuation)[:, None]).sum())


def test_beam_search(model):
    for prompt in PROMPTS:
        greedy = generate(model, [prompt], "greedy", max_new_tokens=6)[0]
        assert generate(model, [prompt], "beam", num_beams=1, max_new_tokens=6)[0] == greedy
        beam = generate(model, [prompt], "beam", num_beams=4, max_new_tokens=6)[0]
        assert len(beam) == 6
        assert sequence_log_probability(model, prompt, beam) >= sequence_log_probability(model, prompt, greedy) - 1e-5


class Bigram(LanguageModel):
    """A constructed model where greedy is suboptimal: after token 0, token 1 (p = 0.6) leads to a flat
    distribution over 10 tokens, token 2 (p = 0.4) to token 3 for certain. Greedy: 0.6 * 0.1; best: 0.4 * 1."""

    device = torch.device("cpu")

    def __init__(self):
        table = torch.full((12, 12), 1e-9)
        table[0, 1], table[0, 2] = 0.6, 0.4
        table[1, 2:12] = 0.1
        table[2, 3] = 1.0
        table[3:, 0] = 1.0
        self.table = (table / table.sum(1, keepdim=True)).log()

    def new_cache(self):
        return None

    def logits(self, input_ids, attention_mask, position_ids, cache):
        return self.table[input_ids[:, -1]]


def test_beam_search_beats_greedy_where_greedy_is_suboptimal():
    model = Bigram()
    greedy = generate(model, [[0]], "greedy", max_new_tokens=2)[0]
    beam = generate(model, [[0]], "beam", num_beams=2, max_new_tokens=2)[0]
    assert greedy[0] == 1 and beam == [2, 3]

    def log_probability(tokens):
        return sum(model.table[a, b].item() for a, b in zip([0] + tokens, tokens, strict=False))

    assert log_probability(beam) > log_probability(greedy) + 0.5


def test_generation_stops_at_eos(model):
    first = generate(model, [[3, 7, 1]], "greedy", max_new_tokens=6)[0]
    eos = first[2]
    stopped = generate(model, [[3, 7, 1], [5]], "greedy", max_new_tokens=6, eos_id=eos)
    assert stopped[0] == first[:first.index(eos) + 1]
    assert eos not in stopped[1][:-1]


def test_bad_settings():
    with pytest.raises(ValueError, match="causal"):
        LanguageModel(Transformer(TransformerConfig.preset("bert-tiny")), None)
    with pytest.raises(ValueError, match="unknown strategy"):
        generate(Bigram(), [[0]], "nucleus")
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        generate(Bigram(), [[0]], "sample", temperature=0.0)
    with pytest.raises(ValueError, match="at least one token"):
        generate(Bigram(), [[]], "greedy")


def test_perplexity_equals_exp_of_the_mean_loss(model):
    from pretrain.downstream.generate import perplexity

    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (30,)).tolist()
    with torch.no_grad():
        logits = model.head(model.backbone(torch.tensor([tokens])))[0, :-1]
        mean_loss = torch.nn.functional.cross_entropy(logits, torch.tensor(tokens[1:])).item()
        assert perplexity(model, tokens) == pytest.approx(math.exp(mean_loss), rel=1e-5)
        # sliding window, one target at a time: each token predicted from the 7 before it, computed token by token
        losses = [torch.nn.functional.cross_entropy(full_forward_logits(model, tokens[max(0, t - 7):t])[None],
                                                    torch.tensor([tokens[t]])).item() for t in range(1, 30)]
    assert perplexity(model, tokens, window=8, stride=1) == pytest.approx(math.exp(sum(losses) / 29), rel=1e-5)
    assert perplexity(model, tokens, window=8, stride=4) > 1.0
