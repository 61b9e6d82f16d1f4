"""Quantized checkpoints: experts that stay in the format the checkpoint ships them in.

GPT-OSS stores its experts as MXFP4, DeepSeek-V3 and Qwen3-FP8 as block-scaled FP8. With
experts_dtype="auto" those experts go from the safetensors files into the host store as the
checkpoint's bytes (`HostStore.write_stored`), never decoded at load: the store, the link and
the slots carry 4.25 bits (MXFP4) or about 8 bits (FP8) per weight, and `MXFP4` / `FP8Block`
decode them into the model's dtype just before the kernel (`compression.Codec`).

Everything else follows transformers' own loading of the checkpoint on a CPU: its quantizer,
in dequantize mode, joins the conversion mapping (`Checkpoint(quantizer=...)`), so non-expert
FP8 weights are dequantized into the model's dtype by transformers' `Fp8Dequantize`, and any
other `experts_dtype` re-encodes experts from transformers' dequantized values. One exception:
a weight whose size is not a multiple of the FP8 block is read in the checkpoint's blocks
(`_block_fp8_dequantize`), where transformers misreads or refuses it.

    checkpoint layout (per layer)                          model parameter   stored parts
    mxfp4: experts.gate_up_proj_blocks [E, out, in/32, 16]  gate_up_proj      blocks, scales
           experts.gate_up_proj_scales [E, out, in/32]      [E, in, out]      (as on disk)
    fp8:   experts.{e}.gate_proj.weight [I, D] e4m3        gate_up_proj      weight [2I, D],
           experts.{e}.gate_proj.weight_scale_inv          [E, 2I, D]        scale_inv
               [ceil(I/B0), ceil(D/B1)] fp32 (same for up_proj, down_proj)  (merged like the weights)

A native format is used for a parameter only if its decode of expert 0 equals transformers'
dequantization bit for bit, in every layer; otherwise (a layout we do not know, a block grid
transformers reads differently) that parameter is stored as transformers dequantizes it.
"""

from __future__ import annotations

import functools
import logging

import torch

from ..errors import CheckpointError
from . import compression
from .compression import ParamFormat, _row_chunks

logger = logging.getLogger(__name__)

SUPPORTED_QUANT_METHODS = {"mxfp4": "GPT-OSS MXFP4 experts", "fp8": "block-scaled FP8 (DeepSeek-V3, Qwen3-FP8)"}
# The E2M1 (FP4) code points of the OCP microscaling spec, by 4-bit code: bit 3 is the sign.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MX_BLOCK = 32  # MXFP4: one E8M0 exponent per 32 weights along the input dimension
FP8_MAX = 448.0  # largest float8_e4m3fn value


