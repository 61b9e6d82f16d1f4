"""M2R2 adapters: they train, save with a fingerprint, refuse other models, and never change outputs."""

import pytest
import torch
from tiny_models import make_model, prompt

import moe_prefetch
from moe_prefetch.experts.layout import find_moe_layers
from moe_prefetch.predict.evaluate import evaluate_predictors, format_table
from moe_prefetch.predict.m2r2 import Adapter, TrainSettings, load_adapters, save_adapters, train_adapters
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
    with pytest.raises(moe_prefetch.PredictorError, match="trained for another model"):
        load_adapters(path, other, find_moe_layers(other))
    with pytest.raises(moe_prefetch.PredictorError, match="train them with"):
        load_adapters(tmp_path / "none.safetensors", model, layers)
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


def test_interrupted_training_resumes_to_the_same_adapters(trained, tmp_path):
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
    resumed, _ = train_adapters(model, layers, data, settings, checkpoint=ckpt, checkpoint_every=10)
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
