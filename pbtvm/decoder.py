"""Decode one token of an LSTM language model in one call: embedding, every layer, the head.

:class:`~pbtvm.lstm.PBLSTM` runs a whole sequence (one PB GEMM for the input projection of all
steps, then a fused step kernel per layer and step); decoding one token that way costs several
calls per layer. :func:`compile_decoder` builds the token step as a *single* Relax function with
a static batch::

    repack in:  tokens, h [L, B, H], c [L, B, H]  ->  planned buffers          (1 kernel)
    embedding:  x = E[token]                                                   (1 kernel)
    layer l:    (h_l, c_l) = pb_lstm_cell_input(x, W_ih, W_hh, ...); x = h_l  (1 kernel each)
    head:       logits = pb_dense_act(x, W_out) + b       (1 kernel on CUDA; pack + GEMM on CPU)
    repack out: logits, h', c'                                                 (1 kernel)

Each layer's input projection is inside its step kernel (:func:`pbtvm.ops.pb_lstm_cell_input`),
quantized exactly as :class:`~pbtvm.lstm.PBLSTM`'s separate projection GEMM does, so decoding
equals running the sequence. On CUDA the function is built with TVM's CUDA-graph rewrite: every
kernel between the two repacks reads and writes only planned memory, so it is captured once (per
``bitlayers`` value) and replayed as one graph launch per token; the repacks exist so that the
arguments and results, which the rewrite cannot capture, cost one kernel each.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .bitplane import DEFAULT_ACT_BITS, BitplaneFormat
from .decoder_step import StepParts
from .errors import InputError, InputTypeError, check_int
from .names import MANIFEST_DECODER
from .repack import CopyGroup, repack_func, repack_out_types
from .runtime import CompiledModel
from .serial import one_compile_at_a_time
from .target import AUTO_LAYOUT, resolve_target, weight_layout

#: Manifest key holding the decoder's shape (``pbtvm inspect`` shows it).
MANIFEST_KEY = MANIFEST_DECODER


def _check_parts(lstm: Any, embedding: Any, head: Any, batch: int) -> int:
    """Check the parts given to :func:`compile_decoder`; returns ``batch`` as a Python int."""
    import torch

    from .recurrent import check_step_lstm

    check_step_lstm(lstm, "compile_decoder")
    if embedding is not None:
        if not isinstance(embedding, torch.nn.Embedding):
            raise InputTypeError(f"embedding must be a torch.nn.Embedding, got {type(embedding).__name__}")
        if embedding.embedding_dim != lstm.input_size:
            raise InputError(f"embedding size {embedding.embedding_dim} != LSTM input size {lstm.input_size}")
    if head is not None:
        if not isinstance(head, torch.nn.Linear):
            raise InputTypeError(f"head must be a torch.nn.Linear, got {type(head).__name__}")
        if head.in_features != lstm.hidden_size:
            raise InputError(f"head takes {head.in_features} features, the LSTM gives {lstm.hidden_size}")
    return check_int("batch", batch, 1)


def _as_int64_ids(inputs: Any) -> Any:
    """Integer token ids of any width as int64 (what the compiled step takes), on their device;
    anything else unchanged, for the model's own dtype error."""
    import torch

    if isinstance(inputs, torch.Tensor):
        integer = not inputs.dtype.is_floating_point and not inputs.dtype.is_complex and inputs.dtype != torch.bool
        return inputs.to(torch.int64) if integer and inputs.dtype != torch.int64 else inputs
    if isinstance(inputs, np.ndarray) and inputs.dtype.kind in "iu" and inputs.dtype != np.int64:
        return inputs.astype(np.int64)
    return inputs


