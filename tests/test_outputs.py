"""Prediction changes nothing the model returns: router logits, aux loss, hidden states, attentions.

transformers records router logits with forward hooks on the router modules, so a predictor
that called a router as a module would add entries (and change aux_loss)."""

import pytest
import torch
from tiny_models import CLASSIC, make_model, prompt

import moe_prefetch
from moe_prefetch.experts.layout import find_moe_layers
from moe_prefetch.predict.m2r2 import Adapters, TrainSettings, pairs, save_adapters

PREDICTORS = ["none", "previous-token", "next-gate", "m2r2-router-input", "m2r2-residual", "oracle"]
LOOKAHEAD = 2


@pytest.fixture(scope="module")
def stock():
    """arch -> (model, its stock outputs for the prompt); each test attaches and detaches it."""
    cache = {}

    def get(arch):
        if arch not in cache:
            model = make_model(arch)
            model.set_attn_implementation("eager")  # attention weights come from eager attention only
            cache[arch] = (model, _run(model, prompt(2, 5)))
        return cache[arch]

    return get


def _run(model, ids):
    with torch.no_grad():
        return model(ids, output_router_logits=True, output_hidden_states=True, output_attentions=True)


def _untrained_adapters(model, folder, source):
    """Adapters as train-predictor writes them, before any step: up = 0, so the identity."""
    layers = find_moe_layers(model)
    keys = [(l, t) for l, t, _ in pairs(model.config.num_hidden_layers, layers, LOOKAHEAD, source)]
    adapters = Adapters(model.config.hidden_size, 4, keys, source)
    settings = TrainSettings(lookahead=LOOKAHEAD, rank=4, steps=1, source=source)
    return save_adapters(folder / f"{source}.safetensors", adapters, model, layers, settings, {}, [])


def _attach(model, predictor, tmp_path, ids):
    options = dict(device="cpu", cache_slots=4, lookahead=LOOKAHEAD)
    if predictor.startswith("m2r2"):
        path = _untrained_adapters(model, tmp_path, predictor.removeprefix("m2r2-"))
        return moe_prefetch.attach(model, predictor="m2r2", predictor_path=str(path), **options)
    runtime = moe_prefetch.attach(model, predictor=predictor, **options)
    if predictor == "oracle":  # replay this prompt's own routing, recorded by a first run
        _run(model, ids)
        trace = list(runtime.trace)
        runtime.reset_stats()
        runtime.predictor.load_trace(trace)
    return runtime


def _same(actual, expected, what):
    assert (actual is None) == (expected is None), what
    if expected is None:
        return
    if isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0, msg=what)
        return
    assert len(actual) == len(expected), f"{what}: {len(actual)} tensors, stock returns {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=0, msg=f"{what}[{i}]")


@pytest.mark.parametrize("predictor", PREDICTORS)
@pytest.mark.parametrize("arch", CLASSIC)
def test_prediction_leaves_outputs_alone(stock, arch, predictor, tmp_path):
    ids = prompt(2, 5)
    model, expected = stock(arch)
    if getattr(expected, "router_logits", None) is None:
        pytest.skip(f"{arch} returns no router logits")
    runtime = _attach(model, predictor, tmp_path, ids)
    try:
        actual = _run(model, ids)
        if predictor not in ("none", "previous-token"):  # previous-token has no history in one forward
            # the prediction point still fires for the model's own calls (router-input: the router's pre-hook)
            assert runtime.predictions, "the predictor never ran"
        if predictor == "m2r2-router-input":  # once per MoE layer with a later one, at the model's own router call
            assert len(runtime.predictions) == len(runtime.layers) - 1
    finally:
        runtime.detach()
    for name in ("router_logits", "aux_loss", "hidden_states", "attentions", "logits"):
        _same(getattr(actual, name, None), getattr(expected, name, None), f"{arch}/{predictor}: {name}")
