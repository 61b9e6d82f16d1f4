"""Training M2R2 adapters end to end: load a model offloaded, collect its residuals and
routing on text, train the adapters (`m2r2.train_adapters`), write them beside the model.

Kept apart from `m2r2` (adapters, their file format, the predictor) because it needs
`loading`, which needs the runtime, which builds predictors: the package reads top-down.
"""

from __future__ import annotations

from .loading import load, resolve_path
from .m2r2 import TrainSettings, save_adapters, train_adapters
from .residuals import collect_text, read_texts


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
