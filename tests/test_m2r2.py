"""M2R2 adapters: they train, save with a fingerprint, refuse other models, and never change outputs."""

import hashlib
import json
import logging
import math
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch
from tiny_models import make_model, prompt, sized_config

import moe_prefetch
from moe_prefetch.experts.layout import find_moe_layers
from moe_prefetch.predict.evaluate import evaluate_predictors, format_table
from moe_prefetch.predict.m2r2 import (
    Adapter,
    Adapters,
    M2R2Predictor,
    TrainSettings,
    _cpu_router,
    _val_recall,
    fingerprint,
    load_adapters,
    pairs,
    router_logits,
    save_adapters,
    train_adapters,
)
from moe_prefetch.predict.residuals import collect

SETTINGS = TrainSettings(lookahead=1, rank=4, steps=60, batch_tokens=128)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model = make_model("mixtral")
    layers = find_moe_layers(model)
    data = collect(model, prompt(batch=12, length=24, seed=1))
    adapters, metrics = train_adapters(model, layers, data, SETTINGS)
    path = tmp_path_factory.mktemp("m2r2") / "m2r2_adapters.safetensors"
    save_adapters(path, adapters, model, layers, SETTINGS, metrics, ["random"])
    return model, layers, data, path, metrics


def test_untrained_adapter_is_identity():
    h = torch.randn(5, 32)
    assert torch.equal(Adapter(32, 4)(h), h)


def test_collect_shapes():
    model = make_model("olmoe")
    data = collect(model, prompt(batch=3, length=8))
    assert data.num_tokens == 24
    assert data.get("hidden", 0).shape == (24, 32) and data.get("chosen", 1).shape == (24, 2)


@pytest.fixture(scope="module")
def demo():
    """The trained demo (fp32) and its residuals on the first 2048 tokens of the held-out split:
    a model whose routing is peaked enough that adapters have something to learn."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moe_prefetch.model.folders import resolve_path
    from moe_prefetch.predict.heldout import heldout_ids

    folder = resolve_path("demo")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = heldout_ids(AutoTokenizer.from_pretrained(str(folder)), max_tokens=2048, seq_len=128)
    return folder, model, find_moe_layers(model), collect(model, ids)


@pytest.mark.e2e
def test_training_lowers_the_loss_moves_the_adapters_and_beats_next_gate(demo):
    """80 steps on the demo's residuals: the loss of the last steps is well below the first
    steps' (the start is exactly next-gate), every adapter has left its start (`up` is zero
    there), and on the held-out tenth of the sequences the adapters name more of the router's
    top-k than next-gate from the same point."""
    _, model, layers, data = demo
    settings = TrainSettings(lookahead=1, rank=8, steps=80, batch_tokens=256)
    losses = []
    adapters, metrics = train_adapters(model, layers, data, settings, progress=lambda step, loss: losses.append(loss))
    assert len(losses) == settings.steps and metrics["final_loss"] == losses[-1]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first, f"loss {first:.4f} -> {last:.4f}"
    for key, block in adapters.blocks.items():
        assert block.up.weight.abs().max() > 0, f"adapter {key} never left its start"
    recall = metrics["val_recall"]
    assert metrics["val_tokens"] > 0 and recall["m2r2"][1] > recall["next-gate"][1]


@pytest.mark.e2e
def test_the_shipped_demo_adapters_beat_next_gate_on_held_out_text(demo):
    """The demo's own adapters (lookahead 3, from the router input), scored by
    `evaluate_predictors` on held-out text: at every distance at least next-gate from the same
    point, which in turn is at least next-gate from the decoder layer's input."""
    folder, model, layers, data = demo
    adapters, meta = load_adapters(folder / "m2r2_adapters.safetensors", model, layers)
    result = evaluate_predictors(model, data, lookahead=meta["settings"].lookahead, adapters=adapters)
    rows = {name: r["by_distance"] for name, r in result["predictors"].items()}
    for d in (1, 2, 3):
        assert (
            rows["m2r2"][d]["recall"] >= rows["next-gate@router-input"][d]["recall"] >= rows["next-gate"][d]["recall"]
        )


