"""The bridge that runs an anomalib model as a MedAD-Bench method (declarations: ``methods/anomalib_models.py``).

- Model: the anomalib class, built with the protocol's parameters, the harness's backbone (``pre_trained``
  false for ``random-init``; pretrained weights only from the local timm/Hugging Face cache, checked before
  the grid starts), and none of anomalib's pre-processing, post-processing, metrics or visualisation: the
  harness resizes the images (to the cell's size) and normalises them with ImageNet's mean and std, as
  anomalib's default pre-processor does.
- Training: anomalib's own machinery, a Lightning ``Trainer`` running the model's training step, optimisers
  and memory-bank fit (PatchCore's coreset, PaDiM's Gaussians) for ``epochs`` passes over the normal
  training images (shuffled with the cell's seed); no validation, logger or checkpoints. The coreset's greedy
  steps reuse buffers (``_buffered_k_center_greedy``, anomalib's picks).
- Scores: the model's raw ``anomaly_map`` and ``pred_score`` in eval mode. anomalib's default post-processor
  normalises them with statistics of a validation split; here the statistics come from the training images
  only, so no test image ever shapes a score: ``x = (raw - lo) / (hi - lo)`` with the training images'
  minimum and maximum (maps and image scores apart), mapped by ``y = log(1 + max(x, 0))`` to
  ``y / (y + log 2)``. So 0.5 is the largest value seen on normal training images, the order of test values
  is kept (AUROCs are the raw model's), and maps and scores lie in [0, 1). For memory-bank models the
  training images are in the bank, so their maximum understates normal variation; thresholds above 0.5 suit
  them better.
"""

from __future__ import annotations

import functools
import math
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD

from benchmark.data.loading import ImageBatch, iterate_batches, load_sample
from benchmark.errors import BenchmarkError
from benchmark.method import Prediction, TrainSet
from methods.anomalib_models import ANOMALIB_DEFAULT, AnomalibMethod, anomalib_models, anomalib_name


def build_model(cls: type[AnomalibMethod], params, context) -> torch.nn.Module:
    """The anomalib module with the protocol's parameters and the harness's backbone."""
    import dataclasses
    import os

    models = anomalib_models()
    given = {k: v for k, v in dataclasses.asdict(params).items() if k in cls.constructor and v != ANOMALIB_DEFAULT}
    kwargs = {anomalib_name(k): list(v) if isinstance(v, tuple) else v for k, v in given.items()}
    spec = context.backbone
    if _accepts(models, cls, "backbone"):
        kwargs["backbone"] = spec.model
    if _accepts(models, cls, "pre_trained"):  # models without it always load their pretrained backbone
        kwargs["pre_trained"] = not spec.random_init
    for off in ("post_processor", "evaluator", "visualizer"):
        if _accepts(models, cls, off):
            kwargs[off] = False
    if _accepts(models, cls, "pre_processor"):
        # only to tell the model its input size (Reverse Distillation builds its decoder from it); the
        # bridge calls the torch model and training step directly, which never apply it
        from anomalib.pre_processing import PreProcessor
        from torchvision.transforms.v2 import Resize

        kwargs["pre_processor"] = PreProcessor(transform=Resize((context.image_size, context.image_size)))
    torch.manual_seed(spec.seed if spec.random_init else context.seed)
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # weights come from the local cache or not at all
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return getattr(models, cls.model_class)(**kwargs)
    except Exception as exc:
        raise BenchmarkError(f"{cls.name}: the model cannot be built ({str(exc).splitlines()[0][:300]})") from None
    finally:
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


def _accepts(models, cls: type[AnomalibMethod], name: str) -> bool:
    import inspect

    return name in inspect.signature(getattr(models, cls.model_class).__init__).parameters


def normalise_input(images: torch.Tensor) -> torch.Tensor:
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


class _Normal(torch.utils.data.Dataset):
    """The normal training images, loaded and resized by the harness, normalised as anomalib's models expect."""

    def __init__(self, samples, size: int, resize: str = "bicubic") -> None:
        self.samples, self.size, self.resize = samples, size, resize

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> torch.Tensor:
        return normalise_input(load_sample(self.samples[i], self.size, self.resize)[0].unsqueeze(0))[0]


def _collate(images: list[torch.Tensor]):
    from anomalib.data import ImageBatch as AnomalibBatch

    return AnomalibBatch(image=torch.stack(images))


def _loss_history(history: list[float]):
    """A Lightning callback appending each epoch's mean training loss to ``history`` (for MLflow's curve)."""
    import lightning

    class LossHistory(lightning.Callback):
        def __init__(self) -> None:
            self.total, self.count = 0.0, 0

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if isinstance(loss, torch.Tensor):
                self.total, self.count = self.total + float(loss.detach()), self.count + 1

        def on_train_epoch_end(self, trainer, module) -> None:
            if self.count:
                history.append(self.total / self.count)
            self.total, self.count = 0.0, 0

    return LossHistory()


@functools.cache
def _buffered_k_center_greedy() -> type:
    """anomalib's ``KCenterGreedy`` with the same picks, its per-step distances written into buffers made once.

    anomalib's loop allocates a temporary the size of the projected bank at every step (16,384 x 239 floats,
    16 MB, for 16 images at 256 px); glibc serves these from its heap once an earlier free has raised its
    mmap threshold, and the small tensors kept between steps fragment it: resident memory grew by about
    11 MB a step (past 19 GB) although every tensor was freed. Nothing here needs autograd either."""
    from anomalib.models.components import KCenterGreedy

    class BufferedKCenterGreedy(KCenterGreedy):
        @torch.no_grad()
        def select_coreset_idxs(self) -> list[int]:
            return super().select_coreset_idxs()

        def update_distances(self, cluster_center: int | torch.Tensor | None) -> None:
            if cluster_center is None:
                return
            center = self.features[cluster_center].squeeze()
            if self.min_distances is None:  # the first step of a selection: the buffers
                self.difference = torch.empty_like(self.features)
                self.distances = self.features.new_empty(len(self.features), 1)
                self.min_distances = self.features.new_full((len(self.features), 1), math.inf)
            torch.sub(self.features, center, out=self.difference)
            torch.linalg.vector_norm(self.difference, dim=1, keepdim=True, out=self.distances)
            torch.minimum(self.min_distances, self.distances, out=self.min_distances)

    return BufferedKCenterGreedy


