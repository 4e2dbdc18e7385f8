"""Token models' home: sampling from logits, CFG on logits, autoregressive and MaskGIT decoding."""

from __future__ import annotations

import math

import pytest
import torch

from t2i.tokens import (
    CFGTokenModel,
    GuidedCond,
    choice_temperatures,
    filter_logits,
    mask_ratio,
    sample_autoregressive,
    sample_logits,
    sample_masked,
    sample_training_mask,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def draws(logits: torch.Tensor, n: int, **kw) -> set[int]:
    """The ids seen in n draws from one (V,) row (one call with n rows of the same logits)."""
    return set(sample_logits(logits.expand(1, n, -1), gens(0), **kw).flatten().tolist())


# ---------------------------------------------------------------- sampling


def test_top_k_keeps_exactly_k_candidates():
    logits = torch.tensor([0.1, 2.0, -1.0, 1.5, 0.3, 1.9, -3.0, 1.0])
    assert draws(logits, 4000, top_k=3) == {1, 3, 5}
    assert draws(logits, 4000, top_k=1) == {1}
    assert draws(logits, 4000) == set(range(8))  # without top-k, every id appears
    # ties at the k-th value: a threshold would let all four through, top-k keeps exactly 2
    tied = torch.zeros(4)
    assert len(draws(tied, 4000, top_k=2)) == 2


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.tensor([0.05, 0.5, 0.15, 0.3]).log()  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0
    for top_p, nucleus in [(0.4, {1}), (0.5, {1}), (0.7, {1, 3}), (0.9, {1, 3, 2}), (0.99, {0, 1, 2, 3})]:
        kept = set(torch.isfinite(filter_logits(logits, top_p=top_p)).nonzero().flatten().tolist())
        assert kept == nucleus, top_p
        assert draws(logits, 3000, top_p=top_p) == nucleus, top_p
    # temperature first, then the nucleus: at T = 0.1 token 1 alone holds > 0.99
    assert draws(logits, 3000, top_p=0.9, temperature=0.1) == {1}


def test_filter_keeps_relative_probabilities_inside_the_nucleus():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()
    probs = filter_logits(logits, top_k=3, top_p=0.9).softmax(-1)
    torch.testing.assert_close(probs, torch.tensor([[0.0, 0.5, 0.15, 0.3]]) / 0.95)


def test_temperature_zero_is_argmax():
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample_logits(logits, gens(0, 1, 2), temperature=0), logits.argmax(-1))
    assert torch.equal(sample_logits(logits[:, 0], None, temperature=0), logits[:, 0].argmax(-1))


def test_sampling_matches_the_distribution():
    """Draws follow softmax(logits / T): the frequencies of 20,000 draws within 0.015."""
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    for temperature in (1.0, 0.5):
        ids = sample_logits(logits.expand(1, 20000, -1), gens(5), temperature=temperature).flatten()
        freq = torch.bincount(ids, minlength=4).float() / ids.numel()
        torch.testing.assert_close(freq, (logits / temperature).softmax(-1), atol=0.015, rtol=0)


def test_same_seed_same_tokens_whatever_the_batch():
    g = torch.Generator().manual_seed(2)
    row = torch.randn(6, 9, generator=g)  # (N, V) one image's logits
    alone = sample_logits(row[None], gens(7))
    batch = torch.stack([torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g), row])
    assert torch.equal(sample_logits(batch, gens(5, 6, 7))[2], alone[0])
    assert not torch.equal(sample_logits(row[None], gens(8)), alone)  # the seed matters


def test_sampling_rejects_wrong_generator_count():
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        sample_logits(torch.zeros(3, 4), gens(0, 1))


# ---------------------------------------------------------------- guidance


class Recorder:
    """A token model with conditioning: logits = table[tokens] + cond_bias, recording batch sizes."""

    def __init__(self, vocab=7):
        g = torch.Generator().manual_seed(4)
        self.table = torch.randn(vocab + 1, vocab, generator=g)  # row `vocab`: the mask token
        self.calls: list[int] = []

    def __call__(self, tokens, cond):
        self.calls.append(tokens.shape[0])
        return self.table[tokens] + cond["bias"][:, None, :]  # (B, T, V)


