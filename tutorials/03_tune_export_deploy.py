"""
03 - Tune, export, deploy and reload
====================================

Search schedules for a model's PrecisionBatching kernels with MetaSchedule, compile from the
tuning log (no search the second time), export a ``.so`` that needs only the TVM runtime, and
load it in a fresh process that never touches the compiler.

Run: ``python tutorials/03_tune_export_deploy.py`` (add ``--quick`` for CI's reduced mode). The
log, the ``.so`` and the test arrays go to a temporary directory removed at the end; pass
``--work-dir DIR`` to keep them. The same steps from the shell::

    pbtvm tune mnist-mlp --bits 4 --work-dir logs --trials 64
    pbtvm compile mnist-mlp --bits 4 --work-dir logs -o mlp.so
    pbtvm inspect logs && pbtvm inspect mlp.so
"""

import argparse
import os
import shutil
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
parser.add_argument("--work-dir", default=None, help="keep the tuning log and the .so here (default: a temporary dir)")
args = parser.parse_args()
trials = args.trials or (2 if args.quick else 32)

model, split = builtin_mnist_mlp()  # the built-in MNIST MLP: trained once, then cached
example = (torch.from_numpy(split.x_train[:1]),)
work = args.work_dir or tempfile.mkdtemp(prefix="pbtvm-tutorial03-")
os.makedirs(work, exist_ok=True)

# %%
# Tune
# ----
# Each distinct PB kernel (here three layers) is tuned. Where the kernel is a MetaSchedule template
# (CUDA, and the popcount kernels of CPUs without AVX2) it becomes one task: pbtvm's design space
# (rows per task / block, unroll depth, loop order, ...) searched by the evolutionary strategy with
# the XGBoost cost model, ``trials`` candidates. On a CPU with AVX2 or AVX-512 VNNI the kernels are
# pbtvm's own vectorized code with a few tile settings ("(avx2)" / "(avx512)" in the table): tuning
# measures those (at most ``trials``, often 3) instead, and ``pbtvm inspect`` lists them under
# "knob search"; the AVX2 table-lookup layout (``lut16x4``) has one setting, nothing to tune. Either
# way the default is measured first and stored too, so the log's best is never slower; and where the
# best is not the default, the two are timed again side by side and the best is kept only if it
# is still at least 3 % faster (one lucky measurement on a busy machine can look like a large gain).
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
print(
    f"compiled from the log in {time.time() - t0:.1f}s; kernels the log decided (its best schedule, or the"
    f" default where the search found nothing faster): {m.manifest['tuning']['tuned_kernels']}"
)
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
print("reloaded:", m.manifest["format"], "kernels the log decided:", len(m.manifest["tuning"]["tuned_kernels"]))
"""
out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True)
print(out.stdout.strip())
got = np.load(os.path.join(work, "y.npy"))
assert np.array_equal(got, expected), "the reloaded module must give bit-identical outputs"
print("reloaded .so gives bit-identical outputs")
if args.work_dir:
    print(f"tuning log, .so and arrays kept in {work}")
else:
    shutil.rmtree(work)
