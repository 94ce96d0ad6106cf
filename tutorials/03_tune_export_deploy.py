"""
03 - Tune, export, deploy and reload
====================================

Search schedules for a model's PrecisionBatching kernels with MetaSchedule, compile from the
tuning log (no search the second time), export a ``.so`` that needs only the TVM runtime, and
load it in a fresh process that never touches the compiler.

Run: ``python tutorials/03_tune_export_deploy.py`` (add ``--quick`` for CI's reduced mode).
The same steps from the shell::

    pbtvm tune mnist-mlp --bits 4 --work-dir logs --trials 64
    pbtvm compile mnist-mlp --bits 4 --work-dir logs -o mlp.so
    pbtvm inspect logs && pbtvm inspect mlp.so
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import pbtvm
from pbtvm.apps.examples import accuracy, builtin_mnist_mlp

parser = argparse.ArgumentParser()
parser.add_argument("--quick", action="store_true")
parser.add_argument("--target", default="llvm")
parser.add_argument("--trials", type=int, default=None, help="candidates per kernel (default 32, quick 2)")
args = parser.parse_args()
trials = args.trials or (2 if args.quick else 32)

model, split = builtin_mnist_mlp()  # the built-in MNIST MLP: trained once, then cached
example = (torch.from_numpy(split.x_train[:1]),)
work = tempfile.mkdtemp(prefix="pbtvm-tutorial03-")

# %%
# Tune
# ----
# Each distinct PB kernel (here three layers) becomes one MetaSchedule task. The design space is
# pbtvm's own template (rows per task / block, unroll depth, loop order, ...), searched by the
# evolutionary strategy with the XGBoost cost model. The default schedule is measured first and
# stored too, so the log's best is never slower than the default.
t0 = time.time()
report = pbtvm.tune(model, example, target=args.target, bits=4, work_dir=work, trials=trials)
print(report.table())

# %%
# Compile from the log
# --------------------
# With ``work_dir`` and without ``tune=True`` nothing is searched; the recorded traces are
# replayed onto the kernels (which keep a dynamic batch and the run-time bitlayers knob).
t0 = time.time()
m = pbtvm.compile(model, example, target=args.target, bits=4, work_dir=work)
print(f"compiled from the log in {time.time() - t0:.1f}s; tuned kernels: {m.manifest['tuning']['tuned_kernels']}")
print(f"W4A8 accuracy: {accuracy(m, split.x_test, split.y_test):.1f}%")

# %%
# Export and reload in a fresh process
# ------------------------------------
so = os.path.join(work, "mlp_w4.so")
m.export(so)
x = split.x_test[:16]
np.save(os.path.join(work, "x.npy"), x)
expected = m(x)
child = f"""
import numpy as np, pbtvm
m = pbtvm.load({so!r})
np.save({os.path.join(work, "y.npy")!r}, m(np.load({os.path.join(work, "x.npy")!r})))
print("reloaded:", m.manifest["format"], "tuned:", len(m.manifest["tuning"]["tuned_kernels"]))
"""
out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True)
print(out.stdout.strip())
got = np.load(os.path.join(work, "y.npy"))
assert np.array_equal(got, expected), "the reloaded module must give bit-identical outputs"
print("reloaded .so gives bit-identical outputs")
