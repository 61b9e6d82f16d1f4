"""A safetensors checkpoint seen through the model's own names.

Checkpoints name their tensors in many ways: per-expert `experts.{e}.w1/w3/w2` or
`gate_proj/up_proj/down_proj`, Granite's `input_linear/output_linear`, fused as in the model,
older block names (`block_sparse_moe`), renamed buffers (ERNIE's `moe_statics`). Rather than
keep a list of renames of our own, every key goes through the conversion mapping that
transformers' `from_pretrained` applies to this model (`get_model_conversion_mapping`): its
renamings, then at most one converter. So a checkpoint loads here exactly when it loads in
transformers, and a new architecture's renames arrive with transformers.

Experts are read one at a time: a converter that builds a fused `[E, ...]` parameter from
per-expert tensors (MergeModulelist, Concatenate, ...) is run on expert e's tensors alone, a
fused checkpoint tensor is sliced at e. The whole fused tensor is never materialised.
"""

from __future__ import annotations

import logging
from copy import deepcopy
from dataclasses import dataclass, field

import torch
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

from ..errors import CheckpointError
from ..experts.layout import ExpertSpec

logger = logging.getLogger(__name__)


@dataclass
class _Target:
    """One model tensor and the checkpoint keys it is built from."""

    converter: WeightConverter | None  # None: a plain (possibly renamed) copy of sources[key][0]
    sources: dict[str, list[str]] = field(default_factory=dict)  # converter source pattern (or key) -> keys


def _first(target: _Target) -> str:
    """The key a plain rename reads: the first that maps to the name, as in transformers, should
    two spellings of one tensor both be present."""
    return next(iter(target.sources.values()))[0]


def _not_converted(name: str, err: Exception) -> CheckpointError:
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return CheckpointError(
        f"{name}: the checkpoint's tensors do not convert ({first}); it is incomplete or not for this model"
    )