def _decoder_module(
    lstm: Any,
    embedding: Any,
    head: Any,
    fmt: BitplaneFormat,
    kind: str,
    batch: int,
    quant: tuple = ("auto", "mse"),
    generate_chunk: int = 0,
) -> tuple:
    """The token step as a Relax module; returns (module, input specs, converted layers, meta).

    With ``generate_chunk > 0`` the module also holds :mod:`pbtvm.generate`'s chunk functions,
    sharing the step's weight constants and kernels.
    """
    from ._tvm import relax, tir

    layers, hidden, n_in = lstm.num_layers, lstm.hidden_size, lstm.input_size
    state = (layers, batch, hidden)
    if embedding is not None:
        first = relax.Var("tokens", relax.TensorType([batch], "int64"))
        first_group = CopyGroup("int64", ((batch,),), ((batch,),))
    else:
        first = relax.Var("x", relax.TensorType([batch, n_in], "float32"))
        first_group = CopyGroup("float32", ((batch, n_in),), ((batch, n_in),))
    n_bits = tir.Var("bitlayers", "int64")
    params = [
        first,
        relax.Var("h", relax.TensorType(list(state), "float32")),
        relax.Var("c", relax.TensorType(list(state), "float32")),
        relax.Var("bitlayers", relax.ShapeType([n_bits])),
    ]
    parts = StepParts(lstm, embedding, head, fmt, kind, batch, quant)
    attrs = {"num_input": len(params), "relax.rewrite_cuda_graph.capture_symbolic_vars": ["bitlayers"]}
    bb = relax.BlockBuilder()
    with bb.function("main", params, attrs=attrs):
        with bb.dataflow():
            groups = [first_group, CopyGroup("float32", (state, state), (state[1:],) * (2 * layers))]
            fn = bb.add_func(repack_func(groups, kind, "repack_in"), "repack_in")
            copied = bb.emit(relax.call_tir(fn, params[:3], repack_out_types(groups)))
            hs = [bb.emit(relax.TupleGetItem(copied, 1 + i)) for i in range(layers)]
            cs = [bb.emit(relax.TupleGetItem(copied, 1 + layers + i)) for i in range(layers)]
            x, outs_h, outs_c = parts.emit_token(bb, bb.emit(relax.TupleGetItem(copied, 0)), hs, cs, n_bits)
            out_shape = (batch, head.out_features if head is not None else hidden)
            groups = [
                CopyGroup("float32", (out_shape,), (out_shape,)),
                CopyGroup("float32", (state[1:],) * (2 * layers), (state, state)),
            ]
            fn = bb.add_func(repack_func(groups, kind, "repack_out"), "repack_out")
            result = bb.emit_output(relax.call_tir(fn, [x, *outs_h, *outs_c], repack_out_types(groups)))
        bb.emit_func_output(result)
    if generate_chunk:
        from .generate import add_generate_functions

        add_generate_functions(bb, parts, generate_chunk)
    specs = [
        {"dtype": "int64", "shape": [batch]} if embedding is not None else {"dtype": "float32", "shape": [batch, n_in]},
        {"dtype": "float32", "shape": list(state)},
        {"dtype": "float32", "shape": list(state)},
    ]
    meta = {
        "num_layers": layers,
        "hidden_size": hidden,
        "input_size": n_in,
        "batch": batch,
        "vocab": int(embedding.num_embeddings) if embedding is not None else None,
        "outputs": out_shape[1],
        "generate_chunk": generate_chunk,
    }
    return bb.get(), specs, parts.converted, meta


