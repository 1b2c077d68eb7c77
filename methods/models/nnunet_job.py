"""One nnU-Net training in its own process: ``python methods/models/nnunet_job.py JOB.json`` (it imports nothing of
ours).

nnunetv2 reads ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` when it is imported, so a cell sets
them in this process's environment alone (``methods.models.nnunet``), never in its own. The steps are nnU-Net's:
``nnUNetv2_plan_and_preprocess -c 2d`` (fingerprint, ``ExperimentPlanner``, preprocessing), then the trainer
``nnUNetv2_train`` makes (``get_trainer_from_args``) and its ``run_training``, without the validation export that
follows it there (it predicts the fold's validation cases).
The trained network's weights go to ``out/weights.safetensors``, the plans and what prediction needs to
``out/fit.json``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import sys
from multiprocessing.pool import ThreadPool
from pathlib import Path


class ThreadPools:
    """``multiprocessing`` as nnU-Net's fingerprint and preprocessing modules call it, its pools of one process made
    pools of one thread: that process would import torch and nnunetv2 again (seconds) to read a few images; the
    work per image is nnU-Net's own."""

    def get_context(self, _method: str | None = None) -> ThreadPools:
        return self

    def Pool(self, processes: int | None = None) -> ThreadPool:
        return ThreadPool(processes)

    def __getattr__(self, name: str):
        return getattr(multiprocessing, name)


def main(job_file: str) -> None:
    if sys.platform == "linux":  # PR_SET_PDEATHSIG: killed with the cell's process, never left training alone
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    job = json.loads(Path(job_file).read_text())
    import numpy as np
    import torch
    from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
        preprocess_dataset,
    )
    from nnunetv2.preprocessing.preprocessors import default_preprocessor
    from nnunetv2.run.run_training import get_trainer_from_args
    from safetensors.torch import save_file

    torch.set_num_threads(job["threads"])
    random.seed(job["seed"])
    np.random.seed(job["seed"])
    torch.manual_seed(job["seed"])
    dataset, processes = job["dataset_id"], job["processes"]
    if processes == 1:
        fingerprint_extractor.multiprocessing = default_preprocessor.multiprocessing = ThreadPools()

    class Fingerprint(DatasetFingerprintExtractor):
        """nnU-Net's fingerprint, sampling ``intensity_samples`` foreground pixels in all (its default: 1e8)."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.num_foreground_voxels_for_intensitystats = float(job["intensity_samples"])

    extract_fingerprint_dataset(dataset, Fingerprint, processes, check_dataset_integrity=True, clean=True,
                                verbose=False)  # fmt: skip
    _, plans_name = plan_experiment_dataset(dataset, ExperimentPlanner)
    preprocess_dataset(dataset, plans_name, configurations=("2d",), num_processes=[processes], verbose=False)

    if job["augmentation_processes"] is None:
        os.environ.pop("nnUNet_n_proc_DA")  # nnU-Net's own number of workers
    else:
        os.environ["nnUNet_n_proc_DA"] = str(job["augmentation_processes"])  # noqa: SIM112 0: in this process
    trainer = get_trainer_from_args(str(dataset), "2d", job["fold"] if job["fold"] == "all" else int(job["fold"]),
                                    job["trainer"], plans_name, device=torch.device(job["device"]))  # fmt: skip
    for attribute, key in (("num_epochs", "epochs"), ("num_iterations_per_epoch", "iterations_per_epoch"),
                           ("num_val_iterations_per_epoch", "val_iterations")):  # fmt: skip
        if job[key] is not None:
            setattr(trainer, attribute, job[key])
    trainer.logger.plot_progress_png = lambda _folder: None  # a figure an epoch (seconds), of no use here
    trainer.save_checkpoint = lambda _filename: None  # its checkpoints (optimiser state too): weights kept below
    trainer.run_training()

    out = Path(job["work"]) / "out"
    out.mkdir(exist_ok=True)
    network = trainer.network._orig_mod if hasattr(trainer.network, "_orig_mod") else trainer.network
    weights = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}  # tied tensors apart
    save_file(weights, out / "weights.safetensors")
    fit = {
        "plans": trainer.plans_manager.plans,
        "dataset_json": trainer.dataset_json,
        "mirror_axes": list(trainer.inference_allowed_mirroring_axes or ()),
        "train_losses": [float(v) for v in trainer.logger.get_value("train_losses", None)],
    }
    (out / "fit.json").write_text(json.dumps(fit))
    sys.stdout.flush()
    os._exit(0)  # the interpreter's teardown of torch and nnunetv2 takes seconds and writes nothing


if __name__ == "__main__":
    main(sys.argv[1])
