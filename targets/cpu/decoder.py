"""Lower a decoder's attention to ONNX Runtime's ``com.microsoft::GroupQueryAttention``.

The IR keeps attention as the plain ops a torch export of Hugging Face's llama writes (see
``edgec.models.llama``): RoPE by rotate-half, Concat(past, new), grouped heads by Expand, and
Softmax(QK^T + mask) V. onnxscript's ort_fusions recognise that chain in steps:

    rotate-half + cos/sin             -> RotaryEmbedding, with a [positions, head_dim/2] cos/sin cache
    MatMul/Softmax/MatMul + mask      -> SDPA (an onnxscript-internal op)
    RotaryEmbedding x2 + Concat + SDPA -> GroupQueryAttention(q, k, v, past_k, past_v, seqlens_k,
                                          total_sequence_length, cos_cache, sin_cache, do_rotary=1)

GroupQueryAttention derives the causal mask from seqlens_k (the last position, from position_ids),
so the graph no longer reads attention_mask, and it can take one buffer as both past and present
(onnxruntime-genai's past_present_share_buffer): the runtime's ``StaticCache`` binds a buffer of
the generation's whole length and the kernel writes each step's keys and values in place.

The lowering is all-or-nothing for the cache: only when every ``present.N.key/value`` comes out of
a GroupQueryAttention does the bundle say ``kv_cache: shared-buffer``; a decoder whose attention
the fusions do not recognise (other exporters, other mask forms) keeps its concat cache and still
compiles and runs, just without the fused kernel.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.rewriter import _fusion_utils, pattern
from onnxscript.rewriter.ort_fusions import cos_sin_cache, gqa, rotary_embedding, sdpa, sdpa_via_mha

#: Model metadata (``metadata_props``) with the most positions the decoder takes (the builder writes it).
CONTEXT_LENGTH_KEY = "context_length"
#: The longest cos/sin cache built as constants (2 tables of positions x head_dim/2 float32).
_MAX_CONSTANT_POSITIONS = 1 << 17


class _ConstantCosSinCache(cos_sin_cache.CosSinCacheFusion):
    """onnxscript's cos/sin cache fusion for a known number of positions: constant tables instead of
    Range/MatMul/Cos/Sin over every position up to the current one, recomputed at every step."""

    def __init__(self, name: str, positions: int, **kwargs) -> None:
        super().__init__(name, **kwargs)
        self.max_pos_id = positions - 1


def _cos_sin_rules(positions: int | None) -> pattern.RewriteRuleSet:
    if positions is None:
        return cos_sin_cache.cos_sin_cache_rules
    return pattern.RewriteRuleSet([
        _ConstantCosSinCache.rule("CosSinCache_cast", positions, cast=True, const_freqs=False),
        _ConstantCosSinCache.rule("CosSinCache_cast_const_freqs", positions, cast=True, const_freqs=True),
        _ConstantCosSinCache.rule("CosSinCache_const_freqs", positions, cast=False, const_freqs=True),
        _ConstantCosSinCache.rule("CosSinCache", positions, cast=False),
    ])


def _context_length(model: ir.Model) -> int | None:
    value = model.metadata_props.get(CONTEXT_LENGTH_KEY, "")
    return int(value) if value.isdigit() and 0 < int(value) <= _MAX_CONSTANT_POSITIONS else None


def lower_attention(model: ir.Model) -> dict[str, int]:
    """Fuse a decoder's attention into GroupQueryAttention in place; returns the count per fusion.

    ``counts["shared_buffer"]`` is 1 when every present output comes from GroupQueryAttention, so
    the runtime may bind one buffer as past and present. An SDPA the GQA rule did not take becomes
    MultiHeadAttention (onnxscript's fallback), so nothing onnxscript-internal is left. Models
    without a key/value cache (encoders) are left alone: ORT's MultiHeadAttention measured slower
    than the plain ops there (see ``fuse_for_ort``).
    """
    if not is_decoder(model):
        return {}
    counts = {"rotary_embedding": rotary_embedding.fuse_rotary_embedding(model)}
    if counts["rotary_embedding"]:
        counts["cos_sin_cache"] = _fusion_utils.apply_fusion_rules(_cos_sin_rules(_context_length(model)))(model)
    counts["sdpa"] = sdpa.fuse_sdpa(model, apply_shape_inference=True)
    if counts["sdpa"]:
        counts["gqa"] = gqa.fuse_gqa(model)
        counts["sdpa_as_mha"] = sdpa_via_mha.replace_sdpa_by_mha(model)
    common.RemoveUnusedNodesPass()(model)
    counts["shared_buffer"] = int(_presents_from_gqa(model))
    return {k: v for k, v in counts.items() if v}


def exact_projections(model: ir.Model) -> int:
    """Give the int4 MatMulNBits of the attention value projections and of the MLP down projections
    accuracy_level 0 (float activations); returns the number of nodes changed.

    Level 4 quantizes a MatMulNBits' input to int8 per block. On SmolLM2-135M, measured per
    projection kind as the KL divergence from the float32 reference on the verification text (all
    at level 4: 0.022), exact V gives 0.015 and exact V + down 0.011 (perplexity +4.9 % -> +2.6 %);
    q/k/o/gate/up bought less. V alone is 3 % of a decode step but flipped the greedy answer to
    the chat check (a near tie on the first token); V + down costs ~1.3x a decode step.
    """
    changed = 0
    for node in model.graph:
        targets = []
        if node.op_type == "GroupQueryAttention" and len(node.inputs) > 2 and node.inputs[2] is not None:
            targets = _matmulnbits_behind(node.inputs[2])  # the value projection
        elif node.op_type == "MatMulNBits" and _is_swiglu(node.inputs[0]):
            targets = [node]  # the MLP down projection
        for p in targets:
            if p.attributes.get_int("accuracy_level", 0) > 1:
                p.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", 0)
                changed += 1
    return changed


def _matmulnbits_behind(value: ir.Value) -> list[ir.Node]:
    """The MatMulNBits computing ``value``: itself, or the first term of a Q4_1 weight's
    MatMulNBits + block-offset MatMul sum (see ``edgec.models.llama``)."""
    producer = value.producer()
    candidates = [producer] if producer is None or producer.op_type != "Add" else [i.producer() for i in producer.inputs]
    return [p for p in candidates if p is not None and p.op_type == "MatMulNBits"]


def _is_swiglu(value: ir.Value | None) -> bool:
    """``value`` is Silu(gate) * up, with Silu written as gate * Sigmoid(gate)."""
    product = value.producer() if value is not None else None
    if product is None or product.op_type != "Mul":
        return False
    for factor in product.inputs:
        silu = factor.producer() if factor is not None else None
        if silu is not None and silu.op_type == "Mul" and any(
            i is not None and i.producer() is not None and i.producer().op_type == "Sigmoid" for i in silu.inputs
        ):
            return True
    return False


def is_decoder(model: ir.Model) -> bool:
    """A graph with a key/value cache (``past_key_values.N.*`` inputs)."""
    return any(v.name.startswith("past_key_values.") for v in model.graph.inputs)


def _presents_from_gqa(model: ir.Model) -> bool:
    presents = [v for v in model.graph.outputs if v.name.startswith("present.")]
    return bool(presents) and all(
        (p := v.producer()) is not None and p.op_type == "GroupQueryAttention" and p.domain == "com.microsoft"
        for v in presents
    )
