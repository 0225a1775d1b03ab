"""A train run on S3 storage with every logger at DEBUG that crashes mid-training.

    python -m tests.hardening.canary_run STORAGE_BLOCK_NAME CSV

The run loads the saved Torch Storage block (canary credentials), keeps its results
there, logs botocore, s3fs and prefect-torch at DEBUG to stderr and (through
PREFECT_LOGGING_EXTRA_LOGGERS) to the Prefect API, and SIGTERMs itself at the end
of epoch 2, so Prefect records a crash with its traceback.

Prefect answers the SIGTERM by recording the crash and killing the process with the
default handler, which drops the API log worker's unsent batch (up to two seconds of
records). The run therefore sends what it has logged before it signals itself, so
the test reads every DEBUG record the child wrote up to the crash, not a race.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from prefect import flow
from prefect.logging.configuration import setup_logging
from prefect.logging.handlers import APILogWorker

from prefect_torch.blocks import TorchStorage
from prefect_torch.engine.data import LoadSpec
from prefect_torch.engine.loop import Callback, TrainSpec
from prefect_torch.engine.models import ModelSpec
from prefect_torch.engine.optim import OptimizerSpec
from prefect_torch.engine.split import SplitSpec
from prefect_torch.tasks import data_load, data_split, model_define, train
from prefect_torch.tasks._common import persisted_in

DEBUG_LOGGERS = ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3", "prefect", "prefect_torch")


class Terminate(Callback):
    def on_epoch_end(self, trainer, record) -> None:
        if record.epoch == 2:
            sent = APILogWorker.drain_all(timeout=60)  # the callback runs outside any event loop
            assert isinstance(sent, tuple) and not sent[1], "the API log worker did not drain in 60 s"
            os.kill(os.getpid(), signal.SIGTERM)


@flow(name="canary-crash")
def canary_crash(storage: TorchStorage, csv: str):
    load, split, define, fit = persisted_in(storage, data_load, data_split, model_define, train)
    splits = split(load(LoadSpec(uri=csv)), SplitSpec(target="y"))
    handle = define(ModelSpec(hidden=[8]), splits)
    return fit(splits, handle, OptimizerSpec(), TrainSpec(epochs=4, batch_size=16, device="cpu"),
               callbacks=[Terminate()])


if __name__ == "__main__":
    setup_logging()
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(stderr)
    for name in DEBUG_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG)
    canary_crash(TorchStorage.load(sys.argv[1]), sys.argv[2])
