"""One-call token decoding: equal to the sequence path, export/load, CUDA-graph structure, bad input."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from pbtvm import library
from pbtvm import names as pbtvm_names
from pbtvm.apps.ptb import PBWordLM, word_lm
from pbtvm.decoder import compile_decoder, load_decoder
from pbtvm.lstm import compile_lstm
from pbtvm.repack import CopyGroup, repack_func
from pbtvm.sass import loads_before_wait, reads_before_wait, source_sass

SM90 = {"kind": "cuda", "arch": "sm_90"}


def _lm(vocab=120, hidden=32, layers=2, seed=0):
    torch.manual_seed(seed)
    return word_lm(vocab, hidden, layers, dropout=0.0).eval()


def _decode(dec, inputs, bitlayers=None):
    state, outs = None, []
    for t in range(inputs.shape[0]):
        out, state = dec(inputs[t], state, bitlayers=bitlayers)
        outs.append(out)
    return torch.stack(outs), state


@pytest.mark.parametrize("bits", [1, 4, 8])
def test_decoder_equals_the_sequence_run_token_by_token(bits):
    """Each layer's projection inside its step kernel quantizes x exactly as the projection GEMM."""
    model = _lm()
    dec = compile_decoder(model.lstm, "llvm", bits, embedding=model.embedding, head=model.head, batch=3)
    seq = PBWordLM(model, "llvm", bits)
    tokens = torch.randint(0, 120, (40, 3))
    for layers in sorted({1, bits}):
        want, (wh, wc) = seq(tokens, bitlayers=layers)
        got, (h, c) = _decode(dec, tokens, bitlayers=layers)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(h, wh, atol=1e-5, rtol=0)
        torch.testing.assert_close(c, wc, atol=1e-5, rtol=0)
    if bits == 1:  # one sequence given as [T]: the layout is named, not an IndexError
        with pytest.raises(ValueError, match=r"tokens must be \[T, B\] \(time first\), got shape \(40,\)"):
            seq(tokens[:, 0])


