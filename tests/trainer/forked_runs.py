"""Several training scripts from one `accelerate launch` (run by test_multi_process.py): the libraries are imported once
(most of a launch's time on a CPU host), then each script runs in a process forked from the launched one, as fresh as
a launched process (no accelerate, engine or process-group state yet), one after the other, each with a rendezvous of
its own on port `MASTER_PORT + 1 + its index`, hosted by its process 0.

Usage: forked_runs.py [NAME=VALUE ...] SCRIPT [ARGS...] [--next [NAME=VALUE ...] SCRIPT [ARGS...]] ...

`NAME=VALUE` before a script sets an environment variable for that run alone (e.g. `FSDP_STATE_DICT_TYPE=...`, which
accelerate's FSDP plugin reads from the environment the launcher wrote its config into).

A run that fails is named on stderr and the others still run; the launch then exits with status 1. A run still going
after 400 s prints its stacks and fails (a process whose peer failed would wait for it for 30 minutes).
"""

import faulthandler
import os
import runpy
import sys
import traceback

import deepspeed  # noqa: F401  (the libraries every run imports, once)
import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401  (1.8 s of each DeepSpeed engine's start)
import diffusers  # noqa: F401
import peft  # noqa: F401
import torch  # noqa: F401
import transformers  # noqa: F401
import trl  # noqa: F401

import uae_hf.cli  # noqa: F401
import uae_hf.trainer.train_script  # noqa: F401

runs = [[]]
for arg in sys.argv[1:]:
    if arg == "--next":
        runs.append([])
    else:
        runs[-1].append(arg)
failed = []
for index, argv in enumerate(runs):
    pid = os.fork()
    if pid == 0:
        faulthandler.dump_traceback_later(400, exit=True)
        os.environ |= {"MASTER_PORT": str(int(os.environ["MASTER_PORT"]) + 1 + index),
                       "TORCHELASTIC_USE_AGENT_STORE": "False"}  # the launcher's store served the launch itself
        while "=" in argv[0] and not os.path.exists(argv[0]):  # this run's own environment
            name, _, value = argv.pop(0).partition("=")
            os.environ[name] = value
        sys.argv = argv
        status = 0
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as exit:
            status = exit.code if isinstance(exit.code, int) else 1
        except BaseException:
            traceback.print_exc()
            status = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        failed.append(" ".join(argv))
if failed:
    sys.exit(f"process {os.environ['RANK']}: failed runs:\n" + "\n".join(failed))