class MXFP4(ParamFormat):
    """GPT-OSS MXFP4: a model parameter `[in, out]` stored as on disk, transposed: `blocks`
    `[out, in/32, 16]` uint8 (two E2M1 codes per byte, low nibble first) and `scales`
    `[out, in/32]` uint8 (E8M0 exponents, bias 127). 4.25 bits per weight. Decoding computes
    what transformers' `convert_moe_packed_tensors` computes, in the same dtype, the same way."""

    name = "mxfp4"

    def parts(self, shape, dtype):
        n_in, n_out = shape
        if n_in % MX_BLOCK:
            raise CheckpointError(f"MXFP4 needs an input dimension that is a multiple of 32, got {shape}")
        groups = n_in // MX_BLOCK
        return {"blocks": ((n_out, groups, MX_BLOCK // 2), torch.uint8), "scales": ((n_out, groups), torch.uint8)}

    def encode(self, w):
        """Nearest E2M1 code per weight under the smallest power-of-two scale that fits the
        block's largest magnitude in 6 (fixtures and tests; checkpoints come encoded)."""
        t = w.float().t()
        g = t.reshape(t.shape[0], -1, MX_BLOCK)  # [out, groups, 32]
        amax = g.abs().amax(dim=-1)
        exp = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6)), torch.full_like(amax, -127)).clamp(-127, 127)
        scaled = g / torch.exp2(exp).unsqueeze(-1)
        magnitudes = torch.tensor(FP4_VALUES[:8])
        code = (scaled.abs().unsqueeze(-1) - magnitudes).abs().argmin(dim=-1).to(torch.uint8)
        code |= (scaled < 0).to(torch.uint8) << 3
        blocks = code[..., 0::2] | (code[..., 1::2] << 4)
        return {"blocks": blocks, "scales": (exp + 127).to(torch.uint8)}

    def decode(self, parts, out):
        # transformers indexes an E2M1 table in the model's dtype per nibble, then ldexp: the
        # product is taken in fp32 (ldexp multiplies by an fp32 power of two) and rounded once
        # to the model's dtype. Here: one fp32 table lookup per byte (both nibbles), an fp32
        # multiply, one rounding in the transposing copy: the same values, 3x faster on a CPU.
        blocks, scales = parts["blocks"], parts["scales"]
        n_out, groups, half = blocks.shape
        pairs = _fp4_pairs(out.device)
        for sl in _row_chunks(n_out, groups * half * 2):
            blk = blocks[sl].reshape(-1)
            w = torch.index_select(pairs, 0, blk.to(torch.int32)).view(-1, half * 2)  # [rows * groups, 32]
            w.mul_(torch.exp2(scales[sl].reshape(-1, 1).float() - 127))
            out[:, sl].copy_(w.view(-1, groups * half * 2).t())

    # the bytes as int32 indices (2 per value), the looked-up values (2 in bf16, 4 in fp32), the
    # scale per block
    scratch_bytes_per_value = 6.25
    # beyond the stored bytes and the decoded copy: the indices written and read (2 + 2) and the
    # looked-up values written and read (2 + 2, bf16)
    device_decode_bytes_per_value = 8

    def decode_batch(self, parts, out, scratch):
        """A wave at once. In a bf16 model the lookup table and the power-of-two scale are bf16:
        an E2M1 value (2 significant bits) times a power of two is exact in fp32, so the bf16
        product rounds the same exact value once, as the fp32 path does, moving half the bytes.
        Other dtypes look up fp32 values (fp16 cannot hold every scale)."""
        blocks, scales = parts["blocks"], parts["scales"]  # [n, out, groups, 16], [n, out, groups]
        n, n_out, groups, half = blocks.shape
        dtype = torch.bfloat16 if out.dtype == torch.bfloat16 else torch.float32
        pairs = _fp4_pairs(out.device, dtype)
        out_t = out.transpose(1, 2)  # [n, out, in]: written in place, strided
        per_row = n * groups * (half * 4 + half * 2 * dtype.itemsize + 4 + dtype.itemsize)
        for sl in scratch.row_chunks(n_out, per_row):
            rows = blocks[:, sl].shape[1]
            scratch.reset()
            index = scratch.take((n, rows, groups, half), torch.int32)
            index.copy_(blocks[:, sl])
            values = scratch.take((n * rows * groups * half, 2), dtype)
            torch.index_select(pairs, 0, index.view(-1), out=values)
            # 2 ** (scale - 127) built from its bits, exact (CUDA's exp2f is only within 2 ulp):
            # the biased exponent is the E8M0 byte itself; byte 0 is the subnormal 2 ** -127
            # (bits 0x400000), byte 255 is inf, as exp2(128) is in fp32.
            bits = scratch.take((n, rows, groups, 1), torch.int32)
            bits.copy_(scales[:, sl].unsqueeze(-1)).bitwise_left_shift_(23).clamp_min_(0x400000)
            power = bits.view(torch.float32)
            if dtype != torch.float32:
                power = scratch.take((n, rows, groups, 1), dtype).copy_(power)
            shape = (n, rows, groups, half * 2)
            torch.mul(values.view(shape), power, out=out_t[:, sl].view(shape))


