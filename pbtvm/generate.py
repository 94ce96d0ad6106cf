"""Token generation with the loop inside the compiled module: :meth:`PBDecoder.generate`.

:func:`pbtvm.decoder.compile_decoder` adds three Relax functions to the decoder's module:
``generate_chunk``, ``generate_chunk_logits`` (the same, also returning every step's logits) and
``prefill_chunk`` (N prompt tokens through the layers only: no head, no pick). A generate call
runs ``N = generate_chunk`` token steps unrolled::

    repack in:  token, forced [N, B], done, ctrl, temperature, h, c  ->  planned buffers
    step j:     embedding (step 0; then the pick's), every layer, head (the decoder's kernels)
                ->  logits [B, V]
                pick (pbtvm.sampling): forced[j] if >= 0, else eos for finished rows, else
                greedy / sampled token; it is the next step's input, and so is its embedding
                row, which the pick kernel copies (no lookup kernel between steps)
    repack out: tokens [N, B], last token, done, ctrl (counter advanced by N), h, c
                (, logits [N, B, V])

Nothing crosses to the host between steps; on CUDA everything between the repacks is captured
as one CUDA graph (per ``bitlayers`` value) and replayed for every chunk. A chunk returns the
generator's whole state (token, done, ctrl, h, c), which the next chunk takes as it is: the host
only launches chunks (no tensor is made between them) and, with an ``eos_token``, reads ``done``
after each chunk to stop early.

The prompt: whole chunks of it go through ``prefill_chunk``; the rest runs in the generate chunks,
where step ``s`` feeds ``prompt[s + 1]`` (``forced``) while ``s + 1 < P`` and the picked token
after, so the logits of the last prompt token choose the first new token. The random counter
of generated token ``g`` is ``g`` (independent of the chunking): generate() equals
:func:`generate_stepwise`, the decoder called token by token with
:func:`pbtvm.sampling.pick_reference`.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError, InputTypeError, check_int
from .repack import CopyGroup, repack_func, repack_out_types
from .sampling import CTRL_FIELDS, DONE_FINISHED, DONE_NONFINITE, pick_func, pick_reference
from .user_frame import user_stacklevel

#: Tokens per chunk call when :func:`pbtvm.decoder.compile_decoder` is not told.
DEFAULT_CHUNK = 16
#: Most new tokens one generate() call takes (its step counter and token positions stay int32-sized).
MAX_NEW_TOKENS = 2**31 - 1
#: A ``top_k`` at least any vocabulary: every token (an int64 on the device, so larger ones become this).
TOP_K_ALL = 2**62
CHUNK_FUNCS = {False: "generate_chunk", True: "generate_chunk_logits"}
#: Runs N prompt tokens through the layers only (no head, no pick).
PREFILL_FUNC = "prefill_chunk"


@dataclass(frozen=True)
class Sampling:
    """Seeded sampling: softmax of ``logits / temperature`` over the ``top_k`` largest (0 = all).

    ``temperature == 0`` is greedy. The same seed gives the same tokens on every run, batch row
    by batch row (row ``r`` draws from ``(seed, generated index, r)``).
    """

    temperature: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(float(t)) or t < 0:
            raise InputError(f"temperature must be a finite number >= 0, got {t!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral) or self.top_k < 0:
            raise InputError(f"top_k must be an int >= 0 (0 = no top-k), got {self.top_k!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or not 0 <= self.seed < 2**63:
            raise InputError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        # numpy scalars (np.float32, np.uint64 ...) as Python numbers from here on
        for name, kind in (("temperature", float), ("top_k", int), ("seed", int)):
            object.__setattr__(self, name, kind(getattr(self, name)))


GREEDY = Sampling(temperature=0.0)


def cannot_generate(embedding: Any, head: Any) -> str | None:
    """Why a decoder of these parts cannot run :meth:`PBDecoder.generate`, or None when it can:
    generate() feeds each token it picks (an index of the head's outputs) back through the embedding."""
    if embedding is None or head is None:
        return "generate() needs an embedding (token ids in) and a head (logits out)"
    if head.out_features > embedding.num_embeddings:
        return (
            f"generate() feeds each token it picks (one of the head's {head.out_features} outputs) back through "
            f"the embedding, which has {embedding.num_embeddings} rows: the head may not predict ids the "
            "embedding lacks"
        )
    return None


def check_chunk(chunk: int | None, why_not: str | None) -> int:
    """The ``generate_chunk`` to compile: default, validated, 0 when the decoder cannot generate
    (``why_not``, from :func:`cannot_generate`, says why)."""
    if chunk is None:
        return DEFAULT_CHUNK if why_not is None else 0
    chunk = check_int("generate_chunk", chunk, 0)
    if chunk and why_not is not None:
        raise InputError(f"{why_not}; pass generate_chunk=0 for a decoder without generate()")
    return chunk


def add_generate_functions(bb: Any, parts: Any, chunk: int) -> None:
    """Add ``generate_chunk``, ``generate_chunk_logits`` and ``prefill_chunk`` to the module ``bb``
    is building.

    ``parts`` is the decoder's :class:`pbtvm.decoder_step.StepParts` (its weights are shared).
    """
    for with_logits, name in CHUNK_FUNCS.items():
        _chunk_function(bb, parts, chunk, with_logits, name)
    _prefill_function(bb, parts, chunk)


def _prefill_function(bb: Any, parts: Any, chunk: int) -> None:
    """``prefill_chunk(tokens [N, B], h, c) -> (h, c)``: N prompt steps without head or pick."""
    from ._tvm import relax, tir

    lstm, batch, kind = parts.lstm, parts.batch, parts.kind
    layers = lstm.num_layers
    state = (layers, batch, lstm.hidden_size)
    n_bits = tir.Var("bitlayers", "int64")
    params = [
        relax.Var("tokens", relax.TensorType([chunk, batch], "int64")),
        relax.Var("h", relax.TensorType(list(state), "float32")),
        relax.Var("c", relax.TensorType(list(state), "float32")),
        relax.Var("bitlayers", relax.ShapeType([n_bits])),
    ]
    attrs = {"num_input": len(params), "relax.rewrite_cuda_graph.capture_symbolic_vars": ["bitlayers"]}
    groups_in = [
        CopyGroup("int64", ((chunk, batch),), ((batch,),) * chunk),
        CopyGroup("float32", (state, state), (state[1:],) * (2 * layers)),
    ]
    groups_out = [CopyGroup("float32", (state[1:],) * (2 * layers), (state, state))]
    with bb.function(PREFILL_FUNC, params, attrs=attrs):
        with bb.dataflow():
            fn = bb.add_func(repack_func(groups_in, kind, f"{PREFILL_FUNC}_in"), f"{PREFILL_FUNC}_in")
            copied = bb.emit(relax.call_tir(fn, params[:-1], repack_out_types(groups_in)))
            hs = [bb.emit(relax.TupleGetItem(copied, chunk + i)) for i in range(layers)]
            cs = [bb.emit(relax.TupleGetItem(copied, chunk + layers + i)) for i in range(layers)]
            for j in range(chunk):
                _, hs, cs = parts.emit_token(bb, bb.emit(relax.TupleGetItem(copied, j)), hs, cs, n_bits, head=False)
            fn = bb.add_func(repack_func(groups_out, kind, f"{PREFILL_FUNC}_out"), f"{PREFILL_FUNC}_out")
            result = bb.emit_output(relax.call_tir(fn, [*hs, *cs], repack_out_types(groups_out)))
        bb.emit_func_output(result)


def _chunk_function(bb: Any, parts: Any, chunk: int, with_logits: bool, name: str) -> None:
    from ._tvm import relax, tir, tvm
    from .target import TargetInfo

    lstm, batch, kind = parts.lstm, parts.batch, parts.kind
    layers, vocab = lstm.num_layers, parts.head.out_features
    state = (layers, batch, lstm.hidden_size)
    n_bits = tir.Var("bitlayers", "int64")
    inputs = {
        "token": ((batch,), "int64"),
        "forced": ((chunk, batch), "int64"),
        "done": ((batch,), "int64"),
        "ctrl": ((len(CTRL_FIELDS),), "int64"),
        "temperature": ((1,), "float64"),
        "h": (state, "float32"),
        "c": (state, "float32"),
    }
    params = [relax.Var(k, relax.TensorType(list(s), d)) for k, (s, d) in inputs.items()]
    params.append(relax.Var("bitlayers", relax.ShapeType([n_bits])))
    attrs = {"num_input": len(params), "relax.rewrite_cuda_graph.capture_symbolic_vars": ["bitlayers"]}
    ints = tuple(s for s, d in inputs.values() if d == "int64")
    groups_in = [
        CopyGroup("int64", ints, ints),
        CopyGroup("float64", ((1,),), ((1,),)),
        CopyGroup("float32", (state, state), (state[1:],) * (2 * layers)),
    ]
    n_ctrl = len(CTRL_FIELDS)
    groups_out = [
        CopyGroup("int64", ((batch,),) * (chunk + 2) + ((n_ctrl,),), ((chunk, batch), (batch,), (batch,), (n_ctrl,))),
        CopyGroup("float32", (state[1:],) * (2 * layers), (state, state)),
    ]
    advance = np.zeros(n_ctrl, np.int64)
    advance[CTRL_FIELDS.index("counter")] = chunk  # the next chunk's first random counter
    if with_logits:
        groups_out.append(CopyGroup("float32", ((batch, vocab),) * chunk, ((chunk, batch, vocab),)))
    table_shape = (parts.embedding.num_embeddings, parts.embedding.embedding_dim)
    target = tvm.target.Target.current(allow_none=True)  # the decoder is built under its target
    programmatic = target is not None and TargetInfo.of(target).limits.programmatic_launch
    # the pick also looks its token up
    pick = pick_func(batch, vocab, chunk, kind, embedding=table_shape, programmatic=programmatic)
    pick = bb.add_func(pick.without_attr("global_symbol"), "pick_token")
    picked_types = [
        relax.TensorType([batch], "int64"),
        relax.TensorType([batch], "int64"),
        relax.TensorType([batch, vocab], "float64"),
        relax.TensorType([batch, table_shape[1]], "float32"),
    ]
    with bb.function(name, params, attrs=attrs):
        with bb.dataflow():
            fn = bb.add_func(repack_func(groups_in, kind, f"{name}_in"), f"{name}_in")
            copied = bb.emit(relax.call_tir(fn, params[:-1], repack_out_types(groups_in)))
            token, forced, done, ctrl, temp = (bb.emit(relax.TupleGetItem(copied, i)) for i in range(5))
            hs = [bb.emit(relax.TupleGetItem(copied, 5 + i)) for i in range(layers)]
            cs = [bb.emit(relax.TupleGetItem(copied, 5 + layers + i)) for i in range(layers)]
            tokens, logits = [], []
            x = token  # then the pick's lookup of the token it chose
            for j in range(chunk):
                out, hs, cs = parts.emit_token(bb, x, hs, cs, n_bits, embedded=j > 0)
                step = relax.prim_value(tir.IntImm("int64", j))
                args = [out, forced, done, ctrl, temp, parts.table(), step]
                chosen = bb.emit(relax.call_tir(pick, args, picked_types))
                token, done = bb.emit(relax.TupleGetItem(chosen, 0)), bb.emit(relax.TupleGetItem(chosen, 1))
                x = bb.emit(relax.TupleGetItem(chosen, 3))
                tokens.append(token)
                logits.append(out)
            ctrl_next = bb.emit(relax.op.add(ctrl, relax.const(advance, "int64")))
            fn = bb.add_func(repack_func(groups_out, kind, f"{name}_out"), f"{name}_out")
            args = [*tokens, token, done, ctrl_next, *hs, *cs, *(logits if with_logits else [])]
            result = bb.emit_output(relax.call_tir(fn, args, repack_out_types(groups_out)))
        bb.emit_func_output(result)


def _as_sampling(sampling: Any) -> Sampling:
    if sampling is None or (isinstance(sampling, str) and sampling == "greedy"):
        return GREEDY
    if isinstance(sampling, Sampling):
        return sampling
    raise InputTypeError(f"sampling must be None, 'greedy' or a pbtvm.generate.Sampling, got {sampling!r}")


def _check_request(
    dec: Any, prompt: Any, max_new_tokens: int, eos_token: int | None, need_chunk: bool = True
) -> np.ndarray:
    """The prompt as int64 [batch, P] on the host, after every argument check."""
    if dec.vocab is None:
        raise InputError("generate() needs a decoder with an embedding (token ids in)")
    if need_chunk and not dec.generate_chunk:
        raise InputError(
            "this decoder was compiled without generate() (generate_chunk=0); generate() needs an embedding and a head "
            "whose outputs are embedding rows: compile_decoder(lstm, embedding=..., head=..., generate_chunk=16)"
        )
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
    if max_new_tokens > MAX_NEW_TOKENS:
        raise InputError(f"max_new_tokens must be at most {MAX_NEW_TOKENS:,} per call, got {max_new_tokens:,}")
    if eos_token is not None and (
        isinstance(eos_token, bool) or not isinstance(eos_token, int | np.integer) or not 0 <= eos_token < dec.vocab
    ):
        raise InputError(f"eos_token must be None or a token id in [0, {dec.vocab}), got {eos_token!r}")
    if eos_token is not None and eos_token >= dec.outputs:
        raise InputError(
            f"eos_token {eos_token} is not one of the head's {dec.outputs} outputs: generate() could never pick it, "
            "so it would never stop early"
        )
    ids = _prompt_ids(prompt, dec.batch, dec.vocab)
    if ids.ndim == 1 and dec.batch == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[0] != dec.batch or ids.shape[1] < 1:
        raise InputError(f"prompt must have shape [batch={dec.batch}, length >= 1], got {tuple(ids.shape)}")
    if ids.min() < 0 or ids.max() >= dec.vocab:
        raise InputError(f"token ids must lie in [0, {dec.vocab}), got {ids.min()}..{ids.max()}")
    return ids.astype(np.int64)


def _prompt_ids(prompt: Any, batch: int, vocab: int) -> np.ndarray:
    """``prompt`` (tensor, array, list of ids or of rows) as an integer numpy array; an error names
    what is wrong with it (rows of different lengths, no ids, ids past int64, not integers)."""
    if hasattr(prompt, "detach"):
        ids = prompt.detach().cpu().numpy()
    else:
        try:
            ids = np.asarray(prompt)
        except (ValueError, OverflowError) as err:  # ragged rows; an int no float holds beside floats
            raise InputError(f"prompt must be [batch, length] token ids, rows of one length: {err}") from None
    if ids.size == 0:  # a list [] or [[], []] is float64 to numpy: the shape is what is wrong
        raise InputError(f"prompt must have shape [batch={batch}, length >= 1], got {tuple(ids.shape)}")
    if ids.dtype.kind in "fO" and not isinstance(prompt, np.ndarray):  # a list with ids past int64
        values = list(np.asarray(prompt, dtype=object).flat)
        if all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in values):
            lo, hi = (_short_int(f(values)) for f in (min, max))
            raise InputError(f"token ids must lie in [0, {vocab}), got {lo}..{hi}")
    if ids.dtype.kind not in "iu":
        raise InputTypeError(f"prompt must hold integer token ids, got dtype {ids.dtype}")
    return ids


