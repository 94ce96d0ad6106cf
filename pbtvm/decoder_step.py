"""One token step of an LSTM language model as Relax: embedding, every layer's fused PB step, the head.

:class:`StepParts` quantizes and packs each weight once, however often a step is emitted:
:func:`pbtvm.decoder.compile_decoder` emits one step (``main``), :mod:`pbtvm.generate` one per
step of a chunk.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .bitplane import BitplaneFormat
from .recurrent import current_weight, flat_weights

__all__ = ["StepParts", "embedding_table"]


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().float().numpy()


def embedding_table(embedding: Any) -> np.ndarray:
    """The rows ``embedding`` returns, float32 [num_embeddings, embedding_dim]: with ``max_norm``,
    each row as torch renormalises it when looked up (in place, so a row looked up again is
    returned as it was the first time); the module's own table is not changed. A table computed
    by a ``weight_norm`` / ``spectral_norm`` hook is computed now (:func:`current_weight`)."""
    import torch

    if embedding.max_norm is None:
        return _np(current_weight(embedding, "weight"))
    with torch.no_grad():
        table = current_weight(embedding, "weight").clone()
        rows = torch.arange(table.shape[0], device=table.device)
        torch.embedding_renorm_(table, rows, embedding.max_norm, embedding.norm_type)
    return _np(table)


class StepParts:
    """The pieces of one token step, each weight quantized and packed once however often emitted.

    ``emit_token`` adds a step to the function being built; :func:`_decoder_module` emits it once
    (``main``), :mod:`pbtvm.generate` once per step of a chunk. ``converted`` lists the PB layers.
    """

    def __init__(self, lstm: Any, embedding: Any, head: Any, fmt: BitplaneFormat, kind: str, batch: int, quant: tuple):
        self.lstm, self.embedding, self.head = lstm, embedding, head
        self.fmt, self.kind, self.batch, self.quant = fmt, kind, batch, quant
        self.converted: list[dict] = []
        self.cache: dict = {}

    def table(self) -> Any:
        """The embedding's rows as one Relax constant (float32 ``[num_embeddings, dim]``)."""
        from ._tvm import relax

        if "table" not in self.cache:
            self.cache["table"] = relax.const(embedding_table(self.embedding), "float32")
        return self.cache["table"]

    def emit_token(
        self, bb: Any, x: Any, hs: list, cs: list, n_bits: Any, head: bool = True, embedded: bool = False
    ) -> tuple:
        """Embedding (if any, unless ``x`` is ``embedded`` already), every layer, head (if any and
        ``head``); returns ``(out, [h'], [c'])``."""
        from ._tvm import relax

        if self.embedding is not None and not embedded:
            x = bb.emit(relax.op.take(self.table(), x, axis=0, mode="clip"))
        outs_h, outs_c = [], []
        for layer in range(self.lstm.num_layers):
            x, c_new = _emit_layer(bb, self, layer, x, hs[layer], cs[layer], n_bits)
            outs_h.append(x)
            outs_c.append(c_new)
        if self.head is not None and head:
            x = _emit_head(bb, self, x, n_bits)
        return x, outs_h, outs_c


def _emit_layer(bb: Any, parts: StepParts, layer: int, x: Any, h: Any, c: Any, n_bits: Any) -> tuple:
    """One layer's step, one kernel (:func:`pbtvm.kernels.lstm_cell_input_func`; on AVX-512 CPUs
    :class:`pbtvm.schedules.cpu_vnni.CPUVnniLstmCell` makes it the AVX-512 step); returns (h', c')."""
    from ._tvm import relax

    key = ("layer", layer)
    if key not in parts.cache:
        parts.cache[key] = _layer_weights(bb, parts, layer)
    func, ih_args, hh_args = parts.cache[key]
    state = relax.TensorType([parts.batch, parts.lstm.hidden_size], "float32")
    args = [x, *ih_args, h, c, *hh_args, relax.prim_value(n_bits)]
    step = bb.emit(relax.call_tir(func, args, [state, state]))
    return bb.emit(relax.TupleGetItem(step, 0)), bb.emit(relax.TupleGetItem(step, 1))


