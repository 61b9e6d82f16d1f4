#!/usr/bin/env python
"""Train a small demo MoE model: ``moe_prefetch/demo`` (Mixtral) or ``moe_prefetch/demo_fine`` (Qwen3-MoE).

Steps: train a byte-level BPE tokenizer on the train split of the Python
stdlib corpus (``moe_prefetch.predict.corpus``) or reuse one (``--tokenizer``), train a
``MixtralForCausalLM`` (default: 6 layers, 8 experts, top-2) or a fine-grained
``Qwen3MoeForCausalLM`` (``--arch qwen3_moe``) on it for a wall-clock budget (or a
fixed number of steps), evaluate on the held-out split, and save the model in
float16 / bfloat16 with its tokenizer, generation config and a model card.

Examples::

    python scripts/train_demo_model.py --out moe_prefetch/demo --minutes 35
    python scripts/train_demo_model.py --out moe_prefetch/demo_fine --arch qwen3_moe --tokenizer moe_prefetch/demo \
        --experts 64 --top-k 8 --intermediate 48 --threads 1 --save-dtype bfloat16 --max-mb 38 --steps N

``--checkpoint FILE`` saves the training state every ``--checkpoint-every`` steps and
resumes from it when the file exists, so a killed run continues where it stopped.

The LR schedule needs the total step count. With ``--steps`` it is fixed and
the run is deterministic given ``--seed``; with only ``--minutes`` it is
estimated from the speed of the first warmup steps and written to the model
card, so the run can be repeated exactly with ``--steps N``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shlex
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    GenerationConfig,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from moe_prefetch.predict import corpus  # noqa: E402

EOS = "<|endoftext|>"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
ARCHS = {"mixtral": MixtralForCausalLM, "qwen3_moe": Qwen3MoeForCausalLM}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="moe_prefetch/demo", help="output folder")
    p.add_argument("--minutes", type=float, default=35.0, help="training wall-clock budget")
    p.add_argument("--steps", type=int, default=None, help="fixed number of steps (overrides --minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", choices=sorted(ARCHS), default="mixtral", help="model architecture")
    p.add_argument("--tokenizer", default=None, help="reuse the tokenizer of this model folder instead of training one")
    p.add_argument("--title", default="moe-prefetch demo model", help="model card title")
    p.add_argument("--checkpoint", default=None, help="training-state file: saved periodically, resumed if present")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--nice", type=int, default=10, help="raise the niceness by this much")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=256, help="per-expert intermediate size")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100, help="warmup steps (also timing calibration)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--aux-coef", type=float, default=0.02, help="router load-balancing loss coefficient")
    p.add_argument("--hard-stop", type=float, default=1.3, help="stop at this multiple of --minutes")
    p.add_argument("--eval-windows", type=int, default=128, help="held-out windows for the final eval")
    p.add_argument("--save-dtype", choices=sorted(DTYPES), default="float16")
    p.add_argument("--max-mb", type=float, default=24.0, help="fail if the out folder exceeds this (MiB)")
    return p.parse_args(argv)


# --------------------------------------------------------------------- tokenizer


def train_tokenizer(text_files, vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the given files (deterministic)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((corpus.read_text(p) for p in text_files), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def encode_files(tokenizer, files) -> torch.Tensor:
    """Tokenize files and join them into one stream, each followed by EOS."""
    texts = [corpus.read_text(p) for p in files]
    enc = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for e in enc:
        ids.extend(e.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut a token stream into non-overlapping (seq_len + 1)-token windows (stride seq_len)."""
    n = (len(stream) - 1) // seq_len
    return torch.stack([stream[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])


# --------------------------------------------------------------------- model


def build_config(args, tokenizer):
    if args.arch == "qwen3_moe":
        # Every layer sparse (no dense MLP layers), top-k weights renormalised like Qwen3-30B-A3B.
        return Qwen3MoeConfig(
            vocab_size=len(tokenizer),
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            moe_intermediate_size=args.intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            head_dim=args.hidden // args.heads,
            num_experts=args.experts,
            num_experts_per_tok=args.top_k,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
            max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=True,
            output_router_logits=True,
            router_aux_loss_coef=args.aux_coef,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
        )
    return MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        output_router_logits=True,
        router_aux_loss_coef=args.aux_coef,
        router_jitter_noise=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )


def lr_at(step: int, args, total: int) -> float:
    """Linear warmup then cosine decay to ``min_lr_ratio * lr``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = min(1.0, (step - args.warmup) / max(1, total - args.warmup))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def balance_loss(router_logits, top_k: int) -> torch.Tensor:
    """Switch-style load-balancing loss, computed per layer and averaged (1.0 = balanced).

    ``E * sum_e f_e * P_e`` with ``f_e`` the fraction of top-k slots routed to expert e
    and ``P_e`` its mean router probability. (The built-in Mixtral aux loss pools all
    layers together, which lets one layer's imbalance hide behind another's.)
    """
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        n_exp = probs.shape[-1]
        top = probs.topk(top_k, dim=-1).indices
        frac = torch.nn.functional.one_hot(top, n_exp).float().sum(dim=1).mean(dim=0) / top_k
        losses.append(n_exp * (frac * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


@torch.no_grad()
def evaluate(model, data: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats) over the windows in ``data``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        batch = data[i : i + batch_size]
        logits = model(input_ids=batch[:, :-1], output_router_logits=False, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += batch[:, 1:].numel()
    model.train(was_training)
    return total / count


def num_experts(cfg) -> int:
    return cfg.num_local_experts if hasattr(cfg, "num_local_experts") else cfg.num_experts


@torch.no_grad()
def expert_usage(model, data: torch.Tensor, batch_size: int) -> list[list[float]]:
    """Fraction of top-k routing slots each expert receives, per layer."""
    model.eval()
    cfg = model.config
    n_exp = num_experts(cfg)
    counts = torch.zeros(cfg.num_hidden_layers, n_exp)
    for i in range(0, len(data), batch_size):
        out = model(input_ids=data[i : i + batch_size, :-1], output_router_logits=True, use_cache=False)
        for layer, logits in enumerate(out.router_logits):
            top = logits.topk(cfg.num_experts_per_tok, dim=-1).indices.reshape(-1)
            counts[layer] += torch.bincount(top, minlength=n_exp).float()
    return (counts / counts.sum(dim=1, keepdim=True)).tolist()


def folder_bytes(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    os.nice(args.nice)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    command = "python scripts/train_demo_model.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    train_files, heldout_files = corpus.split_files(corpus.stdlib_files())
    print(f"corpus: {len(train_files)} train files, {len(heldout_files)} held-out files", flush=True)

    t0 = time.time()
    if args.tokenizer:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(args.tokenizer)
        print(f"tokenizer: vocab {len(tokenizer)} from {args.tokenizer}", flush=True)
    else:
        tokenizer = train_tokenizer(train_files, args.vocab_size)
        print(f"tokenizer: vocab {len(tokenizer)} trained in {time.time() - t0:.1f}s", flush=True)
    train_stream = encode_files(tokenizer, train_files)
    heldout_stream = encode_files(tokenizer, heldout_files)
    train_chars = sum(len(corpus.read_text(p)) for p in train_files)
    print(
        f"tokens: train {len(train_stream):,} ({train_chars / len(train_stream):.2f} chars/token), "
        f"heldout {len(heldout_stream):,}",
        flush=True,
    )
    train_data = windows(train_stream, args.seq_len)
    heldout_data = windows(heldout_stream, args.seq_len)
    # Deterministic evenly spaced slice of the held-out windows.
    stride = max(1, len(heldout_data) // args.eval_windows)
    eval_data = heldout_data[::stride][: args.eval_windows]
    probe_data = eval_data[:: max(1, len(eval_data) // 16)][:16]

    config = build_config(args, tokenizer)
    torch.manual_seed(args.seed)
    model_cls = ARCHS[args.arch]
    model = model_cls(config)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = n_params - expert_params + expert_params * cfg.num_experts_per_tok // num_experts(cfg)
    print(f"model: {n_params:,} params ({expert_params:,} in experts, ~{active:,} active/token)", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )

    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train_data), generator=gen)
    pos = epoch = 0
    total_steps = args.steps if args.steps is not None else 10**9
    budget_s = args.minutes * 60
    tokens_per_step = args.batch_size * args.seq_len
    log_every = 50
    curve: list[tuple[int, float, float]] = []  # (step, mean train loss, mean aux loss)
    evals: list[tuple[int, float]] = []
    window_loss = window_aux = 0.0
    window_n = 0
    stopped_early = False
    step = 0
    trained_s = 0.0  # training seconds of earlier (checkpointed) sessions
    ckpt = pathlib.Path(args.checkpoint) if args.checkpoint else None
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        order, pos, epoch, step = state["order"], state["pos"], state["epoch"], state["step"]
        total_steps, curve, evals, trained_s = state["total_steps"], state["curve"], state["evals"], state["trained_s"]
        window_loss, window_aux, window_n = state["window"]
        print(f"resumed from {ckpt} at step {step}/{total_steps}", flush=True)
    model.train()
    t_train = time.time() - trained_s
    while step < total_steps:
        if pos + args.batch_size > len(order):
            epoch += 1
            order = torch.randperm(len(train_data), generator=gen)
            pos = 0
        batch = train_data[order[pos : pos + args.batch_size]]
        pos += args.batch_size
        lr = lr_at(step, args, total_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        # Inputs/targets are pre-shifted, so compute the CE here rather than via `labels`
        # (which would shift again); the balance loss uses the returned router logits.
        out_ = model(input_ids=batch[:, :-1], output_router_logits=True, use_cache=False)
        logits = out_.logits
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        aux = balance_loss(out_.router_logits, cfg.num_experts_per_tok)
        loss = ce + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        window_loss += ce.item()
        window_aux += aux.item()
        window_n += 1
        if args.steps is None and step == args.warmup:
            per_step = (time.time() - t_train) / step
            total_steps = max(step + 1, int(budget_s / per_step))
            print(f"calibration: {per_step:.3f}s/step -> total_steps={total_steps}", flush=True)
        if step % log_every == 0 or step == total_steps:
            curve.append((step, window_loss / window_n, window_aux / window_n))
            el = time.time() - t_train
            print(
                f"step {step}/{total_steps if total_steps < 10**9 else '?'} epoch {epoch} lr {lr:.2e} "
                f"loss {window_loss / window_n:.4f} aux {window_aux / window_n:.4f} "
                f"tok/s {step * tokens_per_step / el:,.0f} elapsed {el / 60:.1f}m",
                flush=True,
            )
            window_loss = window_aux = 0.0
            window_n = 0
        if step % 500 == 0 and step < total_steps:
            ev = evaluate(model, probe_data, args.batch_size)
            use = expert_usage(model, probe_data, args.batch_size)
            model.train()
            evals.append((step, ev))
            shares = [f for layer in use for f in layer]
            print(
                f"  probe held-out loss {ev:.4f}; expert share min {min(shares):.3f} max {max(shares):.3f}",
                flush=True,
            )
        if ckpt is not None and step % args.checkpoint_every == 0 and step < total_steps:
            state = {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "gen": gen.get_state(),
                "order": order,
                "pos": pos,
                "epoch": epoch,
                "step": step,
                "total_steps": total_steps,
                "curve": curve,
                "evals": evals,
                "trained_s": time.time() - t_train,
                "window": (window_loss, window_aux, window_n),
            }
            torch.save(state, str(ckpt) + ".tmp")
            os.replace(str(ckpt) + ".tmp", ckpt)
        if args.steps is None and time.time() - t_train > args.hard_stop * budget_s:
            print(f"WARNING: stopping at step {step}: {args.hard_stop}x the time budget used", flush=True)
            stopped_early = True
            break
    train_seconds = time.time() - t_train
    tokens_seen = step * tokens_per_step
    print(f"trained {step} steps, {tokens_seen:,} tokens in {train_seconds / 60:.1f} min", flush=True)

    heldout_fp32 = evaluate(model, eval_data, args.batch_size)
    print(f"held-out loss (fp32, {len(eval_data)} x {args.seq_len} tokens): {heldout_fp32:.4f}", flush=True)

    # ---- save in half precision
    dtype = DTYPES[args.save_dtype]
    model = model.to(dtype)
    model.config.output_router_logits = False
    model.config.use_cache = True
    model.config.dtype = dtype
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=128,
    ).save_pretrained(out)

    # ---- reload exactly as a user would and re-measure
    reloaded = model_cls.from_pretrained(out, dtype=torch.float32)
    heldout_saved = evaluate(reloaded, eval_data, args.batch_size)
    usage = expert_usage(reloaded, eval_data, args.batch_size)
    print(f"held-out loss (saved {args.save_dtype} weights, fp32 compute): {heldout_saved:.4f}", flush=True)
    for layer, fr in enumerate(usage):
        print(f"  layer {layer} expert share: " + " ".join(f"{f:.3f}" for f in fr), flush=True)
    prompt = "def "
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    sample = reloaded.generate(ids, max_new_tokens=64, do_sample=False)
    sample_text = tokenizer.decode(sample[0], skip_special_tokens=True)
    print("greedy sample:\n" + sample_text, flush=True)

    total_minutes = (time.time() - t_start) / 60
    card = {
        "params": n_params,
        "expert_params": expert_params,
        "active_params_per_token": active,
        "train_tokens_available": len(train_stream),
        "heldout_tokens_available": len(heldout_stream),
        "steps": step,
        "planned_steps": total_steps,
        "stopped_early": stopped_early,
        "epochs_approx": round(tokens_seen / len(train_stream), 2),
        "tokens_seen": tokens_seen,
        "train_minutes": round(train_seconds / 60, 1),
        "total_minutes": round(total_minutes, 1),
        "heldout_eval_tokens": int(eval_data[:, 1:].numel()),
        "heldout_loss_fp32": round(heldout_fp32, 4),
        "heldout_loss_saved": round(heldout_saved, 4),
        "heldout_ppl_saved": round(math.exp(heldout_saved), 2),
        "loss_curve": [(s, round(l, 4), round(a, 4)) for s, l, a in curve],
        "probe_evals": [(s, round(v, 4)) for s, v in evals],
        "expert_usage": [[round(f, 4) for f in fr] for fr in usage],
    }
    write_card(out, args, cfg, card, command, sample_text)
    (out / "training_log.json").write_text(json.dumps(card, indent=1) + "\n")

    size = folder_bytes(out)
    print(f"out folder {out}: {size / 2**20:.2f} MiB ({size:,} bytes)", flush=True)
    if size > args.max_mb * 2**20:
        print(f"ERROR: out folder exceeds {args.max_mb} MiB", file=sys.stderr, flush=True)
        return 1
    return 0


def write_card(out, args, cfg, card, command, sample_text) -> None:
    curve = card["loss_curve"]
    n_exp = num_experts(cfg)
    picks = sorted({0, len(curve) // 4, len(curve) // 2, 3 * len(curve) // 4, len(curve) - 1})
    curve_rows = "\n".join(f"| {curve[i][0]} | {curve[i][1]:.3f} | {curve[i][2]:.3f} |" for i in picks if curve)
    usage_rows = "\n".join(
        f"| {i} | " + " | ".join(f"{100 * f:.1f}" for f in fr) + " |" for i, fr in enumerate(card["expert_usage"])
    )
    if n_exp <= 16:
        usage_table = f"| layer | {' | '.join(f'e{i}' for i in range(n_exp))} |\n|---|{'---|' * n_exp}\n{usage_rows}"
    else:  # too wide for one row per layer: summarise (uniform share is 100 / E %)
        usage_table = (
            "| layer | min | median | max | experts under 1/4 of uniform |\n|---|---|---|---|---|\n"
            + "\n".join(
                f"| {i} | {100 * min(fr):.2f} | {100 * sorted(fr)[len(fr) // 2]:.2f} | {100 * max(fr):.2f} | "
                f"{sum(f < 0.25 / n_exp for f in fr)} |"
                for i, fr in enumerate(card["expert_usage"])
            )
        )
    fence = "`" * 3
    early = f" (stopped early by the time limit; {card['planned_steps']} planned)" if card["stopped_early"] else ""
    arch_name = {"mixtral": "Mixtral", "qwen3_moe": "Qwen3-MoE"}[args.arch]
    tok_line = (
        f"The tokenizer is `{args.tokenizer}`'s (reused, not retrained)."
        if args.tokenizer
        else "The byte-level BPE tokenizer is trained on the train split by the same script."
    )
    text = f"""# {args.title}

