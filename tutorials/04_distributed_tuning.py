"""
04 - Distributed tuning over TVM RPC
====================================

MetaSchedule can measure candidates on remote devices: a TVM RPC *tracker* hands out
*servers* registered under a device key, and every free server measures one candidate at a
time. With many GPUs, run on each machine::

    python -m tvm.exec.rpc_server --tracker TRACKER_HOST:9190 --key h100

and tune from anywhere with ``pbtvm tune MODEL --rpc TRACKER_HOST:9190 --key h100 --work-dir logs``.
This tutorial starts a tracker and two servers on this machine (CPU target) so it runs anywhere.

Run: ``python tutorials/04_distributed_tuning.py`` (add ``--quick`` for CI's reduced mode). The
tuning log and the servers' logs go to a temporary directory removed at the end; pass
``--work-dir DIR`` to keep them.
"""

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

import pbtvm
from pbtvm.apps.examples import mnist_split, train_mnist_mlp
from pbtvm.rpc_cluster import local_cluster
from pbtvm.schedules.tuning import rpc_runner

parser = argparse.ArgumentParser()
parser.add_argument("--quick", action="store_true")
parser.add_argument("--work-dir", default=None, help="keep the logs here (default: a temporary dir)")
args = parser.parse_args()

split = mnist_split(seed=0)
model = train_mnist_mlp(split, epochs=1 if args.quick else 4, hidden=(256,))
example = (torch.from_numpy(split.x_train[:1]),)
work = Path(args.work_dir or tempfile.mkdtemp(prefix="pbtvm-tutorial04-"))

with local_cluster("pbtvm-cpu", servers=2, log_dir=work / "rpc") as (address, server_logs):
    print(f"tracker at {address}, 2 servers registered with key 'pbtvm-cpu'")
    # %%
    # The runner checks the tracker and counts the servers; one measurement worker per server.
    runner = rpc_runner(address, "pbtvm-cpu")
    report = pbtvm.tune(
        model, example, "llvm", bits=4, work_dir=work / "logs", trials=2 if args.quick else 16, runner=runner
    )
    print(report.table())
    for log in server_logs:
        print(f"{log.name}: measured {log.read_text().count('load_module')} candidate(s)")

# %%
# The log is an ordinary tuning log: a plain compile uses it, no RPC needed.
m = pbtvm.compile(model, example, "llvm", bits=4, work_dir=work / "logs")
print("kernels scheduled from the RPC-tuned log:", m.manifest["tuning"]["tuned_kernels"])
if args.work_dir:
    print(f"tuning and server logs kept in {work}")
else:
    shutil.rmtree(work)