class PBDecoder:
    """A token step compiled by :func:`compile_decoder`: ``out, (h, c) = dec(tokens, (h, c))``.

    Attributes
    ----------
    model : CompiledModel
        The underlying compiled function (manifest, export).
    num_layers, hidden_size, batch : int
    vocab : int or None
        Embedding rows when the step starts from token ids, else None (it takes ``x`` [B, I]).
    outputs : int
        Values per row of ``out``: the head's outputs (logits), else ``hidden_size``.
    check_tokens : bool
        Check that token ids lie in ``[0, vocab)`` (default True). Host ids cost nothing; ids in
        a CUDA tensor are copied to the host for it, a synchronisation per token: set False to
        skip it in a tight loop. Unchecked out-of-range ids read the nearest table row (clipped).
    """

    def __init__(self, model: CompiledModel) -> None:
        meta = model.manifest.get(MANIFEST_KEY)
        if meta is None:
            raise InputError("this compiled model is not a pbtvm decoder (its manifest has no 'decoder')")
        self.model = model
        self.format = model.format
        self.num_layers, self.hidden_size = meta["num_layers"], meta["hidden_size"]
        self.batch, self.vocab = meta["batch"], meta["vocab"]
        self.outputs = int(meta["outputs"])  # the head's outputs (logits per row), else hidden_size
        self.check_tokens = True
        self.generate_chunk = int(meta.get("generate_chunk", 0))
        self._chunk_inputs = None  # generate()'s kept chunk inputs, made on first use

    def generate(
        self,
        prompt: Any,
        max_new_tokens: int,
        sampling: Any = None,
        *,
        eos_token: int | None = None,
        return_logits: bool = False,
        bitlayers: int | None = None,
    ) -> Any:
        """Continue ``prompt`` by up to ``max_new_tokens`` tokens, the loop inside the module.

        See :func:`pbtvm.generate.generate` (parameters, EOS semantics, sampling definition).
        """
        from .generate import generate

        return generate(
            self,
            prompt,
            max_new_tokens,
            sampling,
            eos_token=eos_token,
            return_logits=return_logits,
            bitlayers=bitlayers,
        )

    def initial_state(self, device: str = "cpu") -> tuple[Any, Any]:
        """Zero ``(h, c)``, each float32 [num_layers, batch, hidden]."""
        import torch

        z = torch.zeros(self.num_layers, self.batch, self.hidden_size, device=device)
        return z, z.clone()

    def __call__(self, inputs: Any, state: tuple[Any, Any] | None = None, bitlayers: int | None = None) -> tuple:
        """Run one token.

        Parameters
        ----------
        inputs : torch.Tensor or numpy.ndarray
            Token ids [batch] of any integer dtype, as ``nn.Embedding`` takes them (a decoder with
            an embedding), else float32 [batch, input_size].
        state : (h, c), optional
            Each float32 [num_layers, batch, hidden]; zeros when omitted.
        bitlayers : int, optional
            Run-time precision knob (1..bits); on CUDA each value is captured once.

        Returns
        -------
        out : logits [batch, vocab] (with a head) or the top layer's h [batch, hidden]
        (h, c) : the new state, each [num_layers, batch, hidden]

        Raises
        ------
        ValueError
            A token id outside ``[0, vocab)`` (see ``check_tokens``) or a wrong shape; TypeError
            for a wrong dtype.

        Notes
        -----
        A Python loop over tokens with a torch CPU op between calls (``logits.argmax(-1)`` at
        batch 8) on few cores: torch's OpenMP workers spin after each parallel op and take the
        cores TVM's workers need (2x650 LM, W4, batch 8, 2-core EPYC: 1.7-9.0 ms per token over
        four runs, 0.93 ms with ``OMP_WAIT_POLICY=PASSIVE`` set before torch starts).
        :meth:`generate` runs the loop inside the module (0.7-0.8 ms) and has no torch op
        between steps.
        """
        import torch

        device = inputs.device.type if isinstance(inputs, torch.Tensor) else "cpu"
        if self.vocab is not None and (device == "cpu" or self.check_tokens):
            ids = inputs.detach().cpu().numpy() if isinstance(inputs, torch.Tensor) else np.asarray(inputs)
            if ids.size and ids.dtype.kind in "iu" and (ids.min() < 0 or ids.max() >= self.vocab):
                raise InputError(f"token ids must lie in [0, {self.vocab}), got {ids.min()}..{ids.max()}")
        if self.vocab is not None:
            inputs = _as_int64_ids(inputs)
        if state is None:
            state = self.initial_state(str(inputs.device) if device != "cpu" else "cpu")
        elif not isinstance(state, tuple | list) or len(state) != 2:
            shown = f"{len(state)} items" if isinstance(state, tuple | list) else type(state).__name__
            raise InputTypeError(f"state must be a pair (h, c), got {shown}")
        out, h, c = self.model(inputs, *state, bitlayers=bitlayers)
        return out, (h, c)

    def export(self, path: str | os.PathLike) -> str:
        """Write the decoder as one deployable .so; :func:`load_decoder` reads it back."""
        return self.model.export(os.fspath(path))

    def __reduce__(self) -> Any:
        """Refused: the model holds a native TVM module, which pickle (``copy.copy``,
        ``copy.deepcopy``, ``torch.save``) cannot carry; it is saved and moved as a library."""
        raise TypeError(
            "a compiled pbtvm model cannot be pickled or copied (it holds a native TVM module): "
            "save it with dec.export(path) and read it back with pbtvm.decoder.load_decoder(path)"
        )

    def __repr__(self) -> str:
        start = f"vocab={self.vocab}" if self.vocab is not None else "x input"
        return (
            f"PBDecoder({self.format.label}, {start}, layers={self.num_layers}, hidden={self.hidden_size}, "
            f"batch={self.batch}, target={self.model.manifest['target']['kind']})"
        )