A small Mixture-of-Experts causal LM in the Hugging Face **{arch_name}** architecture
(`{ARCHS[args.arch].__name__}`), trained from scratch on Python source code. It exists so the
runtime has a real, trained MoE checkpoint to offload and prefetch experts for; it is
not a useful code model.

## Architecture

| field | value |
|---|---|
| layers | {cfg.num_hidden_layers} |
| experts per layer / active (top-k) | {n_exp} / {cfg.num_experts_per_tok} |
| hidden size | {cfg.hidden_size} |
| expert intermediate size | {args.intermediate} |
| attention heads / KV heads | {cfg.num_attention_heads} / {cfg.num_key_value_heads} |
| vocab (byte-level BPE) | {cfg.vocab_size} |
| max positions | {cfg.max_position_embeddings} |
| tied embeddings | {cfg.tie_word_embeddings} |
| parameters | {card["params"]:,} ({card["expert_params"]:,} in experts) |
| active parameters per token | ~{card["active_params_per_token"]:,} |
| stored dtype | {args.save_dtype} |

## Data

`.py` files of the Python {sys.version_info.major}.{sys.version_info.minor} standard library
(`moe_prefetch.predict.corpus`), without `test`/`tests`/`idlelib`/`lib2to3`/`ensurepip`/`site-packages`.
Files are split by `zlib.crc32(relative path) % 10 == 0` into held-out (1 in 10) and train.
Train split: {card["train_tokens_available"]:,} tokens; held-out split: {card["heldout_tokens_available"]:,} tokens.
Files are joined with `<|endoftext|>`. {tok_line}