def _layer_weights(bb: Any, parts: StepParts, layer: int) -> tuple:
    """(step kernel, ``W_ih`` constants (scales, bias), ``W_hh`` constants) of a layer; records it as converted."""
    from ._tvm import relax
    from .kernels import lstm_cell_input_func
    from .lowering import LayerRecord, lower_weights
    from .ops import unit_major_rows

    lstm, hidden = parts.lstm, parts.lstm.hidden_size
    rows = unit_major_rows(hidden)
    if "weights" not in parts.cache:
        parts.cache["weights"] = flat_weights(lstm)  # computed ones (weight_norm ...) as the forward uses them
    weights = parts.cache["weights"]
    w_ih, w_hh = (_np(weights[f"weight_{k}_l{layer}"]) for k in ("ih", "hh"))
    fmt, (packed_ih, packed_hh) = lower_weights([w_ih, w_hh], parts.fmt, parts.quant, rows=rows)  # one codebook
    ih_args = list(packed_ih)
    if lstm.bias:
        bias = _np(weights[f"bias_ih_l{layer}"] + weights[f"bias_hh_l{layer}"])
        ih_args.append(relax.const(bias[rows], "float32"))
    for k, w in (("ih", w_ih), ("hh", w_hh)):
        parts.converted.append(LayerRecord.of(f"weight_{k}_l{layer} (LSTM)", w, fmt, bias=False).as_dict())
    func = lstm_cell_input_func(fmt, w_ih.shape[1], hidden, lstm.bias).without_attr("global_symbol")
    return bb.add_func(func, f"pb_lstm_step_l{layer}"), ih_args, list(packed_hh)


def _emit_head(bb: Any, parts: StepParts, x: Any, n_bits: Any) -> Any:
    """The output layer; returns its output [batch, out_features].

    On CUDA one :func:`pbtvm.kernels.dense_act_func` kernel (every block packs ``x`` itself: 12.1
    vs 20.0 us for pack kernels + PB GEMM at 10000x650 on an H100); on AVX-512 CPUs one kernel too
    (the AVX-512 GEMM quantizes the row itself, :func:`pbtvm.schedules.cpu_vnni.one_kernel_layer`);
    on other CPUs the activation pack and the popcount GEMM as two kernels (the popcount one-kernel
    head made the 2x650 decoder 12% slower on 2 cores, BENCHMARKS.md, 2026-11-23).
    """
    from ._tvm import relax

    if "head" not in parts.cache:
        parts.cache["head"] = _head_weights(bb, parts)
    pack, gemm, weights, fmt = parts.cache["head"]
    batch, (n, k) = parts.batch, parts.head.weight.shape
    args = [x, *weights]
    if pack is not None:
        packed_types = [
            relax.TensorType(list(fmt.act_shape(batch, k)), "uint32"),
            relax.TensorType([batch], "float32"),
            relax.TensorType([batch], fmt.accumulator_dtype(k)),
        ]
        xp = bb.emit(relax.call_tir(pack, [x], packed_types))
        args = [*(bb.emit(relax.TupleGetItem(xp, i)) for i in range(3)), *weights]
    out_type = relax.TensorType([batch, n], "float32")
    return bb.emit(relax.call_tir(gemm, [*args, relax.prim_value(n_bits)], out_type))


def _head_weights(bb: Any, parts: StepParts) -> tuple:
    """(pack kernel or None, GEMM kernel, constants, format) of the head; records it as converted."""
    from ._tvm import relax
    from .kernels import act_pack_func, dense_act_func, dense_func
    from .lowering import LayerRecord, lower_weights
    from .schedules.cpu_vnni import one_kernel_layer

    head = parts.head
    w_out = _np(current_weight(head, "weight"))  # as head's forward computes it (weight_norm ...)
    has_bias = head.bias is not None
    fmt, [packed] = lower_weights([w_out], parts.fmt, parts.quant)
    weights = [*packed, *([relax.const(_np(current_weight(head, "bias")), "float32")] if has_bias else [])]
    n, k = head.out_features, head.in_features
    pack = None
    if parts.kind == "cuda" or one_kernel_layer(fmt, k):  # AVX-512 CPUs: quantize + GEMM in one kernel
        func = dense_act_func(fmt, n, k, has_bias)
    else:
        pack = bb.add_func(act_pack_func(fmt, k).without_attr("global_symbol"), "pb_act_pack_head")
        func = dense_func(fmt, n, k, has_bias)
    parts.converted.append(LayerRecord.of("head (Linear)", w_out, fmt, has_bias).as_dict())
    return pack, bb.add_func(func.without_attr("global_symbol"), "pb_dense_head"), weights, fmt