def test_cfg_scale_one_is_conditional_and_zero_unconditional():
    model = Recorder()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 7, (2, 5), generator=g)
    cond, uncond = {"bias": torch.randn(2, 7, generator=g)}, {"bias": torch.randn(2, 7, generator=g)}
    both = GuidedCond(cond, uncond)
    l_c, l_u = model(tokens, cond), model(tokens, uncond)
    torch.testing.assert_close(CFGTokenModel(model, 1.0)(tokens, both), l_c, rtol=0, atol=0)
    torch.testing.assert_close(CFGTokenModel(model, 0.0)(tokens, both), l_u, rtol=1e-6, atol=1e-6)
    model.calls.clear()
    guided = CFGTokenModel(model, 3.0)(tokens, both)
    assert model.calls == [4]  # both branches in one batched call
    torch.testing.assert_close(guided, l_u + 3.0 * (l_c - l_u))
    # mixing log-probs instead of logits gives the same distribution (module docstring)
    lp = l_u.log_softmax(-1) + 3.0 * (l_c.log_softmax(-1) - l_u.log_softmax(-1))
    torch.testing.assert_close(guided.softmax(-1), lp.softmax(-1))


def test_cfg_wraps_the_samplers():
    """A guided model drops into sample_masked unchanged: scale 0 decodes what the
    unconditional model decodes alone."""
    model = Recorder(vocab=6)
    g = torch.Generator().manual_seed(1)
    cond, uncond = {"bias": torch.randn(1, 6, generator=g) * 3}, {"bias": torch.randn(1, 6, generator=g) * 3}
    kw = dict(steps=4, mask_id=6, num_tokens=8)
    guided = sample_masked(CFGTokenModel(model, 0.0), GuidedCond(cond, uncond), generators=gens(3), **kw)
    plain = sample_masked(model, uncond, generators=gens(3), **kw)
    assert torch.equal(guided, plain)


# ---------------------------------------------------------------- autoregressive


class Counter:
    """Autoregressive model over V ids: token 0 = cond["start"], token t+1 = token t + 1 (mod V);
    logits (B, T + 1, V) with the given sharpness."""

    def __init__(self, vocab=5, sharpness=30.0):
        self.vocab, self.sharpness = vocab, sharpness
        self.lengths: list[int] = []

    def __call__(self, tokens, cond):
        self.lengths.append(tokens.shape[1])
        nxt = torch.cat([cond["start"][:, None], (tokens + 1) % self.vocab], dim=1)  # (B, T + 1)
        return torch.nn.functional.one_hot(nxt, self.vocab).float() * self.sharpness


def test_autoregressive_greedy_reproduces_the_known_sequence():
    model = Counter()
    cond = {"start": torch.tensor([3, 0])}
    out = sample_autoregressive(model, cond, 7, batch_size=2, temperature=0)
    assert out.tolist() == [[3, 4, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 0, 1]]
    assert out.dtype == torch.long
    assert model.lengths == list(range(7))  # one call per token, on the growing prefix


def test_autoregressive_prefix_is_kept_and_continued():
    seen = []
    out = sample_autoregressive(Counter(), {"start": torch.tensor([0])}, 6, temperature=0,
                                prefix=torch.tensor([[2, 2, 4]]), callback=lambda d: seen.append(d["i"]))
    assert out.tolist() == [[2, 2, 4, 0, 1, 2]]
    assert seen == [3, 4, 5]


def test_autoregressive_seeded_rows_do_not_depend_on_the_batch():
    model = Counter(vocab=6, sharpness=0.5)  # soft: every id is likely, the draws matter
    one = sample_autoregressive(model, {"start": torch.tensor([1])}, 12, generators=gens(9))
    three = sample_autoregressive(model, {"start": torch.tensor([4, 2, 1])}, 12, generators=gens(3, 4, 9))
    assert torch.equal(three[2], one[0])
    assert not torch.equal(three[0], three[2])


