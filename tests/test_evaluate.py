"""Offline recall (`evaluate.evaluate_predictors`) against recall counted by hand on a routing
example small enough to read: four tokens, a router that picks the largest of the first eight
hidden features, and the experts each token "actually" chose written out."""

import pytest
import torch
from tiny_models import make_model, prompt, sized_config

from moe_prefetch.experts.layout import find_moe_layers
from moe_prefetch.predict.evaluate import _overlap, evaluate_predictors, format_table
from moe_prefetch.predict.m2r2 import Adapters
from moe_prefetch.predict.residuals import Residuals, collect


def _scores(*ranked: int, hidden: int = 32) -> torch.Tensor:
    """A residual whose router scores rank `ranked` first, in that order (the rest score 0)."""
    h = torch.zeros(hidden)
    for place, expert_id in enumerate(ranked):
        h[expert_id] = float(len(ranked) - place)
    return h


@pytest.fixture(scope="module")
def example():
    """Tiny Mixtral (2 layers, 8 experts, top-2); layer 1's router reads expert e's score from
    hidden feature e, so next-gate from layer 0's residual predicts what `_scores` ranks first."""
    model = make_model("mixtral")
    layers = find_moe_layers(model)
    with torch.no_grad():
        for layer in layers:
            layer.norm.weight.fill_(1.0)  # RMS norm: a positive scale per token keeps the ranking
            layer.router.weight.copy_(torch.eye(8, 32))
    # Sequence 0 holds tokens 0-2, sequence 1 token 3 (it has no previous token).
    ranked = [(1, 2, 3, 4), (1, 5, 6, 7), (2, 3, 4, 5), (0, 1, 6, 7)]
    chosen_1 = [(1, 2), (5, 1), (4, 7), (5, 0)]  # what layer 1's router chose for each token
    chosen_0 = [(0, 3), (3, 1), (1, 5), (2, 6)]
    hidden = torch.stack([_scores(*r) for r in ranked])
    data = Residuals(
        hidden={0: [hidden], 1: [torch.zeros(4, 32)]},
        router_in={0: [torch.zeros(4, 32)], 1: [torch.zeros(4, 32)]},
        chosen={0: [torch.tensor(chosen_0)], 1: [torch.tensor(chosen_1)]},
        seq_ids=[torch.tensor([0, 0, 0, 1])],
    )
    return model, data


def test_next_gate_recall_matches_a_count_by_hand(example):
    model, data = example
    result = evaluate_predictors(model, data, lookahead=1, margin=2, predictors=("next-gate",))
    (pair,) = result["predictors"]["next-gate"]["by_pair"]
    assert (pair["source"], pair["target"], pair["d"]) == (0, 1, 1)
    # top-2 named vs chosen, per token: {1,2} vs (1,2): 2 hits; {1,5} vs (5,1): 2; {2,3} vs (4,7): 0;
    # {0,1} vs (5,0): 1. Recall: hits over k, averaged over the 4 tokens.
    assert pair["recall"] == pytest.approx((2 + 2 + 0 + 1) / 2 / 4)
    # top-4 (k + margin 2): {1,2,3,4}: 2 hits; {1,5,6,7}: 2; {2,3,4,5}: 1 (4); {0,1,6,7}: 1 (0)
    assert pair["recall_at_k_plus_margin"] == pytest.approx((2 + 2 + 1 + 1) / 2 / 4)
    assert pair["precision_at_k_plus_margin"] == pytest.approx((2 + 2 + 1 + 1) / 4 / 4)
    assert result["predictors"]["next-gate"]["by_distance"][1]["recall"] == pair["recall"]
    assert result["tokens"] == 4 and "0.625" in format_table(result)


def test_previous_token_recall_matches_a_count_by_hand(example):
    model, data = example
    result = evaluate_predictors(model, data, lookahead=1, margin=2, predictors=("previous-token",))
    pairs = {p["target"]: p for p in result["predictors"]["previous-token"]["by_pair"]}
    # Tokens 1 and 2 have a previous token in their sequence; token 3 starts sequence 1.
    # layer 1: (5, 1) after (1, 2): 1 of 2; (4, 7) after (5, 1): 0 of 2.
    assert list(pairs) == [1] and pairs[1]["recall"] == pytest.approx((1 + 0) / 2 / 2)
    # k + margin adds token i-2's experts where the sequence has one: token 1 has none (token 3's
    # (5, 0), which would name its 5, is in another sequence), so {1,2}: 1 of (5, 1); token 2:
    # {5,1} + {1,2} vs (4, 7): 0. Precision over the 4 named.
    assert pairs[1]["recall_at_k_plus_margin"] == pytest.approx((1 + 0) / 2 / 2)
    assert pairs[1]["precision_at_k_plus_margin"] == pytest.approx((1 + 0) / 4 / 2)


def test_a_margin_beyond_the_experts_names_them_all(example):
    model, data = example
    result = evaluate_predictors(model, data, lookahead=1, margin=10, predictors=("next-gate",))
    (pair,) = result["predictors"]["next-gate"]["by_pair"]
    assert pair["recall_at_k_plus_margin"] == 1.0 and pair["precision_at_k_plus_margin"] == pytest.approx(2 / 8)
    assert (result["lookahead"], result["margin"]) == (1, 10)