class Checkpoint:
    """Checkpoint tensors under the names of `model`'s state dict (see the module docstring).

    `keys` maps each checkpoint tensor name to its file; `open_file(file)` returns a
    safetensors handle. `unexpected` lists checkpoint keys the model has no place for.
    `quantizer`: transformers' quantizer for a quantized checkpoint (dequantize mode), whose
    operations join the mapping exactly as in `from_pretrained` (`native.py`).
    """

    def __init__(self, model, keys: dict[str, str], open_file, quantizer=None):
        self.model = model
        self.keys = keys
        self._open = open_file
        transforms = get_model_conversion_mapping(model, hf_quantizer=quantizer)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        model_keys = dict.fromkeys(model.state_dict(), True)  # rename_source_key only asks `.get(name)`
        prefix = model.base_model_prefix
        self.targets: dict[str, _Target] = {}
        self.unexpected: list[str] = []
        # Sorted like transformers sorts them: a converter's per-expert list is in expert order.
        for key in sorted(keys, key=dot_natural_key):
            name, pattern = rename_source_key(key, renamings, converters, prefix, model_keys)
            if name not in model_keys and key in model_keys:  # renamed although already the model's name
                name, pattern = rename_source_key(key, [], [], prefix, model_keys)
            if name not in model_keys:
                self.unexpected.append(key)
                continue
            target = self.targets.get(name)
            if target is None:  # each target its own converter copy, as in transformers
                target = self.targets[name] = _Target(deepcopy(by_pattern[pattern]) if pattern else None)
            target.sources.setdefault(pattern or key, []).append(key)

    def _tensor(self, key: str) -> torch.Tensor:
        return self._open(self.keys[key]).get_tensor(key)

    def _row(self, key: str, e: int) -> torch.Tensor:
        """Expert `e` of a fused `[E, ...]` tensor, keeping the expert dim (`[1, ...]`)."""
        return self._open(self.keys[key]).get_slice(key)[e : e + 1]

    def dense(self, name: str) -> dict[str, torch.Tensor]:
        """The model tensor(s) built from the checkpoint keys that map to `name`; a converter may
        build several (e.g. q, k, v from one fused tensor), hence the dict."""
        target = self.targets[name]
        if target.converter is None:
            return {name: self._tensor(_first(target))}
        converter = deepcopy(target.converter)
        for pattern, keys in target.sources.items():
            for key in keys:
                converter.add_tensor(name, key, pattern, self._tensor(key))
        try:
            out = converter.convert(name, model=self.model, config=self.model.config)
        except (ValueError, RuntimeError, KeyError, IndexError) as err:
            raise _not_converted(name, err) from None
        return {k: v[0] if isinstance(v, list) else v for k, v in out.items()}

    def expert(self, path: str, e: int, num_experts: int, spec: ExpertSpec) -> dict[str, torch.Tensor]:
        """Expert `e`'s tensors of the experts module at `path`, shaped like the model's
        parameters without the expert dim."""
        return {
            pname: self.expert_param(path, pname, shape, e, num_experts)
            for pname, shape in zip(spec.names, spec.shapes)
        }

    def expert_param(self, path: str, pname: str, shape: tuple[int, ...], e: int, num_experts: int) -> torch.Tensor:
        """Expert `e`'s parameter `pname` of the experts module at `path`, of the model's `shape`."""
        name = f"{path}.{pname}"
        target = self.target(name)
        if target.converter is None:
            tensor = self._row(_first(target), e)
        else:
            tensor = self._convert_one(target, name, e, num_experts)
        if tuple(tensor.shape) != (1, *shape):
            raise CheckpointError(
                f"{path} expert {e} {pname} has shape {tuple(tensor.shape[1:])}, config says {shape}; "
                "the checkpoint is incomplete or config.json and the weights disagree"
            )
        return tensor[0]

    def target(self, name: str) -> _Target:
        target = self.targets.get(name)
        if target is None:
            raise CheckpointError(
                f"no weights for {name} in the checkpoint; it is incomplete or not for this config.json"
            )
        return target

    def expert_source(self, name: str, e: int, num_experts: int, patterns, skip=()) -> torch.Tensor:
        """Expert `e` of model tensor `name` built from the source `patterns` alone, through the
        converter's operations less those of types `skip`: a quantized checkpoint's stored parts
        (the fp8 weights, or their scales) merged and concatenated as transformers merges the weights."""
        target = self.target(name)
        if target.converter is None:
            return self._row(_first(target), e)[0]
        return self._convert_one(target, name, e, num_experts, patterns, skip)[0]

    def _convert_one(
        self, target: _Target, name: str, e: int, num_experts: int, patterns=None, skip=()
    ) -> torch.Tensor:
        """Run the converter's own operations on expert `e` alone: a per-expert source pattern
        (with `*`) contributes that expert's tensor, a fused one its row `e`. `patterns` and
        `skip` narrow the sources and the operations (`expert_source`)."""
        inputs: dict[str, object] = {}
        for pattern, keys in target.sources.items():
            if patterns is not None and pattern not in patterns:
                continue
            if "*" in pattern:
                if len(keys) != num_experts:
                    raise CheckpointError(
                        f"{name}: {len(keys)} of {num_experts} experts' tensors matching {pattern!r} are in the "
                        "checkpoint; it is incomplete"
                    )
                inputs[pattern] = [self._tensor(keys[e])]
            else:
                inputs[pattern] = self._row(keys[0], e)
        # Patterns absent from the checkpoint are left out, as transformers does (optional scales);
        # a missing required one fails to convert or shows as a wrong shape below.
        converter = target.converter
        try:
            for op in converter.operations:
                if isinstance(op, skip):
                    continue
                inputs = op.convert(
                    inputs,
                    source_patterns=converter.source_patterns,
                    target_patterns=converter.target_patterns,
                    full_layer_name=name,
                    model=self.model,
                    config=self.model.config,
                )
        except (ValueError, RuntimeError, KeyError, IndexError) as err:
            raise _not_converted(name, err) from None
        if len(inputs) != 1:
            raise CheckpointError(f"{name}: the checkpoint's conversion gives {len(inputs)} tensors, expected one")
        (tensor,) = inputs.values()
        return tensor[0] if isinstance(tensor, list) else tensor