def test_autoregressive_rejects_a_model_off_the_contract():
    def same_length(tokens, cond):  # (B, T, V) instead of (B, T + 1, V)
        return torch.zeros(tokens.shape[0], tokens.shape[1], 4)

    with pytest.raises(ValueError, match=r"\(B, T \+ 1, V\)"):
        sample_autoregressive(same_length, None, 3, batch_size=1)


# ---------------------------------------------------------------- masked


class Fixed:
    """Masked model whose logits do not depend on the tokens: fixed (B, N, V) logits; records
    the number of masked tokens in each call's input."""

    def __init__(self, logits, mask_id):
        self.logits, self.mask_id = logits, mask_id
        self.masked_in: list[list[int]] = []

    def __call__(self, tokens, cond):
        self.masked_in.append((tokens == self.mask_id).sum(-1).tolist())
        return self.logits


# Masked tokens after each step, golden values: floor(n0 * cos(pi/2 (s + 1) / steps)), at most
# one fewer than before and at least 1, then 0. The floor is taken in float32, as MaskGIT's JAX
# code and diffusers' AmusedScheduler take it: there cos(pi/3) < 0.5, so where exact arithmetic
# gives n0 / 2 (128 of 256 after step 8 of 12, aMUSEd's defaults) the references give one less.
SCHEDULE_COUNTS = {
    (8, 64): [62, 59, 53, 45, 35, 24, 12, 0],
    (12, 256): [253, 247, 236, 221, 203, 181, 155, 127, 97, 66, 33, 0],
    (3, 10): [8, 4, 0],
    (1, 5): [0],
    (6, 20): [19, 17, 14, 9, 5, 0],
    (4, 3): [2, 1, 1, 0],  # the clamps: a token decided each step, one kept for the last
}


def test_mask_ratio_is_cosine():
    u = torch.linspace(0, 1, 11)
    torch.testing.assert_close(mask_ratio(u), torch.cos(math.pi / 2 * u))
    assert mask_ratio(0.0).item() == 1.0 and abs(mask_ratio(1.0).item()) < 1e-7
    torch.testing.assert_close(mask_ratio(u, "linear"), 1 - u)


@pytest.mark.parametrize("steps,n", [(8, 64), (12, 256), (3, 10), (1, 5), (4, 3)])
def test_masked_fills_all_in_steps_following_the_cosine_schedule(steps, n):
    mask_id, vocab = 100, 16
    logits = torch.randn(2, n, vocab, generator=torch.Generator().manual_seed(steps))
    model = Fixed(logits, mask_id)
    after = []
    out = sample_masked(model, None, n, steps=steps, mask_id=mask_id, generators=gens(0, 1),
                        callback=lambda d: after.append((d["tokens"] == mask_id).sum(-1).tolist()))
    assert len(model.masked_in) == steps  # exactly `steps` model calls
    assert model.masked_in[0] == [n, n]
    assert after == [[c, c] for c in SCHEDULE_COUNTS[steps, n]]
    assert ((out >= 0) & (out < vocab)).all()


def test_masked_keeps_fixed_and_decided_tokens():
    """Fixed positions are untouched, and a token kept by one step never changes again, even
    when the model's logits change from call to call."""
    mask_id, vocab, n = 9, 9, 30
    g = torch.Generator().manual_seed(3)

    def noisy(tokens, cond):
        return torch.randn(*tokens.shape, vocab, generator=g) * 2

    image = torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(5))
    keep = torch.zeros(2, n, dtype=torch.bool)
    keep[:, :10] = True  # outpaint the right 2/3 from the left third
    steps_seen = []
    out = sample_masked(noisy, None, n, steps=6, mask_id=mask_id, generators=gens(1, 2), tokens=image,
                        fixed=keep, callback=lambda d: steps_seen.append(d["tokens"].clone()))
    assert torch.equal(out[keep], image[keep])
    for before, later in zip(steps_seen, steps_seen[1:], strict=False):
        decided = before != mask_id
        assert torch.equal(later[decided], before[decided])
    # the schedule counts from the 20 unknown tokens, not from all 30
    assert [int((t[0] == mask_id).sum()) for t in steps_seen] == SCHEDULE_COUNTS[6, 20]