def test_decoder_without_embedding_or_head_and_without_bias():
    torch.manual_seed(1)
    lstm = torch.nn.LSTM(17, 40, num_layers=3, bias=False).eval()
    dec = compile_decoder(lstm, "llvm", 4, batch=2)
    seq = compile_lstm(lstm, "llvm", 4)
    x = torch.randn(12, 2, 17)
    h0, c0 = torch.randn(3, 2, 40) * 0.5, torch.randn(3, 2, 40) * 0.5
    want, (wh, wc) = seq(x, (h0, c0))
    state, outs = (h0, c0), []
    for t in range(12):
        out, state = dec(x[t], state)
        outs.append(out)
    torch.testing.assert_close(torch.stack(outs), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(state[0], wh, atol=1e-5, rtol=0)
    torch.testing.assert_close(state[1], wc, atol=1e-5, rtol=0)
    assert dec.vocab is None and "x input" in repr(dec)


def test_decoder_looks_up_rows_as_an_embedding_with_max_norm_returns_them():
    """``max_norm`` renormalises each row torch looks up (in place): the decoder's table was the
    raw weights (logits 0.08 off at W16A16); it is now the rows as torch returns them, and the
    module's own table is left as it was."""
    torch.manual_seed(2)
    embedding = torch.nn.Embedding(30, 8, max_norm=1.0)
    lstm, head = torch.nn.LSTM(8, 16).eval(), torch.nn.Linear(16, 30)
    before = embedding.weight.detach().clone()
    dec = compile_decoder(lstm, "llvm", 16, 16, embedding=embedding, head=head, generate_chunk=0)
    assert torch.equal(embedding.weight, before)
    tokens = torch.tensor([3, 3, 17, 0, 29])
    state = None
    with torch.no_grad():
        want = head(lstm(embedding(tokens).unsqueeze(1))[0][:, 0])  # [T, vocab]; renorms the rows it reads
    for t in range(len(tokens)):
        out, state = dec(tokens[t : t + 1], state)
        torch.testing.assert_close(out[0], want[t], atol=1e-4, rtol=1e-4)


def test_decoder_computes_a_head_and_embedding_wrapped_by_weight_norm_hooks():
    """A ``weight_norm`` / ``spectral_norm`` hook leaves its last weight on the module, stale once
    ``g`` / ``v`` changed (an optimizer step, a loaded state dict): the decoder read that stale
    head and table (logits 0.2-0.6 off at W16A16, no warning); it computes them as the forward does."""
    import warnings

    torch.manual_seed(3)
    lstm = torch.nn.LSTM(8, 12).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        pairs = [
            (
                torch.nn.utils.weight_norm(torch.nn.Embedding(30, 8)),
                torch.nn.utils.weight_norm(torch.nn.Linear(12, 30)),
            ),
            (
                torch.nn.utils.spectral_norm(torch.nn.Embedding(30, 8)),
                torch.nn.utils.spectral_norm(torch.nn.Linear(12, 30)),
            ),
        ]
    tokens = torch.tensor([1, 7, 29])
    for embedding, head in pairs:
        embedding.eval(), head.eval()
        with torch.no_grad():  # changed after the hooks last ran
            for module in (embedding, head):
                for name, p in module.named_parameters():
                    if name.endswith(("_g", "_orig")):
                        p.mul_(3.0)
                if hasattr(module, "bias") and module.bias is not None:
                    module.bias.add_(0.5)
            want = head(lstm(embedding(tokens).unsqueeze(1))[0][:, 0])  # runs the hooks: fresh weights
        for module in (embedding, head):  # leave stale values where the decoder once read them
            module.weight = module.weight.detach() * 0
        dec = compile_decoder(lstm, "llvm", 16, 16, embedding=embedding, head=head, generate_chunk=0)
        state = None
        for t in range(len(tokens)):
            out, state = dec(tokens[t : t + 1], state)
            torch.testing.assert_close(out[0], want[t], atol=1e-4, rtol=1e-4)


def test_decoder_exports_and_loads(tmp_path, capsys):
    model = _lm(hidden=24, layers=1)
    dec = compile_decoder(model.lstm, "llvm", 3, embedding=model.embedding, head=model.head, batch=1)
    path = tmp_path / "decoder.so"
    dec.export(path)
    again = load_decoder(path)
    tokens = np.array([[5], [7], [119], [0]])
    for t in tokens:
        a, sa = dec(t)
        b, sb = again(t)
        np.testing.assert_array_equal(a, b)
    assert again.model.manifest["decoder"] == dec.model.manifest["decoder"]
    assert again.vocab == 120 and again.num_layers == 1
    from pbtvm.cli import main

    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "decoder  vocab 120, 1x24 LSTM, batch 1, 120 outputs" in out
    assert "PB       head (Linear)  120x24" in out and "weight_hh_l0 (LSTM)  96x24" in out


def test_decoder_rejects_bad_input():
    model = _lm(hidden=16, layers=1)
    dec = compile_decoder(model.lstm, "llvm", 4, embedding=model.embedding, head=model.head, batch=2)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 120\)"):
        dec(torch.tensor([3, 120]))
    with pytest.raises(ValueError, match="token ids"):
        dec(torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="shape"):
        dec(torch.tensor([1, 2, 3]))  # compiled for batch 2
    with pytest.raises(TypeError, match="dtype float32"):
        dec(torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="dtype bool"):
        dec(torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 120\)"):
        dec(np.array([3, 200], np.uint8))
    expected, _ = dec(torch.tensor([1, 2]))
    for ids in (torch.tensor([1, 2], dtype=torch.int32), np.array([1, 2], np.uint8), np.array([1, 2], np.int16)):
        np.testing.assert_array_equal(dec(ids)[0], expected)  # any integer ids, as nn.Embedding takes
    with pytest.raises(ValueError, match="shape"):
        dec(torch.tensor([1, 2]), (torch.zeros(1, 2, 15), torch.zeros(1, 2, 15)))
    with pytest.raises(ValueError, match="bitlayers"):
        dec(torch.tensor([1, 2]), bitlayers=5)
    with pytest.raises(TypeError, match="nn.LSTM"):
        compile_decoder(model.head, "llvm")
    with pytest.raises(ValueError, match="embedding size"):
        compile_decoder(model.lstm, "llvm", embedding=torch.nn.Embedding(10, 8))
    with pytest.raises(ValueError, match="head takes"):
        compile_decoder(model.lstm, "llvm", head=torch.nn.Linear(8, 10))
    with pytest.raises(ValueError, match="batch"):
        compile_decoder(model.lstm, "llvm", batch=0)