def test_adapters_round_trip_and_fingerprint(trained, tmp_path):
    model, layers, _, path, _ = trained
    adapters, meta = load_adapters(path, model, layers)
    assert meta["settings"] == SETTINGS and len(adapters.keys) == 1
    other = make_model("mixtral", seed=7)
    theirs, ours = fingerprint(model, layers), fingerprint(other, find_moe_layers(other))
    message = f"trained for another model \\(fingerprint {theirs}, this model {ours}\\); train them with"
    with pytest.raises(moe_prefetch.PredictorError, match=message):
        load_adapters(path, other, find_moe_layers(other))
    missing = tmp_path / "none.safetensors"
    with pytest.raises(moe_prefetch.PredictorError, match=f"--out {missing}`$"):
        load_adapters(missing, model, layers)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(moe_prefetch.PredictorError, match="not a readable adapters file"):
        load_adapters(tmp_path / "junk.safetensors", model, layers)


def test_m2r2_keeps_outputs_exact(trained):
    model, _, _, path, _ = trained
    ids = prompt(2, 6, seed=3)
    mask = torch.ones_like(ids)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    runtime = moe_prefetch.attach(
        model, device="cpu", cache_slots=3, predictor="m2r2", predictor_path=str(path), verify_slots=True
    )
    try:
        got = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        assert torch.equal(got, expected)
        assert runtime.stats()["prefetch_issued"] > 0
    finally:
        runtime.detach()


def test_lookahead_beyond_training_is_refused(trained):
    model, _, _, path, _ = trained
    with pytest.raises(moe_prefetch.PredictorError, match="lookahead <= 1"):
        moe_prefetch.attach(model, device="cpu", cache_slots=3, predictor="m2r2", predictor_path=str(path), lookahead=2)
    assert getattr(model, "_moe_prefetch_runtime", None) is None
    assert all(p.numel() > 0 for p in model.parameters()), "a refused attach must leave the model whole"


def test_evaluation_table(trained):
    model, layers, data, path, _ = trained
    adapters, _ = load_adapters(path, model, layers)
    result = evaluate_predictors(model, data, lookahead=1, adapters=adapters, margin=2)
    assert set(result["predictors"]) == {"previous-token", "next-gate", "next-gate@router-input", "m2r2"}
    row = result["predictors"]["next-gate"]["by_distance"][1]
    assert 0.0 <= row["recall"] <= 1.0 and row["recall_at_k_plus_margin"] >= row["recall"]
    assert "m2r2" in format_table(result)


def test_interrupted_training_resumes_to_the_same_adapters(trained, tmp_path, caplog):
    model, layers, data, _, _ = trained
    settings = TrainSettings(lookahead=1, rank=4, steps=40, batch_tokens=64)
    straight, _ = train_adapters(model, layers, data, settings)
    ckpt = tmp_path / "train.ckpt"

    def interrupt(step, loss):
        if step == 24:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_adapters(model, layers, data, settings, progress=interrupt, checkpoint=ckpt, checkpoint_every=10)
    assert ckpt.is_file() and not (tmp_path / "train.ckpt.tmp").exists()
    steps = []
    with caplog.at_level(logging.INFO, logger="moe_prefetch.predict.m2r2"):
        resumed, _ = train_adapters(
            model, layers, data, settings, progress=lambda s, _: steps.append(s), checkpoint=ckpt, checkpoint_every=10
        )
    assert f"resuming M2R2 training from step 25 ({ckpt})" in caplog.messages  # step 24 completed
    assert steps == list(range(25, 40)), "only the steps still to do"
    assert not ckpt.exists(), "a finished run removes its checkpoint"
    assert all(block.up.weight.abs().max() > 0 for block in resumed.blocks.values()), "the runs trained"
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("source", ["router-input", "residual"])
def test_both_prediction_points_prefetch_and_stay_exact(trained, tmp_path, source):
    model, layers, data, _, _ = trained
    settings = TrainSettings(lookahead=1, rank=4, steps=20, batch_tokens=64, source=source)
    adapters, metrics = train_adapters(model, layers, data, settings)
    path = save_adapters(tmp_path / "a.safetensors", adapters, model, layers, settings, metrics, ["random"])
    assert load_adapters(path, model, layers)[0].source == source
    ids = prompt(1, 6, seed=4)
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    runtime = moe_prefetch.attach(model, device="cpu", cache_slots=3, predictor="m2r2", predictor_path=str(path))
    try:
        assert runtime.predictor.source == source
        got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        assert torch.equal(got, expected)
        # predictions are made at layer 0: its router input, or its decoder input
        assert runtime.predictions and all(p["layer_idx"] == 0 for p in runtime.predictions)
    finally:
        runtime.detach()
    assert not any(m._forward_pre_hooks for m in model.modules()), "detach must remove every hook"