def _short_int(value: int) -> str:
    """``value`` as digits, cut to its first three and its length past 20 of them."""
    text = str(value)
    return text if len(text) <= 20 else f"{text[:3]}...({len(text)} digits)"


def _trim(tokens: np.ndarray, eos: int | None) -> int:
    """Columns to return: all, unless every row emitted ``eos``; then up to the latest first EOS."""
    if eos is None:
        return tokens.shape[1]
    hit = tokens == eos
    if not hit.any(axis=1).all():
        return tokens.shape[1]
    return int(hit.argmax(axis=1).max()) + 1


class _ChunkInputs:
    """The chunk functions' inputs, made once per decoder and reused by every generate() call.

    Right after a chunk call (the kernels have evicted the interpreter's working set) making a
    TVM tensor from numpy costs 30-60 µs on the 2-core test machine, and ``copyfrom`` into a
    kept one 30-50 µs. The chunk and prefill functions copy their arguments into their own
    buffers (``*_in`` repack) and never write them, and calls run under the model's lock, one
    at a time, so the constant inputs are shared and the others (first token, ``ctrl``, the
    first chunk's prompt tokens, each prefill chunk's tokens) are written into kept tensors:
    through numpy views on the CPU, with ``copyfrom`` on CUDA (ordered after the kernels already
    launched on the default stream).
    """

    def __init__(self, dec: Any) -> None:
        from ._tvm import tvm

        dev, batch, chunk = dec.model._dev, dec.batch, dec.generate_chunk
        self._dev = dev
        state = np.zeros((dec.num_layers, batch, dec.hidden_size), np.float32)
        self.zero_state = tvm.runtime.tensor(state, dev)
        self.not_done = tvm.runtime.tensor(np.zeros(batch, np.int64), dev)
        self.no_forcing = tvm.runtime.tensor(np.full((chunk, batch), -1, np.int64), dev)
        self.token = tvm.runtime.empty((batch,), "int64", dev)
        self.forced = tvm.runtime.empty((chunk, batch), "int64", dev)
        self.forced_last = tvm.runtime.empty((chunk, batch), "int64", dev)
        self.prefill = tvm.runtime.empty((chunk, batch), "int64", dev)
        self.ctrl = tvm.runtime.empty((len(CTRL_FIELDS),), "int64", dev)
        written = ("token", "forced", "forced_last", "prefill", "ctrl")
        self._views = None if dec.model._on_cuda else {k: np.from_dlpack(getattr(self, k)) for k in written}
        self._temperatures: dict[float, Any] = {}

    def write(self, name: str, value: np.ndarray) -> Any:
        """Store ``value`` in the kept tensor ``name`` (one of ``__init__``'s ``written``); returns it."""
        tensor = getattr(self, name)
        if self._views is None:
            tensor.copyfrom(np.ascontiguousarray(value))
        else:
            self._views[name][...] = value
        return tensor

    @classmethod
    def of(cls, dec: Any) -> _ChunkInputs:
        """The decoder's set (made on first use; call with ``dec.model._lock`` held, VM ready)."""
        if dec._chunk_inputs is None:
            dec._chunk_inputs = cls(dec)
        return dec._chunk_inputs

    def temperature(self, value: float) -> Any:
        """float64 [1] tensor holding ``value`` (the last 16 values are kept)."""
        from ._tvm import tvm

        if value not in self._temperatures:
            if len(self._temperatures) >= 16:
                self._temperatures.clear()
            self._temperatures[value] = tvm.runtime.tensor(np.array([value], np.float64), self._dev)
        return self._temperatures[value]


