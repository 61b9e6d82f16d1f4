"""Offline runs that start from a checkpoint folder: load the model offloaded (predictor
"none"), collect its residuals and routing on text, then train M2R2 adapters on them and write
them beside the model (`train_predictor`), or score the predictors against the router's own
choices (`eval_predictor`).

The training and scoring themselves are predict/'s (`m2r2.train_adapters`,
`evaluate.evaluate_predictors`); these two live here, above it, because they need `loading`,
which needs the runtime, which builds predictors: the package reads top-down.
"""

from __future__ import annotations

from pathlib import Path

from ..predict.evaluate import evaluate_predictors
from ..predict.m2r2 import FILENAME, TrainSettings, load_adapters, save_adapters, train_adapters
from ..predict.residuals import collect_text, read_texts
from .loading import load, resolve_path


def train_predictor(
    model_path,
    data_files,
    out,
    lookahead: int = 3,
    rank: int = 16,
    seed: int = 0,
    steps: int = 1500,
    max_tokens: int = 60_000,
    seq_len: int = 256,
    device: str = "auto",
    source: str = "router-input",
    progress=None,
    collect_progress=None,
) -> dict:
    """Train M2R2 adapters for the model at `model_path` on text files; write them to `out`.

    The model runs offloaded (it may not fit on the device) with predictor "none"; its
    residuals and routing on the text become the training set. Resumes from `out`.ckpt
    if an earlier run was interrupted. Returns the training metrics."""
    from transformers import AutoTokenizer

    settings = TrainSettings(lookahead=lookahead, rank=rank, steps=steps, seed=seed, source=source)
    text = read_texts(data_files)
    folder = resolve_path(model_path)
    model, runtime = load(folder, device=device, predictor="none")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        data = collect_text(model, tokenizer, text, seq_len, max_tokens, progress=collect_progress)
        adapters, metrics = train_adapters(
            model, runtime.layers, data, settings, progress=progress, checkpoint=f"{out}.ckpt"
        )
        save_adapters(out, adapters, model, runtime.layers, settings, metrics, [str(f) for f in data_files])
    finally:
        runtime.detach()
    return metrics


def eval_predictor(
    model_path,
    data_files,
    predictor_path=None,
    lookahead: int = 3,
    margin: int = 2,
    max_tokens: int = 20_000,
    seq_len: int = 256,
    device: str = "auto",
    progress=None,
) -> dict:
    """Score previous-token, next-gate and (with adapters) m2r2 on held-out text files."""
    from transformers import AutoTokenizer

    text = read_texts(data_files)
    folder = resolve_path(model_path)
    model, runtime = load(folder, device=device, predictor="none")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        path = Path(predictor_path) if predictor_path else folder / FILENAME
        adapters = None
        if predictor_path or path.is_file():
            adapters, _ = load_adapters(path, model, runtime.layers)
        data = collect_text(model, tokenizer, text, seq_len, max_tokens, progress=progress)
        result = evaluate_predictors(model, data, lookahead=lookahead, adapters=adapters, margin=margin)
    finally:
        runtime.detach()
    result["model"] = str(folder)
    result["data"] = [str(f) for f in data_files]
    return result