def test_masked_tokens_with_mask_ids_are_the_ones_generated():
    mask_id = 5
    start = torch.tensor([[1, mask_id, 3, mask_id, mask_id, 0]])
    answer = torch.tensor([[4, 2, 4, 2, 2, 2]])
    logits = torch.nn.functional.one_hot(answer, 5).float() * 20
    out = sample_masked(Fixed(logits, mask_id), None, 6, steps=3, mask_id=mask_id, tokens=start,
                        generators=gens(0))
    assert out.tolist() == [[1, 2, 3, 2, 2, 0]]


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_masked_reproduces_a_model_that_knows_the_answer(temperature):
    n, vocab, mask_id = 16, 8, 8
    answer = torch.randint(0, vocab, (3, n), generator=torch.Generator().manual_seed(6))
    logits = torch.nn.functional.one_hot(answer, vocab + 1).float() * 25  # V includes mask_id
    logits[..., mask_id] = 100  # the sampler must never draw the mask token
    out = sample_masked(Fixed(logits, mask_id), None, n, steps=5, mask_id=mask_id, generators=gens(0, 1, 2),
                        temperature=temperature)
    assert torch.equal(out, answer)


def test_masked_seeded_rows_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(8)
    w = torch.randn(7, 7, generator=g)

    def model(tokens, cond):  # depends on the tokens: a wrong draw changes later steps
        return (torch.nn.functional.one_hot(tokens, 8).float()[..., :7] @ w).cumsum(1)

    kw = dict(steps=5, mask_id=7)
    one = sample_masked(model, None, 20, generators=gens(11), **kw)
    three = sample_masked(model, None, 20, generators=gens(4, 11, 5), **kw)
    assert torch.equal(three[1], one[0])
    assert not torch.equal(three[0], three[1])


