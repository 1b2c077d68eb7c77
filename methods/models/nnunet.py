"""nnU-Net through ``nnunetv2`` (2.7; Isensee et al., "nnU-Net: a self-configuring method for deep
learning-based biomedical image segmentation", Nature Methods 2021).

- Data: the cell's training images and masks at the cell's image size, written as nnU-Net's raw 2-D dataset in a
  scratch folder of the cell (``imagesTr/case_NNNN_0000.png``, one RGB PNG an image as its ``NaturalImage2DIO``
  reads them, channels named R, G, B, so z-score normalised each; ``labelsTr/case_NNNN.png`` 0/1; ``dataset.json``
  with the label ``lesion``). The test images never enter nnU-Net's folders: prediction runs in this process on the
  images of each test batch.
- Planning, preprocessing and training: nnU-Net's own, in a child process whose environment alone names the
  cell's ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` (``methods.models.nnunet_job``); the 2d
  configuration of ``nnUNetPlans``; the trainer class and its epochs and iterations as parameters (defaults:
  ``nnUNetTrainer``'s 1000 epochs of 250 iterations); ``fold: all`` trains on every training image, the single
  model nnU-Net's documentation describes for a final model (folds 0-4: its 5-fold split of the training images).
- Departures: the fingerprint samples ``intensity_samples`` foreground pixels (its default 1e8 takes minutes and
  gigabytes on a few images); those statistics serve only its CT normalisation, never used for R, G, B channels,
  so the configuration planned (patch, network, normalisation) is the same, only the statistics stored differ. On
  the CPU augmentation runs in the trainer's process (``nnUNet_n_proc_DA=0``; nnU-Net leaves its augmentation
  workers unseeded): the fit is then reproducible given the seed; on a GPU nnU-Net's own workers (its speed).
  Its per-epoch progress figure and its checkpoints are not written (the cell keeps the weights itself); with
  one process, its fingerprint and preprocessing pools are thread pools (``methods.models.nnunet_job``).
- Precision: on CUDA nnU-Net's trainer and predictor autocast to fp16 (its code, whatever a protocol says): the
  method's reference precision there; fp32 on the CPU.
- Prediction: ``nnUNetPredictor`` (sliding window, Gaussian weighting, test-time mirroring as its defaults) on
  the network rebuilt from the plans by the trainer class; the map is the softmax's lesion channel, the image
  score its maximum.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmark.data.loading import ImageBatch
from benchmark.errors import BenchmarkError
from benchmark.method import MethodContext, Prediction, TrainSet
from methods.nnunet import NnUNet, NnUNetParams

DATASET_ID = 1  # each cell has its own nnU-Net folders: one dataset in each


def quiet():
    """nnunetv2's modules imported without its warnings about the folder variables, printed on import: this process
    sets none (its child process does) and needs none to predict."""
    return contextlib.redirect_stdout(io.StringIO())


def nnunet_package():
    """nnunetv2, or a one-line error naming the extra that installs it."""
    try:
        with quiet():
            import nnunetv2
    except ImportError:
        raise BenchmarkError(NnUNet.missing_extra()) from None
    return nnunetv2


def trainer_class(name: str) -> type:
    """The trainer class of nnunetv2 named ``name``, found where its own ``nnUNetv2_train`` looks."""
    package = nnunet_package()
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    root = Path(package.__path__[0]) / "training" / "nnUNetTrainer"
    with quiet():
        found = recursive_find_python_class(str(root), name, "nnunetv2.training.nnUNetTrainer")
    if found is None:
        raise BenchmarkError(f"nnunet: trainer: no trainer class '{name}' in nnunetv2.training.nnUNetTrainer")
    return found


def as_png_values(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as the 8-bit values a PNG holds: what nnU-Net reads, the training images and the test ones
    alike."""
    return (images * 255).round().clamp(0, 255).to(torch.uint8)


def write_raw_dataset(train: TrainSet, folder: Path) -> None:
    """The training images and masks as nnU-Net's raw 2-D dataset (see the module docstring)."""
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    index = 0
    for batch in train.batches(16):
        images = as_png_values(batch.images).permute(0, 2, 3, 1).numpy()
        for image, mask in zip(images, batch.masks.numpy(), strict=True):
            Image.fromarray(image).save(folder / "imagesTr" / f"case_{index:04d}_0000.png")
            Image.fromarray(mask.astype(np.uint8)).save(folder / "labelsTr" / f"case_{index:04d}.png")
            index += 1
    dataset = {
        "channel_names": {"0": "R", "1": "G", "2": "B"},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": index,
        "file_ending": ".png",
        "overwrite_image_reader_writer": "NaturalImage2DIO",
        # its files listed, which nnU-Net reads instead of listing imagesTr with a pool of 12 processes each time
        "dataset": {
            f"case_{i:04d}": {"images": [f"imagesTr/case_{i:04d}_0000.png"], "label": f"labelsTr/case_{i:04d}.png"}
            for i in range(index)
        },
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=1))