def test_repack_moves_groups_in_one_loop():
    from pbtvm._tvm import tvm
    from pbtvm.cuda import build
    from pbtvm.target import resolve_target

    groups = [CopyGroup("int64", ((3,),), ((3,),)), CopyGroup("float32", ((2, 3, 5), (2, 3, 5)), ((3, 5),) * 4)]
    ex = build(repack_func(groups, "llvm"), resolve_target("llvm"))
    h, c = np.arange(30, dtype=np.float32).reshape(2, 3, 5), -np.arange(30, dtype=np.float32).reshape(2, 3, 5)
    ins = [tvm.runtime.tensor(a) for a in (np.array([4, 5, 6]), h, c)]
    outs = [tvm.runtime.tensor(np.zeros(3, np.int64))] + [
        tvm.runtime.tensor(np.zeros((3, 5), np.float32)) for _ in range(4)
    ]
    ex(*ins, *outs)
    assert outs[0].numpy().tolist() == [4, 5, 6]
    for got, want in zip(outs[1:], [h[0], h[1], c[0], c[1]], strict=True):
        np.testing.assert_array_equal(got.numpy(), want)
    with pytest.raises(ValueError, match="moves 6 elements"):
        CopyGroup("float32", ((2, 3),), ((5,),))


def _vm_functions(text: str) -> dict[str, str]:
    """VM bytecode text split into its functions: name -> body."""
    parts = re.split(r"^@([\w.]+):\n", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _kernel_calls(body: str) -> list[str]:
    return [name for name in re.findall(r"call\s+(\S+)", body) if not name.startswith("vm.builtin")]


def test_cuda_decoder_captures_every_step_kernel_in_one_graph(tmp_path):
    """Outside the CUDA graph only the two repacks run; the embedding, layers and head are captured."""
    model = _lm(vocab=1000, hidden=256, layers=2)
    # nvcc runs here; generate()'s chunk functions are checked in test_generate.py
    dec = compile_decoder(model.lstm, SM90, 4, embedding=model.embedding, head=model.head, generate_chunk=0)
    funcs = _vm_functions(dec.model._module.as_text())
    assert _kernel_calls(funcs["main"]) == ["repack_in", "repack_out"]
    assert "vm.builtin.cuda_graph.run_or_capture" in funcs["main"]
    captured = [b for name, b in funcs.items() if name.endswith("cuda_graph_capture")]
    assert len(captured) == 1
    # the embedding lookup, one kernel per layer (both layers share one PrimFunc), the head in one kernel
    assert _kernel_calls(captured[0]) == ["take", "pb_lstm_step_l0", "pb_lstm_step_l0", "pb_dense_head"]
    (src,) = library._cuda_sources(dec.model._module.mod)
    names = re.findall(r'extern "C" __global__ void (?:__launch_bounds__\([\d, ]+\) )?(\w+)\(', src)
    assert sorted(set(names)) == [
        "pb_dense_head_kernel",
        "pb_lstm_step_l0_kernel",
        "repack_in_kernel",
        "repack_out_kernel",
        "take_kernel",
    ]
    assert dec.model.manifest["decoder"]["cuda_graph"] is True
    path = dec.export(tmp_path / "decoder_sm90.so")  # a CUDA library exports without a GPU
    assert library.read_manifest(path)["decoder"]["batch"] == 1
    # programmatic dependent launch (sm_90): the step and the head start while the kernel before
    # them runs (their weights are constants), reading only their weights before they wait; TVM's
    # kernels (take, repacks) start early too and wait first (cuda_pdl.wait_first)
    tags = library.cuda_launch_tags(str(path))
    early = {k for k, v in tags.items() if pbtvm_names.LAUNCH_PROGRAMMATIC in v}
    assert early == set(names)
    reads = reads_before_wait(src)
    assert reads["pb_lstm_step_l0_kernel"] == {"wp_ih_ptr", "wp_hh_ptr"}
    assert reads["pb_dense_head_kernel"] == {"wp_ptr"}
    assert all(reads[k] == set() for k in ("repack_in_kernel", "repack_out_kernel", "take_kernel"))
    sass = source_sass(src, "sm_90")  # and ptxas moved no load above the wait (x and h did, with __restrict__)
    assert all(loads_before_wait(sass[k]) == [] and "LDG.E.CONSTANT" not in sass[k] for k in early)  # coherent


def test_cuda_decoder_without_graph_calls_kernels_from_main():
    model = _lm(hidden=64, layers=1)
    dec = compile_decoder(model.lstm, SM90, 4, embedding=model.embedding, head=model.head, cuda_graph=False)
    funcs = _vm_functions(dec.model._module.as_text())
    assert "cuda_graph" not in funcs["main"]
    assert "pb_lstm_step_l0" in _kernel_calls(funcs["main"])


@pytest.mark.gpu
def test_cuda_decoder_matches_cpu_decoder_over_many_tokens_and_bitlayers():
    """Captured once per bitlayers value, replayed: results equal the CPU decoder's."""
    model = _lm(vocab=500, hidden=256, layers=2)
    cpu = compile_decoder(model.lstm, "llvm", 4, embedding=model.embedding, head=model.head, batch=2)
    gpu = compile_decoder(model.lstm, "cuda", 4, embedding=model.embedding, head=model.head, batch=2)
    tokens = torch.randint(0, 500, (60, 2))
    for layers in (4, 2, 4):  # switching back replays the first graph
        want, (wh, wc) = _decode(cpu, tokens, layers)
        got, (h, c) = _decode(gpu, tokens.cuda(), layers)
        assert got.is_cuda
        torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(h.cpu(), wh, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(c.cpu(), wc, atol=1e-4, rtol=1e-4)


def test_cpu_decoder_layer_kernels_follow_the_gemm_choice(monkeypatch):
    """One step kernel per layer: the AVX-512 step on AVX-512 CPUs, else the popcount one."""
    from pbtvm.ops.pb_vnni import target_supports
    from pbtvm.target import resolve_target

    model = _lm(hidden=32, layers=1)
    if target_supports(resolve_target("llvm")):
        dec = compile_decoder(model.lstm, "llvm", 4, embedding=model.embedding, head=model.head)
        calls = _kernel_calls(_vm_functions(dec.model._module.as_text())["main"])
        assert [c for c in calls if "lstm" in c] == ["pb_lstm_step_l0"]
        assert "vpdpbusd" in _asm_of(dec, "pb_lstm_step_l0")
    monkeypatch.setenv("PBTVM_CPU_KERNEL", "popcount")
    dec = compile_decoder(model.lstm, "llvm", 4, embedding=model.embedding, head=model.head)
    calls = _kernel_calls(_vm_functions(dec.model._module.as_text())["main"])
    assert [c for c in calls if "lstm" in c] == ["pb_lstm_step_l0"]
    assert "vpdpbusd" not in _asm_of(dec, "pb_lstm_step_l0")


def _asm_of(dec, name: str) -> str:
    """The x86 assembly of one kernel of a CPU decoder (its compute function)."""
    (llvm,) = dec.model._module.mod.imports
    asm = str(llvm.inspect_source("asm"))
    start = asm.index(f"{name}_compute_:")
    return asm[start : asm.index(".Lfunc_end", start)]
