"""Tests of keras_moe.layers.routing against a NumPy statement of the routing.

The reference (`reference_routing.py`, same folder) was written from the
papers, without reading the implementation. The hand-worked examples below are
checked against both, so the reference itself is pinned to numbers worked out
by hand.

Shape letters: G groups, S tokens per group, E experts, K selected experts per
token, C expert capacity.
"""

import itertools
import sys

import numpy as np
import pytest
import tensorflow as tf

from keras_moe.layers import routing

try:
    from tests.layers import reference_routing as ref
except ImportError:  # tests/ is not a package: pytest put this folder on path.
    import reference_routing as ref

ATOL = 1e-6
RTOL = 1e-5

SHAPES = list(itertools.product([1, 3], [8, 16, 33], [2, 4, 8]))  # G, S, E


def _random_probs(seed, num_groups, num_tokens, num_experts):
    """<float32>[G, S, E]: softmax of standard normal logits."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(num_groups, num_tokens, num_experts))
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (probs / probs.sum(axis=-1, keepdims=True)).astype(np.float32)


def _random_mask(seed, num_groups, num_tokens, keep=0.6):
    """<bool>[G, S] with at least one masked and one kept token per group."""
    rng = np.random.default_rng(seed)
    mask = rng.uniform(size=(num_groups, num_tokens)) < keep
    mask[:, 0] = False
    mask[:, 1] = True
    return mask


def _seed(*args):
    """A fixed seed per test case (Python's hash() is salted per process)."""
    return sum(int(a) * 1000**i for i, a in enumerate(args))


def _tight_capacity(num_tokens, num_experts, k):
    """C of 1 or 2: at most half of the mean load, so experts overflow."""
    return 1 if k * num_tokens <= 4 * num_experts else 2


def _arrays(instructions):
    """(combine, dispatch) as NumPy arrays [G, S, E, C]."""
    return (
        np.asarray(instructions.combine_array()),
        np.asarray(instructions.dispatch_array()),
    )


def _assert_routed_equal(actual, expected):
    """actual: (combine, dispatch); expected: a reference `Routed`."""
    combine, dispatch = actual
    assert combine.shape == expected.combine.shape
    assert dispatch.shape == expected.dispatch.shape
    np.testing.assert_array_equal(dispatch, expected.dispatch)
    np.testing.assert_allclose(combine, expected.combine, atol=ATOL, rtol=RTOL)


def _keras_moe_tokens_choose(probs, k, capacity, token_mask=None, **kwargs):
    mask = None if token_mask is None else tf.constant(token_mask)
    return _arrays(
        routing.tokens_choose(
            tf.constant(probs, tf.float32),
            k,
            capacity,
            token_mask=mask,
            **kwargs,
        )
    )


def _keras_moe_experts_choose(probs, capacity, token_mask=None, **kwargs):
    mask = None if token_mask is None else tf.constant(token_mask)
    return _arrays(
        routing.experts_choose(
            tf.constant(probs, tf.float32),
            capacity,
            token_mask=mask,
            **kwargs,
        )
    )


def _reference_tokens_choose(probs, k, capacity, token_mask=None, **kwargs):
    normalize = kwargs.pop("normalize_combine_weights", False)
    routed = ref.tokens_choose(
        probs, k, capacity, normalize=normalize, token_mask=token_mask, **kwargs
    )
    return routed.combine, routed.dispatch


def _reference_experts_choose(probs, capacity, token_mask=None, **kwargs):
    normalize = kwargs.pop("normalize_combine_weights", False)
    routed = ref.experts_choose(
        probs, capacity, normalize=normalize, token_mask=token_mask
    )
    return routed.combine, routed.dispatch


TOKENS_CHOOSE = {
    "keras_moe": _keras_moe_tokens_choose,
    "reference": _reference_tokens_choose,
}
EXPERTS_CHOOSE = {
    "keras_moe": _keras_moe_experts_choose,
    "reference": _reference_experts_choose,
}
IMPLS = ["keras_moe", "reference"]


def _assert_hand_example(actual, combine, dispatch=None):
    """combine written out as [S, E, C] for a single group."""
    combine = np.asarray(combine, dtype=np.float64)[None]
    if dispatch is None:
        dispatch = (combine > 0).astype(np.float64)
    else:
        dispatch = np.asarray(dispatch, dtype=np.float64)[None]
    _assert_routed_equal(actual, ref.Routed(combine, dispatch, None))


# --- Token choice against the reference ------------------------------------


@pytest.mark.parametrize("capacity_kind", ["generous", "tight"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("batch_priority", [False, True])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("num_groups,num_tokens,num_experts", SHAPES)
def test_tokens_choose_matches_reference(
    num_groups,
    num_tokens,
    num_experts,
    k,
    batch_priority,
    normalize,
    capacity_kind,
):
    probs = _random_probs(
        _seed(num_groups, num_tokens, num_experts, k),
        num_groups,
        num_tokens,
        num_experts,
    )
    if capacity_kind == "generous":
        capacity = num_tokens
    else:
        capacity = _tight_capacity(num_tokens, num_experts, k)
    expected = ref.tokens_choose(
        probs, k, capacity, batch_priority=batch_priority, normalize=normalize
    )
    if capacity_kind == "generous":
        assert expected.num_dropped == 0
    else:
        # Otherwise the case would not test what happens on overflow.
        assert expected.num_dropped > 0
    actual = _keras_moe_tokens_choose(
        probs,
        k,
        capacity,
        batch_priority=batch_priority,
        normalize_combine_weights=normalize,
    )
    _assert_routed_equal(actual, expected)


@pytest.mark.parametrize("k", [1, 2])
def test_tokens_choose_batch_priority_changes_the_result(k):
    """Guards the BPR tables above against BPR being a no-op there."""
    probs = _random_probs(11, 3, 33, 4)
    capacity = _tight_capacity(33, 4, k)
    plain = ref.tokens_choose(probs, k, capacity, batch_priority=False)
    bpr = ref.tokens_choose(probs, k, capacity, batch_priority=True)
    assert not np.array_equal(plain.dispatch, bpr.dispatch)
    actual = _keras_moe_tokens_choose(probs, k, capacity, batch_priority=True)
    _assert_routed_equal(actual, bpr)


@pytest.mark.parametrize("normalize", [False, True])
def test_tokens_choose_generous_keeps_every_choice(normalize):
    probs = _random_probs(5, 2, 16, 4)
    combine, dispatch = _keras_moe_tokens_choose(
        probs, 2, 16, normalize_combine_weights=normalize
    )
    np.testing.assert_array_equal(dispatch.sum(axis=(2, 3)), 2.0)
    if normalize:
        np.testing.assert_allclose(combine.sum(axis=(2, 3)), 1.0, atol=ATOL)
    else:
        top2 = np.sort(probs, axis=-1)[..., -2:].sum(axis=-1)
        np.testing.assert_allclose(combine.sum(axis=(2, 3)), top2, atol=ATOL)


# --- Expert choice against the reference -----------------------------------


@pytest.mark.parametrize("capacity_kind", ["one", "two", "balanced", "all"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("num_groups,num_tokens,num_experts", SHAPES)
def test_experts_choose_matches_reference(
    num_groups, num_tokens, num_experts, normalize, capacity_kind
):
    probs = _random_probs(
        _seed(num_groups, num_tokens, num_experts, 99),
        num_groups,
        num_tokens,
        num_experts,
    )
    capacity = {
        "one": 1,
        "two": 2,
        "balanced": -(-num_tokens // num_experts),
        "all": num_tokens,
    }[capacity_kind]
    expected = ref.experts_choose(probs, capacity, normalize=normalize)
    actual = _keras_moe_experts_choose(
        probs, capacity, normalize_combine_weights=normalize
    )
    _assert_routed_equal(actual, expected)
    assert np.all(np.isfinite(actual[0]))
    if capacity_kind == "all":
        # C = S: every expert takes every token.
        np.testing.assert_array_equal(
            actual[1].sum(axis=(2, 3)), float(num_experts)
        )


# --- Hand-worked examples (checked against both implementations) -----------

# S=4, E=2. Top-1 experts: t0 -> e0, t1 -> e0, t2 -> e1, t3 -> e1.
# Top-1 probabilities 0.9, 0.6, 0.7, 0.8: BPR order is t0, t3, t2, t1.
PROBS_4x2 = [[[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]]]


@pytest.mark.parametrize("impl", IMPLS)
def test_switch_top1_hand_example(impl):
    """Left to right, C=1: the first token to reach each expert keeps it."""
    actual = TOKENS_CHOOSE[impl](np.float32(PROBS_4x2), 1, 1)
    # [S, E, C]
    _assert_hand_example(
        actual,
        [
            [[0.9], [0.0]],  # t0 -> e0 slot 0
            [[0.0], [0.0]],  # t1: e0 full, dropped
            [[0.0], [0.7]],  # t2 -> e1 slot 0
            [[0.0], [0.0]],  # t3: e1 full, dropped
        ],
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_priority_hand_example(impl):
    """BPR serves t3 (0.8) before t2 (0.7): t3 keeps e1, t2 is dropped."""
    actual = TOKENS_CHOOSE[impl](
        np.float32(PROBS_4x2), 1, 1, batch_priority=True
    )
    _assert_hand_example(
        actual,
        [
            [[0.9], [0.0]],  # t0 -> e0 slot 0 (served 1st)
            [[0.0], [0.0]],  # t1: e0 full (served 4th)
            [[0.0], [0.0]],  # t2: e1 full (served 3rd)
            [[0.0], [0.8]],  # t3 -> e1 slot 0 (served 2nd)
        ],
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_priority_slot_order_and_ties_hand_example(impl):
    """BPR fills slots in service order; equal priorities keep token order.

    t0 and t3 tie between e0 and e1 (0.5, 0.5): both pick e0 (lower id). Their
    top-1 probabilities tie too, so BPR serves t0 before t3. Order: t1, t2
    (0.75 each), then t0, t3.
    """
    probs = np.float32([[[0.5, 0.5], [0.75, 0.25], [0.25, 0.75], [0.5, 0.5]]])
    actual = TOKENS_CHOOSE[impl](probs, 1, 2, batch_priority=True)
    _assert_hand_example(
        actual,
        [
            [[0.0, 0.5], [0.0, 0.0]],  # t0 -> e0 slot 1
            [[0.75, 0.0], [0.0, 0.0]],  # t1 -> e0 slot 0
            [[0.0, 0.0], [0.75, 0.0]],  # t2 -> e1 slot 0
            [[0.0, 0.0], [0.0, 0.0]],  # t3: e0 full
        ],
    )
    # Without BPR: t0 -> e0 slot 0, t1 -> e0 slot 1, t2 -> e1, t3 dropped.
    actual = TOKENS_CHOOSE[impl](probs, 1, 2, batch_priority=False)
    _assert_hand_example(
        actual,
        [
            [[0.5, 0.0], [0.0, 0.0]],
            [[0.0, 0.75], [0.0, 0.0]],
            [[0.0, 0.0], [0.75, 0.0]],
            [[0.0, 0.0], [0.0, 0.0]],
        ],
    )


# S=3, E=3, K=2. (1st, 2nd) choices: t0 (e0, e1), t1 (e1, e0), t2 (e2, e0).
PROBS_TOP2 = [[[0.5, 0.4, 0.1], [0.3, 0.6, 0.1], [0.2, 0.1, 0.7]]]


@pytest.mark.parametrize("impl", IMPLS)
def test_top2_first_choices_before_second_hand_example(impl):
    """C=1: every first choice is served before t0's second choice.

    Serving token by token would give t0 both e0 and e1 and leave t1 with
    nothing; k-major rounds give each token its first choice.
    """
    actual = TOKENS_CHOOSE[impl](np.float32(PROBS_TOP2), 2, 1)
    _assert_hand_example(
        actual,
        [
            [[0.5], [0.0], [0.0]],  # t0 -> e0; 2nd choice e1 full
            [[0.0], [0.6], [0.0]],  # t1 -> e1; 2nd choice e0 full
            [[0.0], [0.0], [0.7]],  # t2 -> e2; 2nd choice e0 full
        ],
    )


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
def test_top2_second_round_hand_example(impl, normalize):
    """C=2: second choices take the slots after all first choices.

    Round 1 fills e0[0]=t0, e1[0]=t1, e2[0]=t2; round 2 fills e1[1]=t0,
    e0[1]=t1, and t2's second choice e0 is full. Normalised weights divide by
    the KEPT weights: t2 gets 0.7 / 0.7 = 1, not 0.7 / (0.7 + 0.2).
    """
    actual = TOKENS_CHOOSE[impl](
        np.float32(PROBS_TOP2), 2, 2, normalize_combine_weights=normalize
    )
    if normalize:
        expected = [
            [[0.5 / 0.9, 0.0], [0.0, 0.4 / 0.9], [0.0, 0.0]],
            [[0.0, 0.3 / 0.9], [0.6 / 0.9, 0.0], [0.0, 0.0]],
            [[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]],
        ]
    else:
        expected = [
            [[0.5, 0.0], [0.0, 0.4], [0.0, 0.0]],
            [[0.0, 0.3], [0.6, 0.0], [0.0, 0.0]],
            [[0.0, 0.0], [0.0, 0.0], [0.7, 0.0]],
        ]
    _assert_hand_example(actual, expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_normalize_dropped_token_gets_zeros_hand_example(impl):
    actual = TOKENS_CHOOSE[impl](
        np.float32(PROBS_4x2), 1, 1, normalize_combine_weights=True
    )
    _assert_hand_example(
        actual,
        [[[1.0], [0.0]], [[0.0], [0.0]], [[0.0], [1.0]], [[0.0], [0.0]]],
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_token_mask_hand_example(impl):
    """Masked t0 takes no slot: t1 now gets e0, and t2 still gets e1."""
    mask = np.array([[False, True, True, True]])
    actual = TOKENS_CHOOSE[impl](np.float32(PROBS_4x2), 1, 1, token_mask=mask)
    _assert_hand_example(
        actual,
        [[[0.0], [0.0]], [[0.6], [0.0]], [[0.0], [0.7]], [[0.0], [0.0]]],
    )


# S=4, E=3. Columns (per expert): e0 (.5, .25, .25, .375), e1 (.375, .25,
# .125, .375), e2 (.125, .5, .625, .25).
PROBS_EC = [
    [
        [0.5, 0.375, 0.125],
        [0.25, 0.25, 0.5],
        [0.25, 0.125, 0.625],
        [0.375, 0.375, 0.25],
    ]
]


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
def test_experts_choose_hand_example_capacity_1(impl, normalize):
    """e0 and e1 both take t0, e2 takes t2; t1 and t3 get nothing.

    e1 ties t0 and t3 at 0.375: the lower token index wins.
    """
    actual = EXPERTS_CHOOSE[impl](
        np.float32(PROBS_EC), 1, normalize_combine_weights=normalize
    )
    if normalize:
        t0 = [[0.5 / 0.875], [0.375 / 0.875], [0.0]]
        t2 = [[0.0], [0.0], [1.0]]
    else:
        t0 = [[0.5], [0.375], [0.0]]
        t2 = [[0.0], [0.0], [0.625]]
    zeros = [[0.0], [0.0], [0.0]]
    _assert_hand_example(actual, [t0, zeros, t2, zeros])


@pytest.mark.parametrize("impl", IMPLS)
def test_experts_choose_hand_example_capacity_2(impl):
    """Slot c holds the expert's (c+1)-th best token.

    e0: t0 (.5), t3 (.375). e1: t0 (.375), t3 (.375; tie with t0, after it).
    e2: t2 (.625), t1 (.5).
    """
    actual = EXPERTS_CHOOSE[impl](np.float32(PROBS_EC), 2)
    _assert_hand_example(
        actual,
        [
            [[0.5, 0.0], [0.375, 0.0], [0.0, 0.0]],
            [[0.0, 0.0], [0.0, 0.0], [0.0, 0.5]],
            [[0.0, 0.0], [0.0, 0.0], [0.625, 0.0]],
            [[0.0, 0.375], [0.0, 0.375], [0.0, 0.0]],
        ],
    )


# --- token_mask --------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("batch_priority", [False, True])
@pytest.mark.parametrize("k", [1, 2])
def test_tokens_choose_token_mask(k, batch_priority, normalize):
    num_groups, num_tokens, num_experts = 3, 16, 4
    probs = _random_probs(_seed(k, 21), num_groups, num_tokens, num_experts)
    mask = _random_mask(_seed(k, 22), num_groups, num_tokens)
    capacity = 2
    kwargs = dict(
        batch_priority=batch_priority, normalize_combine_weights=normalize
    )
    combine, dispatch = _keras_moe_tokens_choose(
        probs, k, capacity, token_mask=mask, **kwargs
    )
    expected = ref.tokens_choose(
        probs,
        k,
        capacity,
        batch_priority=batch_priority,
        normalize=normalize,
        token_mask=mask,
    )
    assert expected.num_dropped > 0
    _assert_routed_equal((combine, dispatch), expected)
    # Masked tokens get nothing.
    assert not np.any(dispatch[~mask])
    assert not np.any(combine[~mask])
    # ... and take no capacity: routing only the kept tokens gives the same
    # slots to the same tokens.
    for g in range(num_groups):
        kept = np.flatnonzero(mask[g])
        sub_combine, sub_dispatch = _keras_moe_tokens_choose(
            probs[g : g + 1, kept], k, capacity, **kwargs
        )
        np.testing.assert_array_equal(dispatch[g, kept], sub_dispatch[0])
        np.testing.assert_allclose(
            combine[g, kept], sub_combine[0], atol=ATOL, rtol=RTOL
        )


def test_tokens_choose_all_tokens_masked():
    probs = _random_probs(3, 2, 8, 4)
    mask = np.zeros([2, 8], dtype=bool)
    combine, dispatch = _keras_moe_tokens_choose(
        probs, 2, 4, token_mask=mask, normalize_combine_weights=True
    )
    np.testing.assert_array_equal(dispatch, 0.0)
    np.testing.assert_array_equal(combine, 0.0)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("capacity", [1, 3, 16])
def test_experts_choose_token_mask(capacity, normalize):
    """Masked tokens are never chosen; experts choose among the others.

    With C = S there are fewer unmasked tokens than slots: the extra slots
    stay empty.
    """
    num_groups, num_tokens, num_experts = 3, 16, 4
    probs = _random_probs(
        _seed(capacity, 31), num_groups, num_tokens, num_experts
    )
    mask = _random_mask(_seed(capacity, 32), num_groups, num_tokens)
    combine, dispatch = _keras_moe_experts_choose(
        probs, capacity, token_mask=mask, normalize_combine_weights=normalize
    )
    expected = ref.experts_choose(
        probs, capacity, normalize=normalize, token_mask=mask
    )
    _assert_routed_equal((combine, dispatch), expected)
    assert not np.any(dispatch[~mask])
    assert dispatch.shape == (num_groups, num_tokens, num_experts, capacity)


# --- expert_capacity -------------------------------------------------------


@pytest.mark.parametrize(
    "num_tokens,num_experts,capacity_factor,k,min_capacity,router,expected",
    [
        # ceil(K * S * cf / E)
        (16, 4, 1.0, 1, 4, "tokens_choose", 4),
        (64, 8, 1.25, 1, 4, "tokens_choose", 10),
        (64, 8, 1.25, 2, 4, "tokens_choose", 20),
        (100, 8, 1.0, 1, 4, "tokens_choose", 13),  # ceil(12.5)
        (100, 8, 1.0, 2, 4, "tokens_choose", 25),
        (33, 4, 2.0, 2, 1, "tokens_choose", 33),  # 33, not capped
        (10, 4, 0.5, 1, 1, "tokens_choose", 2),  # ceil(1.25)
        # 20 * 1.1 / 2 is 11 exactly; float arithmetic gives 11.000000000000002.
        (20, 2, 1.1, 1, 4, "tokens_choose", 11),
        (16, 8, 1.1, 2, 1, "tokens_choose", 5),  # ceil(4.4)
        # Floored at min_expert_capacity.
        (16, 8, 1.0, 1, 4, "tokens_choose", 4),  # 2 -> 4
        (16, 8, 1.0, 1, 1, "tokens_choose", 2),
        (64, 32, 0.5, 1, 3, "tokens_choose", 3),  # 1 -> 3
        # Capped at S (also after the floor).
        (32, 4, 8.0, 2, 4, "tokens_choose", 32),  # 128 -> 32
        (6, 8, 1.0, 1, 8, "tokens_choose", 6),  # 1 -> 8 -> 6
        (2, 8, 1.0, 1, 4, "tokens_choose", 2),
        # capacity_factor=None: no token is ever dropped.
        (16, 4, None, 1, 4, "tokens_choose", 16),
        (3, 4, None, 2, 4, "tokens_choose", 3),
        (16, 4, None, 1, 4, "experts_choose", 16),
        # Expert choice: ceil(S * cf / E), K plays no part.
        (64, 8, 1.25, 1, 4, "experts_choose", 10),
        (64, 8, 1.25, 2, 4, "experts_choose", 10),
        (64, 8, 2.0, 1, 4, "experts_choose", 16),
        (10, 4, 0.5, 1, 1, "experts_choose", 2),
        (16, 8, 1.0, 1, 4, "experts_choose", 4),  # 2 -> 4
        (6, 2, 4.0, 1, 4, "experts_choose", 6),  # 12 -> 6
    ],
)
def test_expert_capacity(
    num_tokens, num_experts, capacity_factor, k, min_capacity, router, expected
):
    got = routing.expert_capacity(
        num_tokens,
        num_experts,
        capacity_factor,
        num_selected_experts=k,
        min_expert_capacity=min_capacity,
        router=router,
    )
    assert isinstance(got, int)
    assert got == expected
    # The table also pins the reference's formula.
    assert (
        ref.expert_capacity(
            num_tokens, num_experts, capacity_factor, k, min_capacity, router
        )
        == expected
    )


def test_expert_capacity_defaults():
    # K=1, min_expert_capacity=4, token choice.
    assert routing.expert_capacity(64, 8, 1.25) == 10
    assert routing.expert_capacity(16, 8, 1.0) == 4


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(capacity_factor=-1.0), "capacity_factor"),
        (dict(num_experts=0), "num_experts"),
        (dict(num_experts=-2), "num_experts"),
        (dict(num_experts=2, num_selected_experts=3), "num_selected_experts"),
    ],
)
def test_expert_capacity_errors(kwargs, match):
    args = dict(num_tokens=16, num_experts=4, capacity_factor=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        routing.expert_capacity(**args)


# --- XLA on computed inputs ------------------------------------------------


def _computed_probs_and_mask(seed, num_groups, num_tokens, num_experts):
    """Variables feed the compiled function, so XLA cannot fold constants."""
    rng = np.random.default_rng(seed)
    logits = tf.Variable(
        rng.normal(size=(num_groups, num_tokens, num_experts)).astype(
            np.float32
        )
    )
    mask_source = tf.Variable(
        _random_mask(seed + 1, num_groups, num_tokens).astype(np.float32)
    )
    return logits, mask_source


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize(
    "k,batch_priority,normalize",
    [(1, False, False), (1, True, True), (2, False, True), (2, True, False)],
)
def test_tokens_choose_under_xla(k, batch_priority, normalize, use_mask):
    num_groups, num_tokens, num_experts, capacity = 3, 16, 4, 3
    logits, mask_source = _computed_probs_and_mask(
        _seed(k, 41), num_groups, num_tokens, num_experts
    )

    @tf.function(jit_compile=True)
    def route():
        probs = tf.nn.softmax(logits, axis=-1)
        mask = tf.greater(mask_source, 0.5) if use_mask else None
        instructions = routing.tokens_choose(
            probs,
            k,
            capacity,
            batch_priority=batch_priority,
            normalize_combine_weights=normalize,
            token_mask=mask,
        )
        return (
            probs,
            instructions.combine_array(),
            instructions.dispatch_array(),
            instructions.token_index,
            instructions.combine_weights,
            instructions.dispatch_mask,
        )

    probs, combine, dispatch, *_ = (np.asarray(t) for t in route())
    mask = (np.asarray(mask_source) > 0.5) if use_mask else None
    expected = ref.tokens_choose(
        probs,
        k,
        capacity,
        batch_priority=batch_priority,
        normalize=normalize,
        token_mask=mask,
    )
    assert expected.num_dropped > 0
    _assert_routed_equal((combine, dispatch), expected)
    # Same answer as eager execution.
    eager = _keras_moe_tokens_choose(
        probs,
        k,
        capacity,
        token_mask=mask,
        batch_priority=batch_priority,
        normalize_combine_weights=normalize,
    )
    np.testing.assert_array_equal(dispatch, eager[1])
    np.testing.assert_allclose(combine, eager[0], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_experts_choose_under_xla(normalize, use_mask):
    num_groups, num_tokens, num_experts, capacity = 3, 16, 4, 5
    logits, mask_source = _computed_probs_and_mask(
        _seed(51, int(normalize)), num_groups, num_tokens, num_experts
    )

    @tf.function(jit_compile=True)
    def route():
        probs = tf.nn.softmax(logits, axis=-1)
        mask = tf.greater(mask_source, 0.5) if use_mask else None
        instructions = routing.experts_choose(
            probs,
            capacity,
            normalize_combine_weights=normalize,
            token_mask=mask,
        )
        return (
            probs,
            instructions.combine_array(),
            instructions.dispatch_array(),
        )

    probs, combine, dispatch = (np.asarray(t) for t in route())
    mask = (np.asarray(mask_source) > 0.5) if use_mask else None
    expected = ref.experts_choose(
        probs, capacity, normalize=normalize, token_mask=mask
    )
    _assert_routed_equal((combine, dispatch), expected)


# --- Slot (index) form against the dense form ------------------------------


def _assert_index_form_consistent(instructions, num_groups, num_tokens):
    token_index = np.asarray(instructions.token_index)
    weights = np.asarray(instructions.combine_weights)
    filled = np.asarray(instructions.dispatch_mask)
    combine, dispatch = _arrays(instructions)
    _, _, num_experts, capacity = dispatch.shape
    assert dispatch.shape == (num_groups, num_tokens, num_experts, capacity)
    assert token_index.shape == (num_groups, num_experts, capacity)
    assert weights.shape == filled.shape == token_index.shape
    assert token_index.dtype == np.int32
    assert weights.dtype == filled.dtype == np.float32
    assert combine.dtype == dispatch.dtype == np.float32
    assert instructions.num_tokens == num_tokens
    assert set(np.unique(filled)) <= {0.0, 1.0}
    # Each slot holds at most one token, and exactly when it is filled.
    np.testing.assert_array_equal(dispatch.sum(axis=1), filled)
    for g, e, c in itertools.product(
        range(num_groups), range(num_experts), range(capacity)
    ):
        if filled[g, e, c]:
            s = token_index[g, e, c]
            assert 0 <= s < num_tokens
            assert dispatch[g, s, e, c] == 1.0
            np.testing.assert_allclose(
                combine[g, s, e, c], weights[g, e, c], atol=ATOL
            )
        else:
            assert weights[g, e, c] == 0.0
    np.testing.assert_allclose(
        np.asarray(instructions.token_coverage()), dispatch.sum(axis=(2, 3))
    )
    np.testing.assert_allclose(
        np.asarray(instructions.tokens_per_expert()),
        dispatch.sum(axis=(1, 3)),
    )


@pytest.mark.parametrize(
    "k,batch_priority,capacity,use_mask",
    [
        (1, False, 2, False),
        (1, True, 2, True),
        (2, False, 3, True),
        (2, True, 33, False),
    ],
)
def test_tokens_choose_index_form(k, batch_priority, capacity, use_mask):
    num_groups, num_tokens, num_experts = 3, 33, 4
    probs = _random_probs(
        _seed(k, capacity, 61), num_groups, num_tokens, num_experts
    )
    mask = _random_mask(62, num_groups, num_tokens) if use_mask else None
    instructions = routing.tokens_choose(
        tf.constant(probs),
        k,
        capacity,
        batch_priority=batch_priority,
        normalize_combine_weights=True,
        token_mask=None if mask is None else tf.constant(mask),
    )
    _assert_index_form_consistent(instructions, num_groups, num_tokens)


@pytest.mark.parametrize(
    "capacity,use_mask", [(1, False), (5, True), (33, True)]
)
def test_experts_choose_index_form(capacity, use_mask):
    num_groups, num_tokens, num_experts = 3, 33, 4
    probs = _random_probs(
        _seed(capacity, 71), num_groups, num_tokens, num_experts
    )
    mask = _random_mask(72, num_groups, num_tokens) if use_mask else None
    instructions = routing.experts_choose(
        tf.constant(probs),
        capacity,
        token_mask=None if mask is None else tf.constant(mask),
    )
    _assert_index_form_consistent(instructions, num_groups, num_tokens)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