class NnUNetImpl(NnUNet):
    def __init__(self, params: NnUNetParams, context: MethodContext) -> None:
        super().__init__(params, context)
        nnunet_package()
        self.weights: dict[str, torch.Tensor] = {}
        self.plans: dict = {}
        self.dataset_json: dict = {}
        self.mirror_axes: list[int] = []
        self.history: list[float] = []
        self._predictor = None

    def fit(self, train: TrainSet) -> None:
        p = self.params
        with tempfile.TemporaryDirectory(prefix="nnunet-") as scratch:
            work = Path(scratch)
            folders = {f"nnUNet_{k}": work / k for k in ("raw", "preprocessed", "results")}
            write_raw_dataset(train, folders["nnUNet_raw"] / f"Dataset{DATASET_ID:03d}_cell")
            threads = torch.get_num_threads()
            device = self.context.device
            augmentation = p.augmentation_processes
            if augmentation is None and device.type == "cpu":
                augmentation = 0
            job = {
                "dataset_id": DATASET_ID, "trainer": p.trainer, "fold": p.fold, "epochs": p.epochs,
                "iterations_per_epoch": p.iterations_per_epoch, "val_iterations": p.val_iterations,
                "intensity_samples": p.intensity_samples, "seed": self.context.seed, "threads": threads,
                "processes": threads, "augmentation_processes": augmentation, "device": device.type, "work": str(work),
            }  # fmt: skip
            (work / "job.json").write_text(json.dumps(job))
            env = {**os.environ, **{k: str(v) for k, v in folders.items()}, "nnUNet_n_proc_DA": str(threads),
                   "nnUNet_def_n_proc": str(threads), "nnUNet_compile": "f",
                   "OMP_NUM_THREADS": str(threads)}  # fmt: skip
            # nnUNet_n_proc_DA at least 1 while planning (its planner sets torch's threads to it); the child then sets
            # the augmentation processes; it trains on cuda:0, so the cell's GPU is the one it sees
            if device.type == "cuda":
                visible = os.environ.get("CUDA_VISIBLE_DEVICES")
                index = device.index or 0
                env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[index] if visible else str(index)
            log = work / "log.txt"
            with log.open("w") as out:
                # -P: its folder (methods/models) is not put on the module path, whose modules would shadow others
                command = [sys.executable, "-P", str(Path(__file__).with_name("nnunet_job.py")), str(work / "job.json")]
                done = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=work)
            if done.returncode != 0:
                last = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise BenchmarkError(f"nnunet: nnU-Net's training failed (exit status {done.returncode}): {last[0]}")
            from safetensors.torch import load_file

            self.weights = load_file(work / "out" / "weights.safetensors")
            fit = json.loads((work / "out" / "fit.json").read_text())
        self.plans, self.dataset_json, self.mirror_axes = fit["plans"], fit["dataset_json"], fit["mirror_axes"]
        self.history = fit["train_losses"]
        self._predictor = None

    def predictor(self):
        """nnU-Net's predictor on the trained network (built once, after ``fit`` or a stored fit)."""
        if self._predictor is None:
            trainer = trainer_class(self.params.trainer)
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
            from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
            from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

            plans = PlansManager(self.plans)
            configuration = plans.get_configuration("2d")
            heads = plans.get_label_manager(self.dataset_json).num_segmentation_heads
            channels = determine_num_input_channels(plans, configuration, self.dataset_json)
            network = trainer.build_network_architecture(
                plans, configuration, channels, heads, enable_deep_supervision=False
            )
            device = self.context.device
            benchmark = torch.backends.cudnn.benchmark  # its constructor turns it on for the whole process
            predictor = nnUNetPredictor(use_mirroring=self.params.mirroring, perform_everything_on_device=device.type
                                        == "cuda", device=device, verbose=False, allow_tqdm=False)  # fmt: skip
            torch.backends.cudnn.benchmark = benchmark
            weights = {k: v.cpu() for k, v in self.weights.items()}
            predictor.manual_initialization(network, plans, configuration, [weights], self.dataset_json,
                                            self.params.trainer, tuple(self.mirror_axes))  # fmt: skip
            self._predictor = predictor
        return self._predictor

    @torch.no_grad()
    def predict(self, batch: ImageBatch) -> Prediction:
        predictor = self.predictor()
        # as NaturalImage2DIO reads a PNG: [C, 1, H, W] float32 of 0..255, spacing (999, 1, 1)
        images = as_png_values(batch.images).unsqueeze(2).float().numpy()
        maps = []
        for image in images:
            _, probabilities = predictor.predict_single_npy_array(image, {"spacing": [999.0, 1.0, 1.0]}, None, None,
                                                                  True)  # fmt: skip
            maps.append(torch.as_tensor(np.asarray(probabilities[1, 0], dtype=np.float32)))
        probability = torch.stack(maps).to(self.context.device)
        return Prediction(probability.flatten(1).amax(-1), probability)

    def effective_params(self) -> dict[str, object]:
        return super().effective_params() | {"epochs": self.params.epochs or len(self.history)}

    def describe(self) -> dict[str, object]:
        return {
            "trainable_params": sum(
                v.numel()
                for k, v in self.weights.items()
                if not k.endswith(("running_mean", "running_var", "_tracked"))
            ),
            "patch_size": self.plans.get("configurations", {}).get("2d", {}).get("patch_size"),
            "final_train_loss": round(self.history[-1], 6) if self.history else float("nan"),
        }