@contextmanager
def _buffered_coreset(module: torch.nn.Module) -> Iterator[None]:
    """While it lasts, the model's torch module (PatchCore's, AnomalyDINO's) samples its coreset with
    ``_buffered_k_center_greedy``, without the sampler's own progress bar (a benchmark's output carries its
    own lines only); other models are left as they are."""
    home = sys.modules[type(getattr(module, "model", module)).__module__]
    original = getattr(home, "KCenterGreedy", None)
    if original is None:
        yield
        return
    sampling = sys.modules[original.__module__]
    bar = sampling.tqdm
    home.KCenterGreedy = _buffered_k_center_greedy()
    sampling.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        home.KCenterGreedy, sampling.tqdm = original, bar


def _quiet_lightning() -> None:
    """Lightning's info lines (devices, its "💡 Tip" advertisements) off: ``lightning.pytorch``'s loggers log
    them at INFO, and their level is the switch Lightning documents."""
    import logging

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


class AnomalibImpl(AnomalibMethod):
    """Fits and predicts an anomalib model under the harness's contract."""

    def __init__(self, params, context) -> None:
        super().__init__(params, context)
        self.module = build_model(type(self), params, context).to(context.device)
        self.calibration: dict[str, tuple[float, float]] = {}
        self.history: list[float] = []

    def fit(self, train: TrainSet) -> None:
        """anomalib's own machinery: a Lightning ``Trainer`` runs the model's training step, optimisers,
        schedules and memory-bank fit for ``epochs`` over the normal training images; no validation, logging
        or checkpoints (the harness records)."""
        import lightning

        p, device = self.params, self.context.device
        normal = train.normal
        if not normal:
            raise BenchmarkError(f"{self.name}: no normal training image in this setting (anomalib is one-class)")
        generator = torch.Generator().manual_seed(self.context.seed)
        loader = torch.utils.data.DataLoader(
            _Normal(normal, train.image_size, train.loader.resize if train.loader else "bicubic"),
            batch_size=p.batch_size, shuffle=True, generator=generator,
            collate_fn=_collate,
        )  # fmt: skip
        _quiet_lightning()  # before the Trainer, whose constructor logs its tips and device lines
        trainer = lightning.Trainer(
            max_epochs=p.epochs, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=None, callbacks=[_loss_history(self.history)],
        )  # fmt: skip
        lightning.seed_everything(self.context.seed, verbose=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with _buffered_coreset(self.module):
                trainer.fit(self.module, train_dataloaders=loader)
                if hasattr(self.module, "_is_fitted") and not bool(self.module._is_fitted):
                    self.module.fit()  # a memory bank Lightning did not fit (no epoch end)
        self.module.to(device).eval()
        maps, scores = [], []
        for batch in iterate_batches(normal, train.image_size, p.batch_size, train.loader):
            raw_scores, raw_maps = self.raw(batch.images.to(device))
            maps.append(raw_maps.reshape(-1))
            scores.append(raw_scores)
        maps_all, scores_all = torch.cat(maps), torch.cat(scores)
        self.calibration = {
            "map": (float(maps_all.min()), float(maps_all.max())),
            "score": (float(scores_all.min()), float(scores_all.max())),
        }

    @torch.no_grad()
    def raw(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's own image scores ``[B]`` and anomaly maps ``[B,S,S]`` (eval mode), before our mapping."""
        self.module.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.module.model(normalise_input(images))
        amap = out.anomaly_map
        amap = amap if amap.dim() == 4 else amap.unsqueeze(1)
        size = images.shape[-1]
        if amap.shape[-1] != size:
            amap = F.interpolate(amap.float(), size=(size, size), mode="bilinear", align_corners=False)
        return out.pred_score.reshape(-1).float(), amap[:, 0].float()

    @staticmethod
    def _map(raw: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        """``y = log(1 + max(x, 0))``, ``y / (y + log 2)``: 0.5 at the training maximum (x = 1), monotone, and
        far values kept apart in float32 (``x / (1 + x)`` rounds every x above 1e7 to 1)."""
        x = ((raw.double() - lo) / max(hi - lo, 1e-12)).clamp(min=0)
        y = torch.log1p(x)
        return (y / (y + math.log(2.0))).float()

    def predict(self, batch: ImageBatch) -> Prediction:
        scores, maps = self.raw(batch.images.to(self.context.device))
        return Prediction(self._map(scores, *self.calibration["score"]), self._map(maps, *self.calibration["map"]))

    def describe(self) -> dict[str, object]:
        # a model without an optimiser (a memory bank: PatchCore, PaDiM) trains nothing
        trains = self.module.configure_optimizers() is not None
        return {
            "trainable_params": sum(q.numel() for q in self.module.parameters() if q.requires_grad) if trains else 0,
            "variant": self.published_name or self.model_class,
            "anomalib_model": self.model_class,
            "calibration_map": ",".join(f"{v:.6g}" for v in self.calibration.get("map", ())),
            "calibration_score": ",".join(f"{v:.6g}" for v in self.calibration.get("score", ())),
        }