@pytest.mark.parametrize("source", ["residual", "router-input"])
def test_untrained_adapters_score_as_next_gate_from_their_point(example, source):
    """An adapter whose `up` is zero is the identity: its row is next-gate's from the same point.
    From the router input a next-gate row from that point is added, for a like-for-like comparison;
    a pair without an adapter is next-gate's too."""
    model, data = example
    adapters = Adapters(32, 2, [(0, 1)] if source == "residual" else [], source)
    result = evaluate_predictors(model, data, lookahead=1, adapters=adapters, predictors=("next-gate", "m2r2"))
    rows = result["predictors"]
    expected = {"next-gate", "m2r2"} | ({"next-gate@router-input"} if source == "router-input" else set())
    assert set(rows) == expected
    same_point = rows["next-gate" if source == "residual" else "next-gate@router-input"]
    assert rows["m2r2"]["by_pair"] == same_point["by_pair"]
    assert evaluate_predictors(model, data, lookahead=1, predictors=("m2r2",))["predictors"] == {}  # no adapters


def test_the_table_lays_out_distances_and_target_layers():
    row = dict(recall=0.5, precision_at_k_plus_margin=0.25, recall_at_k_plus_margin=0.75)
    result = {
        "tokens": 10,
        "lookahead": 2,
        "margin": 2,
        "predictors": {
            "next-gate": {
                "by_distance": {
                    1: row,
                    2: dict(recall=0.125, precision_at_k_plus_margin=0.1, recall_at_k_plus_margin=0.2),
                },
                "by_pair": [dict(source=0, target=1, d=1, recall=0.5), dict(source=0, target=2, d=2, recall=0.125)],
            },
            "m2r2": {
                "by_distance": {1: dict(recall=0.625, precision_at_k_plus_margin=0.3, recall_at_k_plus_margin=0.8)},
                "by_pair": [dict(source=1, target=2, d=1, recall=0.625)],
            },
        },
    }
    assert format_table(result).split("\n") == [
        "held-out tokens: 10   predictor recall@k: share of the router's top-k named (k+2: precision / recall)",
        "predictor                       d=1                     d=2",
        "next-gate         0.500 (0.25/0.75)       0.125 (0.10/0.20)",
        "m2r2              0.625 (0.30/0.80)                        ",
        "",
        "predictor recall@k per target MoE layer (predicted d layers ahead)",
        "predictor    d      L1      L2",
        "next-gate    1   0.500       -",
        "next-gate    2       -   0.125",
        "m2r2         1       -   0.625",
        "m2r2         2       -       -",
    ]


def test_overlap_counts_each_actual_expert_once():
    pred = torch.tensor([[1, 2, 1, 5], [3, 3, 3, 3]])  # a margin can repeat an expert
    actual = torch.tensor([[1, 7], [3, 4]])
    assert _overlap(pred, actual).tolist() == [1.0, 1.0]


def test_defaults_look_three_layers_ahead_with_a_margin_of_two(example):
    model, data = example
    result = evaluate_predictors(model, data, predictors=("next-gate",))
    assert (result["lookahead"], result["margin"]) == (3, 2)


def test_previous_token_follows_sequences_of_any_length():
    """Sequence 0 is one token, sequence 1 three: token 1 has no previous token, token 2 none
    two back (its margin names nothing), token 3's margin is token 1's experts."""
    model = make_model("mixtral")
    chosen = torch.tensor([[0, 7], [2, 6], [3, 1], [5, 6]])
    data = Residuals(
        hidden={0: [torch.zeros(4, 32)], 1: [torch.zeros(4, 32)]},
        router_in={0: [torch.zeros(4, 32)], 1: [torch.zeros(4, 32)]},
        chosen={0: [chosen], 1: [chosen]},
        seq_ids=[torch.tensor([0, 1, 1, 1])],
    )
    result = evaluate_predictors(model, data, lookahead=1, margin=2, predictors=("previous-token",))
    (pair,) = result["predictors"]["previous-token"]["by_pair"]
    # token 2: (3, 1) after (2, 6): 0 hits; token 3: (5, 6) after (3, 1): 0, and with token 1's (2, 6): 1
    assert pair["recall"] == 0.0
    assert pair["recall_at_k_plus_margin"] == pytest.approx((0 + 1) / 2 / 2)


def test_lookahead_limits_the_distances_scored():
    model = make_model("mixtral", config=sized_config("mixtral", num_hidden_layers=3))
    data = collect(model, prompt(batch=2, length=6))
    result = evaluate_predictors(model, data, lookahead=1, predictors=("next-gate",))
    pairs = [(p["source"], p["target"], p["d"]) for p in result["predictors"]["next-gate"]["by_pair"]]
    assert pairs == [(0, 1, 1), (1, 2, 1)]
    by_pair = result["predictors"]["next-gate"]["by_pair"]
    mean = sum(p["recall"] for p in by_pair) / 2
    assert result["predictors"]["next-gate"]["by_distance"][1]["recall"] == pytest.approx(mean)


def test_m2r2_scores_next_gate_on_the_adapted_residual(example):
    """A trained adapter's row is next-gate's on the residual the adapter makes."""
    model, data = example
    adapters = Adapters(32, 2, [(0, 1)], "residual")
    torch.manual_seed(1)
    torch.nn.init.normal_(adapters.get(0, 1).up.weight, std=3.0)
    with torch.no_grad():
        adapted = adapters.get(0, 1)(data.get("hidden", 0))
    moved = Residuals({0: [adapted], 1: data.hidden[1]}, data.router_in, data.chosen, data.seq_ids)
    m2r2 = evaluate_predictors(model, data, lookahead=1, adapters=adapters, predictors=("m2r2",))
    next_gate = evaluate_predictors(model, data, lookahead=1, predictors=("next-gate",))
    on_adapted = evaluate_predictors(model, moved, lookahead=1, predictors=("next-gate",))
    assert m2r2["predictors"]["m2r2"]["by_pair"] == on_adapted["predictors"]["next-gate"]["by_pair"]
    assert m2r2["predictors"]["m2r2"]["by_pair"] != next_gate["predictors"]["next-gate"]["by_pair"]