class FP8Block(ParamFormat):
    """Block-scaled FP8: `weight` float8_e4m3fn of the parameter's shape `[out, in]` and
    `scale_inv` float32 `[ceil(out/B0), ceil(in/B1)]`; w = fp32(weight) * scale of its block,
    then the model's dtype (what transformers' `Fp8Dequantize` computes)."""

    name = "fp8"

    def __init__(self, block: tuple[int, int]):
        self.block = tuple(block)

    def _grid(self, shape):
        return tuple(-(-n // b) for n, b in zip(shape, self.block))

    def parts(self, shape, dtype):
        if len(shape) != 2:
            raise CheckpointError(f"block-scaled FP8 expects 2-D expert weights, got shape {shape}")
        return {"weight": (shape, torch.float8_e4m3fn), "scale_inv": (self._grid(shape), torch.float32)}

    def _scales(self, scale_inv, rows: slice, cols: int) -> torch.Tensor:
        b0, b1 = self.block
        return scale_inv.repeat_interleave(b0, dim=0)[rows].repeat_interleave(b1, dim=1)[:, :cols]

    def encode(self, w):
        rows, cols = w.shape
        grid = self._grid(w.shape)
        w = w.float()
        padded = torch.nn.functional.pad(w, (0, grid[1] * self.block[1] - cols, 0, grid[0] * self.block[0] - rows))
        blocks = padded.reshape(grid[0], self.block[0], grid[1], self.block[1])
        scale_inv = blocks.abs().amax(dim=(1, 3)) / FP8_MAX
        scale_inv = torch.where(scale_inv > 0, scale_inv, torch.ones_like(scale_inv))
        weight = (w / self._scales(scale_inv, slice(0, rows), cols)).to(torch.float8_e4m3fn)
        return {"weight": weight, "scale_inv": scale_inv}

    def decode(self, parts, out):
        weight, scale_inv = parts["weight"], parts["scale_inv"]
        (rows, cols), (b0, b1) = weight.shape, self.block
        step = max(1, compression._DECODE_ELEMS // max(1, cols) // b0) * b0  # whole blocks per chunk
        for start in range(0, rows, step):
            sl = slice(start, min(rows, start + step))
            if rows % b0 or cols % b1:  # ragged edge blocks: scales expanded to every weight
                out[sl].copy_(weight[sl].float() * self._scales(scale_inv, sl, cols))
                continue
            # whole blocks: each scale broadcast over its block, no expanded copy of the scales
            grid = (-1, b0, cols // b1, b1)
            w = weight[sl].float().view(grid) * scale_inv[start // b0 : sl.stop // b0, None, :, None]
            out[sl].copy_(w.view(-1, cols))

    scratch_bytes_per_value = 4.0  # the weights cast to the model's dtype (fp32 at most)
    device_decode_bytes_per_value = 4  # that cast, written and read (bf16)

    def decode_batch(self, parts, out, scratch):
        """A wave at once: the FP8 weights cast to the model's dtype (exact: e4m3 fits bf16,
        fp16 and fp32), times their block's fp32 scale in fp32, rounded once into the output
        (float8 takes part in no type promotion, hence the cast)."""
        weight, scale_inv = parts["weight"], parts["scale_inv"]
        n, rows, cols = weight.shape
        b0, b1 = self.block
        if rows % b0 or cols % b1:  # ragged edge blocks: one expert at a time
            return super().decode_batch(parts, out, scratch)
        dtype = out.dtype if out.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
        per_block_row = n * b0 * cols * dtype.itemsize
        for sl in scratch.row_chunks(rows // b0, per_block_row):
            blocks = scale_inv[:, sl]
            lo, count = sl.start * b0, blocks.shape[1] * b0
            scratch.reset()
            w = scratch.take((n, count, cols), dtype)
            w.copy_(weight[:, lo : lo + count])
            grid = (n, blocks.shape[1], b0, cols // b1, b1)
            torch.mul(w.view(grid), blocks[:, :, None, :, None], out=out[:, lo : lo + count].view(grid))


@functools.cache
def _fp4_pairs(device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """byte -> (value of its low nibble, value of its high nibble), `[256, 2]` (exact in bf16
    too), made once per device (not a host-to-device copy per expert)."""
    lut = torch.tensor(FP4_VALUES)
    return torch.stack((lut.repeat(16), lut.repeat_interleave(16)), dim=-1).to(device=device, dtype=dtype)


def read_quantization(hf_config) -> dict | None:
    """The checkpoint's `quantization_config` (None for a plain checkpoint), removed from
    `hf_config` so the skeleton is built unquantized; an unsupported method is refused."""
    quant = getattr(hf_config, "quantization_config", None)
    if quant is None:
        return None
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    method = quant.get("quant_method")
    if method not in SUPPORTED_QUANT_METHODS:
        supported = "; ".join(f"{k} ({v})" for k, v in SUPPORTED_QUANT_METHODS.items())
        raise CheckpointError(
            f"quantization method {method!r} in config.json is not supported; supported: {supported}, "
            "or an unquantized checkpoint"
        )
    del hf_config.quantization_config
    return quant


def expected_formats(hf_config, spec) -> dict[str, ParamFormat]:
    """The native format each expert parameter of a quantized config will most likely keep, from
    config.json alone (for sizing: `inspect`, `evidence.anatomy`). `load` checks each against
    the checkpoint (`NativeExperts.choose`) and may store some dequantized instead."""
    quant = getattr(hf_config, "quantization_config", None)
    if quant is None:
        return {}
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    formats: dict[str, ParamFormat] = {}
    for pname, shape in zip(spec.names, spec.shapes):
        if len(shape) != 2:
            continue
        if quant.get("quant_method") == "mxfp4" and shape[0] % MX_BLOCK == 0:
            formats[pname] = MXFP4()
        elif quant.get("quant_method") == "fp8":
            formats[pname] = FP8Block(tuple(quant.get("weight_block_size") or (128, 128)))
    return formats


class NativeExperts:
    """A checkpoint's quantization as `load` uses it: transformers' quantizer (dequantize mode)
    for the mapping, and the native format of each expert parameter that keeps one."""

    def __init__(self, hf_config):
        self.quant = read_quantization(hf_config)
        self.quantizer = None
        self.formats: dict[str, ParamFormat] = {}
        self._sources: dict[str, dict[str, tuple[str, ...]]] = {}  # pname -> part -> source patterns
        if self.quant is None:
            return
        from transformers.quantizers.auto import AutoHfQuantizer

        # Dequantize mode: the mapping transformers uses on a CPU, for everything not kept native.
        self.quantizer = AutoHfQuantizer.from_config({**self.quant, "dequantize": True}, pre_quantized=True)
        if self.quant["quant_method"] == "fp8":
            operations = {"dequantize": _block_fp8_dequantize()}
            self.quantizer.get_load_operations = lambda: operations  # read by the mapping it builds

    def choose(self, checkpoint, layers, spec, experts_dtype: str) -> dict[str, ParamFormat]:
        """The native formats `make_codec` gets: for experts_dtype="auto", every expert parameter
        whose native decode of expert 0 equals transformers' dequantization in every layer."""
        if self.quant is None:
            return {}
        dense = [t for name, t in checkpoint.targets.items() if ".experts." not in name]
        if any(t.converter is not None and _scale_patterns(t) for t in dense):
            logger.info(
                "non-expert %s weights are dequantized to the model's dtype at load, as transformers does on a CPU",
                self.quant["quant_method"],
            )
        if experts_dtype != "auto":
            logger.info("%s experts are dequantized and re-encoded as %s", self.quant["quant_method"], experts_dtype)
            return {}
        for pname, shape in zip(spec.names, spec.shapes):
            fmt, sources = self._native(checkpoint, layers[0].path, pname, shape)
            if fmt is None:
                continue
            if all(self._matches(checkpoint, layer, pname, shape, fmt, sources, spec.dtype) for layer in layers):
                self.formats[pname], self._sources[pname] = fmt, sources
            else:
                logger.warning(
                    "%s: the checkpoint's %s layout does not decode to what transformers loads; stored dequantized",
                    pname,
                    fmt.name,
                )
        return dict(self.formats)

    def _native(self, checkpoint, path, pname, shape):
        target = checkpoint.targets.get(f"{path}.{pname}")
        if target is None or target.converter is None:
            return None, {}
        patterns = tuple(target.sources)
        if self.quant["quant_method"] == "mxfp4" and len(shape) == 2 and shape[0] % MX_BLOCK == 0:
            blocks = tuple(p for p in patterns if p.endswith("_blocks"))
            scales = tuple(p for p in patterns if p.endswith("_scales"))
            if len(blocks) == len(scales) == 1:
                return MXFP4(), {"blocks": blocks, "scales": scales}
        if self.quant["quant_method"] == "fp8" and len(shape) == 2:
            scales = _scale_patterns(target)
            weights = tuple(p for p in patterns if p.endswith(".weight"))
            if scales and len(scales) == len(weights):
                block = tuple(self.quant.get("weight_block_size") or (128, 128))
                return FP8Block(block), {"weight": weights, "scale_inv": scales}
        return None, {}

    def _matches(self, checkpoint, layer, pname, shape, fmt, sources, dtype) -> bool:
        parts = self._parts(checkpoint, layer, pname, 0, sources)
        expected = fmt.parts(shape, dtype)
        if any(tuple(parts[k].shape) != s or parts[k].dtype != d for k, (s, d) in expected.items()):
            return False
        decoded = torch.empty(shape, dtype=dtype)
        fmt.decode(parts, decoded)
        return torch.equal(decoded, checkpoint.expert_param(layer.path, pname, shape, 0, layer.num_experts))

    def _parts(self, checkpoint, layer, pname, e, sources) -> dict[str, torch.Tensor]:
        """Expert `e`'s stored parts of `pname`: each part's sources through the converter's
        merge and concatenation (as transformers merges the weights), without its dequantize."""
        name = f"{layer.path}.{pname}"
        skip = _dequantize_ops()
        return {
            part: checkpoint.expert_source(name, e, layer.num_experts, patterns, skip=skip)
            for part, patterns in sources.items()
        }

    def fill(self, store, checkpoint, layer, spec) -> None:
        """Write every expert of `layer` into `store`: native parameters as the checkpoint's
        bytes, the rest (biases) as transformers loads them, encoded by the store's codec."""
        codec = store.codec
        for e in range(layer.num_experts):
            parts = {}
            for pname, shape in zip(spec.names, spec.shapes):
                if pname in self._sources:
                    encoded = self._parts(checkpoint, layer, pname, e, self._sources[pname])
                else:
                    encoded = codec.formats[pname].encode(
                        checkpoint.expert_param(layer.path, pname, shape, e, layer.num_experts)
                    )
                parts.update({f"{pname}.{part}": tensor for part, tensor in encoded.items()})
            store.write_stored((layer.layer_idx, e), parts)
        store.fill(layer.layer_idx, ())  # pins the layer


@functools.cache
def _block_fp8_dequantize() -> type:
    """transformers' `Fp8Dequantize`, except for a weight whose size is not a multiple of the
    block: transformers derives the block from the scale grid (576 rows in 5 blocks of 128, as in
    DeepSeek-V3's kv_a_proj_with_mqa, raises; 24 rows in 2 blocks of 16 reads blocks of 12),
    where the checkpoint's blocks are `weight_block_size` with a partial last one (`FP8Block`)."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    class BlockFp8Dequantize(Fp8Dequantize):
        def _dequantize_one(self, quantized, scales, output_dtype=None):
            block = getattr(self.hf_quantizer.quantization_config, "weight_block_size", None)
            if quantized.dtype != torch.float8_e4m3fn or quantized.dim() != 2 or scales.dim() != 2 or not block:
                return super()._dequantize_one(quantized, scales, output_dtype)
            fmt = FP8Block(block)
            ragged = any(n % b for n, b in zip(quantized.shape, block))
            if not ragged or tuple(scales.shape) != fmt._grid(quantized.shape):
                return super()._dequantize_one(quantized, scales, output_dtype)
            out = torch.empty(quantized.shape, dtype=output_dtype or torch.float32, device=quantized.device)
            fmt.decode({"weight": quantized, "scale_inv": scales.float()}, out)
            return out

    return BlockFp8Dequantize


def _dequantize_ops() -> tuple[type, ...]:
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize
    from transformers.integrations.mxfp4 import Mxfp4Dequantize

    return (Fp8Dequantize, Mxfp4Dequantize)


def _scale_patterns(target) -> tuple[str, ...]:
    return tuple(p for p in target.sources if p.endswith("weight_scale_inv"))