def test_choice_temperature_anneals_to_zero():
    torch.testing.assert_close(choice_temperatures(4.5, 4), torch.tensor([3.375, 2.25, 1.125, 0.0]))
    torch.testing.assert_close(choice_temperatures(torch.linspace(2, 0, 3), 3), torch.tensor([2.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="2 choice temperatures for 3 steps"):
        choice_temperatures([1.0, 0.5], 3)


@pytest.mark.parametrize(("start_step", "known", "schedule"), [(0, 0, "cosine"), (4, 100, "linear"), (0, 37, "cosine")])
def test_masked_matches_diffusers_amused_scheduler(start_step, known, schedule):
    """Same CPU generator, same logits: the tokens of diffusers' AmusedScheduler loop (batch 1,
    choice temperatures linspace(2, 0)), step by step: text-to-image from all masked, and its
    inpainting (`known` tokens given, `starting_mask_ratio`, the last steps only) with
    count_rule="total"."""
    from diffusers import AmusedScheduler

    n, vocab, mask_id, steps = 256, 32, 40, 12  # aMUSEd-256's 16x16 tokens and 12 steps
    w = torch.randn(vocab + 1, vocab, generator=torch.Generator().manual_seed(2)) * 2

    def model(tokens, cond):  # (1, N) -> (1, N, V), depends on the tokens
        emb = torch.nn.functional.one_hot(tokens.clamp(max=vocab), vocab + 1).float() @ w
        return emb + emb.mean(1, keepdim=True)

    start = torch.full((1, n), mask_id)
    start[0, torch.randperm(n, generator=torch.Generator().manual_seed(4))[:known]] = torch.arange(known) % vocab
    sched = AmusedScheduler(mask_token_id=mask_id, masking_schedule=schedule)
    sched.set_timesteps(steps, temperature=(2, 0))
    ratio = (start == mask_id).sum() / start.numel()
    g = torch.Generator("cpu").manual_seed(123)
    latents, ref_steps = start.clone(), []
    for t in sched.timesteps[start_step:]:
        latents = sched.step(model(latents, None), t, latents, generator=g, starting_mask_ratio=ratio).prev_sample
        ref_steps.append(latents.clone())

    ours = []
    out = sample_masked(model, None, n, steps=steps, mask_id=mask_id, generators=gens(123), tokens=start,
                        schedule=schedule, start_step=start_step, count_rule="total" if known else "unknown",
                        choice_temperature=sched.temperatures, callback=lambda d: ours.append(d["tokens"].clone()))
    assert len(ours) == steps - start_step
    for s, (a, b) in enumerate(zip(ours, ref_steps, strict=True)):
        assert torch.equal(a, b), f"step {s}"
    assert torch.equal(out, ref_steps[-1])
    assert (out[start != mask_id] == start[start != mask_id]).all()


def test_masked_count_rules_and_start_step():
    """Golden counts: "total" floors N * (n0 / N * gamma) in float32, "unknown" n0 * gamma; a
    start step runs only the later steps of the schedule."""
    n, mask_id = 30, 9
    start = torch.full((1, n), mask_id)
    start[0, :10] = 1  # 20 unknown of 30
    logits = torch.randn(1, n, 8, generator=torch.Generator().manual_seed(1))
    for rule in ("unknown", "total"):
        counts: list[int] = []
        sample_masked(Fixed(logits, mask_id), None, n, steps=6, mask_id=mask_id, generators=gens(0), tokens=start,
                      count_rule=rule, callback=lambda d, c=counts: c.append(int((d["tokens"] == mask_id).sum())))
        assert counts == SCHEDULE_COUNTS[6, 20]  # the two rules agree here
    after = []
    sample_masked(Fixed(logits, mask_id), None, n, steps=6, mask_id=mask_id, generators=gens(0), tokens=start,
                  start_step=3, callback=lambda d: after.append((d["i"], int((d["tokens"] == mask_id).sum()))))
    assert after == [(3, 9), (4, 5), (5, 0)]  # steps 3..5 of 6: floor(20 cos(pi/2 (s + 1) / 6))
    # where the float32 products round differently (30 tokens, 9 unknown, linear, step 3 of 12):
    # floor(9 * 0.6667) = 5 but floor(30 * (0.3 * 0.6667)) = 6, as diffusers counts
    start[0, :21] = 1
    for rule, want in (("unknown", 5), ("total", 6)):
        counts = []
        sample_masked(Fixed(logits, mask_id), None, n, steps=12, mask_id=mask_id, generators=gens(0), tokens=start,
                      schedule="linear", start_step=3, count_rule=rule,
                      callback=lambda d, c=counts: c.append(int((d["tokens"] == mask_id).sum())))
        assert counts[0] == want, rule
    with pytest.raises(ValueError, match="start_step"):
        sample_masked(Fixed(logits, mask_id), None, n, steps=6, mask_id=mask_id, batch_size=1, start_step=6)
    with pytest.raises(ValueError, match="count_rule"):
        sample_masked(Fixed(logits, mask_id), None, n, steps=6, mask_id=mask_id, batch_size=1, count_rule="x")


def test_training_mask_counts():
    mask = sample_training_mask(500, 16, torch.Generator().manual_seed(0))
    counts = mask.sum(-1)
    assert counts.min() >= 1 and counts.max() <= 16
    # recompute r from the same generator: the counts are exactly ceil(gamma(r) * N)
    r = torch.rand(500, generator=torch.Generator().manual_seed(0))
    assert torch.equal(counts, torch.ceil(torch.cos(math.pi / 2 * r) * 16).clamp(1, 16).long())
    # E[cos(pi/2 r)] = 2/pi: on average ~64% of the tokens are masked
    assert abs(mask.float().mean().item() - 2 / math.pi) < 0.05