def generate(
    dec: Any,
    prompt: Any,
    max_new_tokens: int,
    sampling: Any = None,
    *,
    eos_token: int | None = None,
    return_logits: bool = False,
    bitlayers: int | None = None,
) -> Any:
    """Continue ``prompt`` by up to ``max_new_tokens`` tokens with ``N``-step chunk calls.

    Parameters
    ----------
    dec : PBDecoder
        Compiled with an embedding, a head and ``generate_chunk > 0``.
    prompt : torch.Tensor or numpy.ndarray
        Integer token ids [batch, P] (P >= 1; [P] when batch is 1), the state starts at zero.
    max_new_tokens : int
    sampling : None, "greedy" or Sampling
    eos_token : int, optional
        A row that emits it is finished and emits ``eos_token`` from then on; when every row has
        finished, generation stops and the result ends at the latest row's EOS.
    return_logits : bool
        Also return the logits that chose every returned token.
    bitlayers : int, optional
        Run-time precision knob, as in :meth:`PBDecoder.__call__`.

    Returns
    -------
    tokens : int64 [batch, T]
        ``T = max_new_tokens`` unless every row finished earlier. A torch tensor (on the
        decoder's device) for a torch prompt, else numpy.
    logits : float32 [batch, T, vocab]
        Only with ``return_logits``.

    Raises
    ------
    ValueError, TypeError
        A decoder without generate(), a bad prompt (shape, dtype, ids outside the vocabulary),
        ``max_new_tokens`` below 1 or above :data:`MAX_NEW_TOKENS`, a bad ``eos_token``, ``sampling`` or
        ``bitlayers``.
    FloatingPointError
        Sampling met logits holding NaN, or ±inf as the largest value (``torch.multinomial``
        refuses those too). Greedy decoding picks the first NaN's index there, as
        ``torch.argmax`` does, and warns (``RuntimeWarning``).
    """
    sampling = _as_sampling(sampling)
    ids = _check_request(dec, prompt, max_new_tokens, eos_token)
    model, chunk, length = dec.model, dec.generate_chunk, ids.shape[1]
    n_layers = model.format.check_bitlayers(bitlayers)
    steps = length - 1 + int(max_new_tokens)  # step s feeds token s and yields token s + 1
    first = (length - 1) // chunk * chunk  # steps done by prefill chunks (prompt tokens, no head)
    n_chunks = -(-(steps - first) // chunk)
    eos = -1 if eos_token is None else int(eos_token)
    fields = {
        "seed": sampling.seed,
        "counter": first - (length - 1),
        "eos": eos,
        "top_k": min(sampling.top_k, TOP_K_ALL),
    }
    first_ctrl = np.array([fields[k] for k in CTRL_FIELDS], np.int64)
    with model._lock:
        model._ensure_vm()
        kept = _ChunkInputs.of(dec)
        layers_arg = model._bitlayers_arg(n_layers)
        h = c = kept.zero_state
        for start in range(0, first, chunk):
            tokens_in = kept.write("prefill", ids[:, start : start + chunk].T)
            h, c = model._vm[PREFILL_FUNC](tokens_in, h, c, layers_arg)
        forced = _forced_inputs(kept, ids, first, steps, n_chunks, chunk)
        token, ctrl = kept.write("token", ids[:, first]), kept.write("ctrl", first_ctrl)
        done, temp = kept.not_done, kept.temperature(sampling.temperature)
        fn, outs, done_here = model._vm[CHUNK_FUNCS[bool(return_logits)]], [], None
        for k in range(n_chunks):  # the chunk's outputs are the next chunk's inputs: no host work
            res = fn(token, forced.get(k, kept.no_forcing), done, ctrl, temp, h, c, layers_arg)
            token, done, ctrl, h, c = res[1], res[2], res[3], res[4], res[5]
            outs.append((res[0], res[6] if return_logits else None))
            done_here = None  # the host copy of this chunk's ``done``, where the end-token check made one
            if eos >= 0 and first + (k + 1) * chunk >= length:
                done_here = _host(done, model)
                if _finished(done_here):
                    break
        _report_nonfinite(_host(done, model) if done_here is None else done_here, sampling)
        keep = slice(length - 1 - first, steps - first)
        tokens = np.concatenate([_host(t, model) for t, _ in outs])[keep].T
        logits = np.concatenate([_host(g, model) for _, g in outs])[keep] if return_logits else None
    n = _trim(tokens, eos_token)
    return _result(prompt, dec, tokens[:, :n], None if logits is None else logits[:n].transpose(1, 0, 2))


def _forced_inputs(kept: _ChunkInputs, ids: np.ndarray, first: int, steps: int, n_chunks: int, chunk: int) -> dict:
    """The ``forced`` input of the chunk calls that force tokens, by chunk index, int64 [chunk,
    batch] (``-1``: pick); the others take ``kept.no_forcing``.

    The first chunk feeds the prompt tokens the prefill chunks left. The last chunk's steps past
    the request are forced too (token 0; they are not returned): a forced step draws nothing and
    leaves ``done`` as it is, so what those steps would have met (a NaN) is not reported.
    """
    batch, length = ids.shape
    plans = {}
    if length - 1 > first:
        plans[0] = np.full((chunk, batch), -1, np.int64)
        plans[0][: length - 1 - first] = ids[:, first + 1 :].T
    past = n_chunks * chunk - (steps - first)
    if past:
        last = plans.setdefault(n_chunks - 1, np.full((chunk, batch), -1, np.int64))
        last[chunk - past :] = 0
    return {k: kept.write("forced" if k == 0 else "forced_last", plan) for k, plan in plans.items()}


def _finished(done: np.ndarray) -> bool:
    """Whether every row emitted the end token (``done`` holds the pick's flags)."""
    return bool((done & DONE_FINISHED).all())


def _report_nonfinite(done: np.ndarray, sampling: Sampling) -> None:
    """Raise (sampling) or warn (greedy) for the rows whose picks met non-finite logits.

    Parameters
    ----------
    done : int64 [B]
        The last pick's flags (:data:`pbtvm.sampling.DONE_NONFINITE` stays set once set).
    """
    rows = np.flatnonzero(done & DONE_NONFINITE).tolist()
    if not rows:
        return
    cause = "the model's output is not finite there: check its inputs and weights"
    if sampling.temperature > 0:
        raise FloatingPointError(
            f"generate(): cannot sample batch rows {rows}: their logits held NaN, or ±inf as the largest "
            f"value, where the softmax is undefined (torch.multinomial refuses such rows too); {cause}"
        )
    warnings.warn(
        f"generate(): the logits of batch rows {rows} held NaN; greedy decoding picked the first NaN's index "
        f"there, as torch.argmax does; {cause}",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )


def _host(tensor: Any, model: Any) -> np.ndarray:
    """A chunk output as numpy (a zero-copy view on the CPU).

    Right after a chunk call ``Tensor.numpy()`` (allocate and copy) cost 100-160 µs on the
    2-core test machine, the view 5-20 µs.
    """
    return tensor.numpy() if model._on_cuda else np.from_dlpack(tensor)


def _result(prompt: Any, dec: Any, tokens: np.ndarray, logits: np.ndarray | None) -> Any:
    if hasattr(prompt, "detach"):  # torch in, torch out (on the decoder's device)
        import torch

        tokens = torch.from_numpy(np.ascontiguousarray(tokens))
        logits = None if logits is None else torch.from_numpy(np.ascontiguousarray(logits))
        if dec.model._on_cuda:
            device = dec.model.device
            tokens, logits = tokens.to(device), None if logits is None else logits.to(device)
    return tokens if logits is None else (tokens, logits)


def generate_stepwise(
    dec: Any,
    prompt: Any,
    max_new_tokens: int,
    sampling: Any = None,
    *,
    eos_token: int | None = None,
    return_logits: bool = False,
    bitlayers: int | None = None,
) -> Any:
    """The definition of :func:`generate`: the decoder called token by token from Python, each
    token chosen by :func:`pbtvm.sampling.pick_reference` (numpy). Same arguments and results."""
    sampling = _as_sampling(sampling)
    ids = _check_request(dec, prompt, max_new_tokens, eos_token, need_chunk=False)
    batch, length = ids.shape
    eos = -1 if eos_token is None else int(eos_token)
    token, state, done = ids[:, 0], None, np.zeros(batch, np.int64)
    tokens, logits = [], []
    for s in range(length - 1 + int(max_new_tokens)):
        out, state = dec(token, state, bitlayers=bitlayers)
        out = out.cpu().numpy() if hasattr(out, "cpu") else np.asarray(out)
        forced = ids[:, s + 1] if s + 1 < length else None
        token, done = pick_reference(
            out,
            done,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            seed=sampling.seed,
            counter=s - (length - 1),
            eos=eos,
            forced=forced,
        )
        if forced is None:
            tokens.append(token)
            logits.append(out)
            if eos >= 0 and _finished(done):
                break
    _report_nonfinite(done, sampling)
    tok = np.stack(tokens, axis=1)
    n = _trim(tok, eos_token)
    return _result(prompt, dec, tok[:, :n], np.stack(logits, axis=1)[:, :n] if return_logits else None)


__all__ = ["DEFAULT_CHUNK", "GREEDY", "Sampling", "generate", "generate_stepwise"]