# -- the parts one by one: settings, pairs, the adapter, training's split, schedule and loss ------
@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(lookahead=0), "lookahead 1..8"),
        (dict(lookahead=9), "lookahead 1..8"),
        (dict(rank=0), "rank/steps/batch >= 1"),
        (dict(steps=0), "rank/steps/batch >= 1"),
        (dict(batch_tokens=0), "rank/steps/batch >= 1"),
        (dict(lr=0.0), "lr > 0"),
        (dict(source="hidden"), "must be one of router-input, residual"),
    ],
)
def test_train_settings_refuse_each_bad_value(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainSettings(**bad)


def test_train_settings_accept_the_edges_and_default_to_the_router_input():
    TrainSettings(lookahead=1, rank=1, steps=1, batch_tokens=1, lr=1e-9)
    TrainSettings(lookahead=8, source="residual")
    defaults = TrainSettings()
    assert (defaults.lookahead, defaults.rank, defaults.source) == (3, 16, "router-input")


def test_pairs_name_each_source_and_the_next_moe_layers_ahead():
    layers = [SimpleNamespace(layer_idx=i) for i in (0, 2, 3)]  # decoder layer 1 is dense
    assert pairs(4, layers, 2, "router-input") == [(0, 2, 1), (0, 3, 2), (2, 3, 1)]
    assert pairs(4, layers, 2) == [(0, 2, 1), (0, 3, 2), (1, 2, 1), (1, 3, 2), (2, 3, 1)]  # residual: every layer
    assert pairs(4, layers, 1, "residual") == [(0, 2, 1), (1, 2, 1), (2, 3, 1)]


@pytest.mark.parametrize("bias", [True, False])
def test_router_logits_are_the_routers_scores_in_float(bias):
    torch.manual_seed(0)
    router = torch.nn.Linear(6, 4, bias=bias).to(torch.bfloat16)
    x = torch.randn(3, 6).to(torch.bfloat16)
    got = router_logits(SimpleNamespace(router=router), x)
    bias_f = router.bias.float() if bias else None
    assert got.dtype == torch.float32
    assert torch.equal(got, torch.nn.functional.linear(x.float(), router.weight.float(), bias_f))


def test_a_trained_adapter_adds_a_low_rank_update_scaled_by_the_residuals_rms():
    torch.manual_seed(0)
    adapter = Adapter(16, 4)
    assert adapter.down.bias is None and adapter.up.bias is None
    torch.nn.init.normal_(adapter.up.weight)
    h = torch.randn(3, 16)
    rms = h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    expected = h + adapter.up(torch.nn.functional.silu(adapter.down(h / rms))) * rms
    torch.testing.assert_close(adapter(h), expected)
    torch.testing.assert_close(adapter(3.0 * h), 3.0 * adapter(h), rtol=1e-5, atol=1e-5)  # scale-equivariant
    assert adapter.to(torch.bfloat16)(h.to(torch.bfloat16)).dtype == torch.bfloat16


def test_an_adapter_starts_with_down_at_unit_gain_and_up_at_zero():
    torch.manual_seed(0)
    adapter = Adapter(256, 64)
    assert adapter.down.weight.shape == (64, 256) and adapter.up.weight.shape == (256, 64)
    assert adapter.down.weight.std().item() == pytest.approx(256**-0.5, rel=0.05)
    assert adapter.up.weight.abs().max() == 0


def test_adapters_are_named_by_pair_and_absent_pairs_are_none():
    adapters = Adapters(8, 2, [(0, 1), (1, 3)], "router-input")
    assert (adapters.rank, adapters.keys, adapters.source) == (2, [(0, 1), (1, 3)], "router-input")
    assert set(adapters.blocks) == {"0_1", "1_3"} and adapters.get(1, 3) is adapters.blocks["1_3"]
    assert adapters.get(0, 3) is None and adapters.get(3, 1) is None
    assert Adapters(8, 2, [(0, 1)]).source == "residual"


def test_the_fingerprint_follows_the_routers_and_the_shape():
    model = make_model("mixtral")
    layers = find_moe_layers(model)
    mine = fingerprint(model, layers)
    assert len(mine) == 16 and int(mine, 16) >= 0
    assert fingerprint(make_model("mixtral"), find_moe_layers(make_model("mixtral"))) == mine
    weight = layers[1].router.weight.detach().clone()
    with torch.no_grad():
        layers[1].router.weight[0, 0] += 1.0
    assert fingerprint(model, layers) != mine
    with torch.no_grad():
        layers[1].router.weight.copy_(weight)
    assert fingerprint(model, layers) == mine
    model.config.vocab_size += 1
    assert fingerprint(model, layers) != mine


def test_the_fingerprint_hashes_the_shape_as_sorted_json_then_the_router_weights():
    """The format saved adapter files carry (the demo's among them): changing it orphans them."""
    config = SimpleNamespace(model_type="x", hidden_size=4, num_hidden_layers=1, vocab_size=10)
    router = torch.nn.Linear(4, 2, bias=False)
    layers = [SimpleNamespace(layer_idx=0, num_experts=2, top_k=1, router=router)]
    digest = hashlib.sha256()
    shape = '{"experts": [[0, 2, 1]], "hidden_size": 4, "model_type": "x", "num_hidden_layers": 1, "vocab_size": 10}'
    digest.update(shape.encode())
    digest.update(router.weight.detach().numpy().tobytes())
    assert fingerprint(SimpleNamespace(config=config), layers) == digest.hexdigest()[:16]


@pytest.fixture(scope="module")
def small_data():
    """Ten sequences of 8 tokens of the tiny Mixtral: training keeps sequences 0-8, holds out 9."""
    model = make_model("mixtral")
    return model, find_moe_layers(model), collect(model, prompt(batch=10, length=8, seed=2))


def test_training_holds_out_the_last_tenth_of_the_sequences(small_data, tmp_path):
    model, layers, data = small_data
    settings = TrainSettings(lookahead=1, rank=2, steps=1, batch_tokens=8)
    adapters, metrics = train_adapters(model, layers, data, settings, checkpoint=tmp_path / "never.ckpt")
    assert adapters.source == "router-input" and adapters.keys == [(0, 1)]
    assert (metrics["train_tokens"], metrics["val_tokens"]) == (72, 8) and 0 <= metrics["train_seconds"] < 600
    assert metrics["val_recall"]["next-gate"] == {1: pytest.approx(_next_gate_recall(layers[1], data, range(72, 80)))}
    assert all(p.requires_grad for p in model.parameters()), "training leaves the model's own parameters alone"
    three = collect(model, prompt(batch=3, length=8, seed=2))  # the tenth rounds down to sequence 2
    assert train_adapters(model, layers, three, settings)[1]["train_tokens"] == 16
    assert set(metrics["val_recall"]) == {"m2r2", "next-gate"} and set(metrics["val_recall"]["m2r2"]) == {1}
    one = collect(model, prompt(batch=1, length=8, seed=2))  # one sequence: all of it trains
    _, metrics = train_adapters(model, layers, one, settings)
    assert (metrics["train_tokens"], metrics["val_tokens"]) == (8, 0) and "val_recall" not in metrics


def _next_gate_recall(layer, data, rows) -> float:
    """Share of layer 1's top-2 (by its router on its own input) that its router names on layer
    0's router input, over `rows`: next-gate's held-out recall, counted by hand."""
    rows = torch.tensor(list(rows))
    actual = torch.topk(router_logits(layer, data.get("router_in", 1)[rows]), 2).indices
    named = torch.topk(router_logits(layer, layer.norm(data.get("router_in", 0)[rows])), 2).indices
    return sum(len(set(a.tolist()) & set(n.tolist())) for a, n in zip(actual, named)) / (2 * len(rows))


def test_the_frozen_router_copy_keeps_its_bias():
    router = torch.nn.Linear(4, 3, bias=True)
    x = torch.randn(2, 4)
    torch.testing.assert_close(_cpu_router(SimpleNamespace(router=router))(x), router(x))


def test_held_out_recall_counts_the_routers_top_k_named(small_data):
    """Untrained adapters are next-gate: both rows equal a count by hand on the held-out rows."""
    model, layers, data = small_data
    adapters = Adapters(32, 2, [(0, 1)], "router-input")
    rows = torch.arange(72, 80)
    layer = layers[1]
    frozen = {1: (layer.norm, lambda x: router_logits(layer, x))}
    got = _val_recall(adapters, [(0, 1, 1)], data, rows, frozen, {1: layer})
    actual = torch.topk(router_logits(layer, data.get("router_in", 1)[rows]), 2).indices
    named = torch.topk(router_logits(layer, layer.norm(data.get("router_in", 0)[rows])), 2).indices
    hits = sum(len(set(a.tolist()) & set(n.tolist())) for a, n in zip(actual, named))
    assert got["m2r2"] == got["next-gate"] == {1: pytest.approx(hits / 16)}
    twice = _val_recall(adapters, [(0, 1, 1), (0, 1, 1)], data, rows, frozen, {1: layer})
    assert twice == got  # a distance's recall is the mean over its pairs
    assert 0 < hits < 16  # the count means something


def test_the_first_step_is_the_loss_of_the_docstring_at_a_fiftieth_of_the_rate(small_data):
    """At the start the adapter is the identity, so the loss is KL(router(x_t) || router(norm_t(h)))
    + align * |norm_t(h) - x_t|^2 / |x_t|^2 over the sampled rows; warm-up makes the first
    update lr / 50 (Adam moves each weight by about the rate), and only `up` has a gradient."""
    model, layers, data = small_data
    settings = TrainSettings(lookahead=1, rank=2, steps=1, batch_tokens=16, lr=1.0, align=0.5, seed=3)
    adapters, metrics = train_adapters(model, layers, data, settings)
    train_rows = torch.arange(72)
    rows = train_rows[torch.randint(0, 72, (16,), generator=torch.Generator().manual_seed(3))]
    layer = layers[1]
    with torch.no_grad():
        x = data.get("router_in", 1)[rows]
        a = layer.norm(data.get("router_in", 0)[rows])
        p = torch.log_softmax(router_logits(layer, x), -1)
        q = torch.log_softmax(router_logits(layer, a), -1)
        kl = (p.exp() * (p - q)).sum(-1).mean()
        align = ((a - x).pow(2).sum(-1) / x.pow(2).sum(-1)).mean()
    assert metrics["final_loss"] == pytest.approx((kl + 0.5 * align).item(), rel=1e-4)
    torch.manual_seed(3)  # the adapters' initial weights, as train_adapters drew them
    start = Adapters(32, 2, [(0, 1)], "router-input")
    block = adapters.get(0, 1)
    assert torch.equal(block.down.weight, start.get(0, 1).down.weight)  # no gradient, no weight decay
    assert block.up.weight.abs().max().item() == pytest.approx(1.0 / 50, rel=1e-3)


def test_a_checkpoint_holds_the_step_settings_and_the_schedule(small_data, tmp_path):
    """Saved every `checkpoint_every` completed steps; the learning rate follows warm-up over 50
    steps times a cosine over all of them."""
    model, layers, data = small_data
    settings = TrainSettings(lookahead=1, rank=2, steps=100, batch_tokens=8, lr=1.0)
    ckpt = tmp_path / "train.ckpt"
    saved = []

    losses = []

    def watch(step, loss):
        saved.append(torch.load(ckpt, weights_only=False)["step"] if ckpt.exists() else None)
        losses.append(loss)
        if step in (7, 59):
            state = torch.load(ckpt, weights_only=False) if step == 59 else None
            if step == 7:  # warm-up: the rate still rising
                lr = torch.load(ckpt, weights_only=False)["sched"]["_last_lr"][0]
                assert lr == pytest.approx(min(1.0, 7 / 50) * 0.5 * (1 + math.cos(math.pi * 6 / 100)))
            if state is not None:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_adapters(model, layers, data, settings, progress=watch, checkpoint=ckpt, checkpoint_every=3)
    assert saved[:8] == [None, None, None, 3, 3, 3, 6, 6] and all(isinstance(x, float) and x > 0 for x in losses)
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 60 and state["settings"] == asdict(settings)
    lr = state["sched"]["_last_lr"][0]  # past warm-up: the cosine alone
    assert lr == pytest.approx(0.5 * (1 + math.cos(math.pi * 60 / 100)))
    with pytest.raises(moe_prefetch.PredictorError, match="other settings; delete it or rerun"):
        train_adapters(model, layers, data, TrainSettings(lookahead=1, rank=2, steps=99), checkpoint=ckpt)


def test_saved_adapters_carry_their_metadata_and_load_for_inference(trained, tmp_path):
    model, layers, _, fixture_path, metrics = trained
    adapters, _ = load_adapters(fixture_path, model, layers)
    # saved here, not read from the fixture's file: mutmut ties a function to the tests that call it
    path = save_adapters(tmp_path / "a.safetensors", adapters, model, layers, SETTINGS, metrics, ["random"])
    with safe_open_meta(path) as meta:
        pass
    assert (meta["format"], meta["version"], meta["model_type"], meta["hidden_size"]) == (
        "moe-prefetch/m2r2",
        "1",
        "mixtral",
        "32",
    )
    assert json.loads(meta["data"]) == ["random"] and json.loads(meta["pairs"]) == [[0, 1]]
    saved = json.loads(meta["metrics"])
    assert (saved["final_loss"], saved["train_tokens"]) == (metrics["final_loss"], metrics["train_tokens"])
    assert not path.with_suffix(path.suffix + ".tmp").exists()
    adapters, loaded = load_adapters(path, model, layers)
    assert not adapters.training and loaded["fingerprint"] == fingerprint(model, layers)


def test_files_without_a_source_are_residual_ones_and_other_formats_are_refused(trained, tmp_path):
    model, layers, _, path, _ = trained
    from safetensors.torch import load_file, save_file

    with safe_open_meta(path) as meta:
        settings = json.loads(meta["settings"])
    del settings["source"]  # a version-1 file
    old = tmp_path / "v1.safetensors"
    save_file(load_file(str(path)), str(old), metadata={**meta, "settings": json.dumps(settings)})
    assert load_adapters(old, model, layers)[0].source == "residual"
    other = tmp_path / "other.safetensors"
    save_file(load_file(str(path)), str(other), metadata={**meta, "format": "something-else"})
    with pytest.raises(moe_prefetch.PredictorError, match="is not an M2R2 adapters file; train them with"):
        load_adapters(other, model, layers)


class safe_open_meta:
    """The metadata of a safetensors file, as a context manager."""

    def __init__(self, path):
        from safetensors import safe_open

        self._file = safe_open(str(path), "pt")

    def __enter__(self):
        return dict(self._file.__enter__().metadata())

    def __exit__(self, *exc):
        return self._file.__exit__(*exc)


def test_a_predictor_without_a_runtime_runs_on_the_cpu_and_passes_unpaired_layers_through():
    adapters = Adapters(8, 2, [(0, 1)])
    predictor = M2R2Predictor(None, adapters, trained_lookahead=2, lookahead=2)
    assert predictor.adapters.get(0, 1).up.weight.device.type == "cpu"
    assert predictor.adapters.get(0, 1).up.weight.dtype == torch.float32
    assert predictor.source == "residual" and predictor.lookahead == 2
    h = torch.randn(2, 8)
    assert predictor.residual_for(1, SimpleNamespace(layer_idx=2), 1, h) is h
    with pytest.raises(moe_prefetch.PredictorError, match="lookahead <= 2 or retrain"):
        M2R2Predictor(None, adapters, trained_lookahead=2, lookahead=3)


def test_m2r2_without_adapters_says_how_to_get_them():
    with pytest.raises(moe_prefetch.PredictorError, match="needs adapters: pass predictor_path=.*--out m2r2_"):
        M2R2Predictor.from_config(SimpleNamespace(predictor_path=None), runtime=None)


def test_a_predictor_applies_the_adapter_of_its_pair():
    adapters = Adapters(8, 2, [(0, 1)])
    torch.nn.init.normal_(adapters.get(0, 1).up.weight)
    predictor = M2R2Predictor(None, adapters, trained_lookahead=1)
    h = torch.randn(2, 8)
    got = predictor.residual_for(0, SimpleNamespace(layer_idx=1), 1, h)
    assert torch.equal(got, predictor.adapters.get(0, 1)(h)) and not torch.equal(got, h)


def test_training_saves_a_checkpoint_every_100_steps_by_default(small_data, tmp_path):
    model, layers, data = small_data
    settings = TrainSettings(lookahead=1, rank=2, steps=101, batch_tokens=4)
    ckpt = tmp_path / "train.ckpt"
    saved = []

    def watch(step, loss):
        if step >= 99:
            saved.append(torch.load(ckpt, weights_only=False)["step"] if ckpt.exists() else None)

    train_adapters(model, layers, data, settings, progress=watch, checkpoint=ckpt)
    assert saved == [None, 100] and not ckpt.exists()


def test_training_pairs_follow_the_lookahead_over_three_moe_layers():
    model = make_model("mixtral", config=sized_config("mixtral", num_hidden_layers=3))
    data = collect(model, prompt(batch=2, length=6))
    settings = TrainSettings(lookahead=1, rank=2, steps=1, batch_tokens=4)
    adapters, _ = train_adapters(model, find_moe_layers(model), data, settings)
    assert adapters.keys == [(0, 1), (1, 2)]