## Training

AdamW (betas 0.9/0.95, weight decay {args.weight_decay}), peak LR {args.lr}, {args.warmup} warmup steps,
cosine decay to {args.min_lr_ratio}x, grad clip 1.0, batch {args.batch_size} x {args.seq_len} tokens, fp32 on
{args.threads} CPU threads, seed {args.seed}. Router load balancing: Switch-style loss
`E * sum_e f_e * P_e` computed per layer and averaged over layers (1.0 = perfectly balanced),
weighted {args.aux_coef}, no router noise.
{card["steps"]} steps{early}, {card["tokens_seen"]:,} tokens seen (~{card["epochs_approx"]} epochs),
{card["train_minutes"]} min training ({card["total_minutes"]} min including tokenizer, eval and saving).

| step | train loss | aux loss |
|---|---|---|
{curve_rows}

## Evaluation

Held-out loss on {card["heldout_eval_tokens"]:,} tokens (evenly spaced {args.seq_len}-token windows of the
held-out split): **{card["heldout_loss_saved"]:.4f} nats/token (perplexity {card["heldout_ppl_saved"]:.2f})**
with the saved {args.save_dtype} weights loaded in float32 ({card["heldout_loss_fp32"]:.4f} before conversion).

Share of top-{cfg.num_experts_per_tok} routing slots per expert on that text (%):

{usage_table}

Greedy sample from the prompt `def `:

{fence}python
{sample_text}
{fence}

## Reproduce

{fence}
{command}
{fence}

With only `--minutes`, the step count is chosen from the speed of the first
{args.warmup} (warmup) steps, so it depends on the machine. The LR schedule depends only on
the step count, so this repeats the run with the same step count and seed, independent of
machine speed:

{fence}
{command} --steps {card["steps"]}
{fence}

`--steps` overrides `--minutes`; other options not shown were left at their defaults
(`python scripts/train_demo_model.py --help`).
"""
    (out / "README.md").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