@one_compile_at_a_time
def compile_decoder(
    lstm: Any,
    target: Any = "llvm",
    bits: int = 4,
    act_bits: int = DEFAULT_ACT_BITS,
    *,
    embedding: Any = None,
    head: Any = None,
    batch: int = 1,
    layout: str = AUTO_LAYOUT,
    cuda_graph: bool = True,
    codebook: str | None = "auto",
    quantizer: str = "mse",
    generate_chunk: int | None = None,
) -> PBDecoder:
    """Compile the one-token step of ``[embedding ->] lstm [-> head]`` with PrecisionBatching.

    Parameters
    ----------
    lstm : torch.nn.LSTM
        Unidirectional, no ``proj_size``; any number of layers, with or without bias.
    target, bits, act_bits, layout
        As in :func:`pbtvm.compile`, except that ``layout="auto"`` knows the batch here: on x86
        CPUs with AVX2 but not AVX-512 VNNI, at batch 1-2 and 2..8 bits (with AVX-VNNI and GFNI:
        batch x bits <= 4), it is ``"lut16x4"`` (table lookup, :mod:`pbtvm.ops.pb_lut`;
        :func:`pbtvm.target.weight_layout`).
    embedding : torch.nn.Embedding, optional
        Makes the step take token ids (the table stays float32: a lookup, no product).
    head : torch.nn.Linear, optional
        Output layer on the top hidden state (PB), e.g. the vocabulary logits.
    batch : int
        Static batch size (CUDA-graph capture needs static shapes).
    cuda_graph : bool
        On CUDA, capture the step between its repacks as a CUDA graph.
    codebook, quantizer : str
        As in :func:`pbtvm.compile`; with ``"auto"`` an LSTM layer's ``W_ih`` and ``W_hh`` (one
        kernel) share the codebook with the lowest summed weight error, the head gets its own.
    generate_chunk : int, optional
        Tokens per call of :meth:`PBDecoder.generate` (steps unrolled in one compiled function,
        one CUDA graph on CUDA); default 16 with an embedding and a head whose outputs are
        embedding rows (``out_features <= num_embeddings``: the token picked is fed back), 0 (no
        generate) else.

    Returns
    -------
    PBDecoder

    Raises
    ------
    TypeError, ValueError
        Wrong module types, mismatched sizes, bits out of range, batch < 1, a ``generate_chunk``
        without embedding and head or with a head of more outputs than the embedding has rows.
    """
    from .compiler import build_model
    from .generate import cannot_generate, check_chunk
    from .lowering import check_module_weights

    batch = _check_parts(lstm, embedding, head, batch)
    check_module_weights({"": lstm, "head": head})
    generate_chunk = check_chunk(generate_chunk, cannot_generate(embedding, head))
    from .quantize import check_codebook

    check_codebook(codebook, bits, quantizer)
    tvm_target = resolve_target(target)
    fmt = BitplaneFormat(bits, act_bits, layout=weight_layout(layout, tvm_target, bits, act_bits, batch))
    kind = tvm_target.kind.name
    quant = (codebook, quantizer)
    with tvm_target:  # the head's kernel choice reads the target
        mod, specs, converted, meta = _decoder_module(lstm, embedding, head, fmt, kind, batch, quant, generate_chunk)
    model = build_model(
        mod,
        fmt,
        tvm_target,
        specs,
        dynamic=False,
        single_output=False,
        converted=converted,
        cuda_graph=cuda_graph and kind == "cuda",
        extra={
            MANIFEST_KEY: {**meta, "cuda_graph": cuda_graph and kind == "cuda"},
            "quantizer": {"codebook": codebook, "method": quantizer},
        },
    )
    return PBDecoder(model)


def load_decoder(path: str | os.PathLike, device: str | None = None) -> PBDecoder:
    """Load a decoder written by :meth:`PBDecoder.export` (needs only the TVM runtime).

    Raises
    ------
    FileNotFoundError, pbtvm.LibraryError
        As :func:`pbtvm.load`; ValueError if the library is not a decoder.
    """
    from .runtime import load_model

    return PBDecoder(load_model(os.fspath(path), device))


__all__ = ["PBDecoder", "compile_decoder", "load_decoder"]
