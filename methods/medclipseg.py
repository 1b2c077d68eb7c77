"""MedCLIPSeg: probabilistic vision-language adaptation for data-efficient and generalizable medical image
segmentation (Koleilat et al., CVPR 2026; official code HealthX-Lab/MedCLIPSeg).

The plugin's declaration: its parameters (validated on load), settings and defaults, importable without torch.
The maths, the training and the notes on fidelity to the official code: ``methods/models/medclipseg.py``.

Its four backbone variants (its ``MODEL.CLIP_MODEL``), each on the backbone its code loads when the protocol
names none: ``unimedclip`` (every config's, and the published numbers'), ``biomedclip``, ``pubmedclip`` and
``clip``. Defaults reproduce its published recipe; each has a clean alternative (README, fidelity table).
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmark.method import METHODS, Method, Released, param
from benchmark.protocol import BackboneSpec

VARIANTS = ("unimedclip", "biomedclip", "pubmedclip", "clip")
VARIANT_BACKBONES = {
    "unimedclip": BackboneSpec("UniMedCLIP-ViT-B-16", "unimedclip"),
    "biomedclip": BackboneSpec("hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", "biomedclip"),
    "pubmedclip": BackboneSpec("ViT-B-32", "pubmedclip"),
    "clip": BackboneSpec("ViT-B-16", "openai"),
}
# its configs' values per training set where they differ from the rest (configs/EUS.yaml, configs/Covid19.yaml)
DATASET_EPOCHS = {"EUS": 10}
DATASET_GATE_INIT = {"Covid19": -0.02}


@dataclass(frozen=True)
class MedCLIPSegParams:
    backbone_variant: str = param("unimedclip", choices=VARIANTS)  # its CLIP_MODEL: which code path and backbone
    layers: tuple[int, ...] = param((1, 2, 3, 4, 5, 6, 7, 8, 9, 10), ge=0)  # its LAYERS: adapter before block i+1
    adapter_dim: int = param(256, ge=1)
    beta: float = param(2.35, ge=0)  # weight of the key-uncertainty penalty on the attention scores
    gate_init: float | None = param(None, kind=float)  # None: its config's (0, sigmoid 0.5; Covid19 -0.02)
    upscale_blocks: int = param(2, ge=0)  # NUM_UPSCALE: transposed-conv scale blocks on the patch features
    temperature: float = param(0.2, gt=0)  # of the soft patch-level contrastive loss
    dice_weight: float = param(0.5, ge=0)
    bce_weight: float = param(0.5, ge=0)
    contrastive_weight: float = param(0.1, ge=0)
    epochs: int | None = param(None, ge=1, kind=int)  # None: its config's for the training set (100; EUS 10)
    lr: float = param(3e-4, gt=0)
    lr_min: float = param(1e-4, ge=0)  # cosine schedule's floor, stepped once an epoch
    batch_size: int = param(24, ge=1)
    rotate: bool = True  # its RandomGenerator: half the training images rotated by a random -20..20 degrees
    samples: int = param(30, ge=1)  # Monte-Carlo samples at test time (TEST.NUM_SAMPLES)
    prompt: str = "{organ} lesion."  # text for images without their own description ({organ}: the card's word)
    colour: str = param("bgr", choices=("bgr", "rgb"))  # bgr: its loader's cv2.imread, never converted to RGB
    progress: bool = True


@METHODS.register("medclipseg")
class MedCLIPSeg(Method):
    name = "medclipseg"
    published_name = "MedCLIPSeg"
    settings = frozenset({"supervised", "few_shot", "data_fraction", "domain_generalization"})
    requires_masks = True
    Params = MedCLIPSegParams
    default_backbone = VARIANT_BACKBONES["unimedclip"]
    default_image_size = 224
    default_resize = "bilinear"  # its loader's cv2.resize (INTER_LINEAR, no antialiasing)
    implementation = "methods.models.medclipseg:MedCLIPSegImpl"
    fit_state = ("model", "resolved", "history")
    released = Released(
        where="https://huggingface.co/TahaKoleilat/MedCLIPSeg",
        files="one per training set: BUSI, BTMRI, ISIC, Kvasir, Covid19, EUS at 100 % (also the domain "
        "generalisation sources), and NAME_10, NAME_25, NAME_50 for the data fractions",
        configuration="backbone UniMedCLIP-ViT-B-16 / unimedclip, image_size 224, backbone_variant unimedclip",
        per_dataset=True,
        hub_repo="TahaKoleilat/MedCLIPSeg",
        hub_path="{name}/trained_models/seed666/MedCLIPSeg_unimedclip_ViT-B-16_latest.pth",
        names=tuple(
            f"{d}{s}" for d in ("BUSI", "BTMRI", "ISIC", "Kvasir", "Covid19", "EUS") for s in ("", "_10", "_25", "_50")
        ),
    )
    fit_reads_target = False  # its prompts at training are the training images' own: one fit per source
    setting_blind = True  # a data fraction of 100 % and an in-domain generalisation cell bring the same data
    reads_valid = False  # its epochs are fixed: no model selection on the validation images
    test_params = Method.test_params | {"samples"}  # Monte Carlo samples at test time

    @classmethod
    def backbone_for(cls, params: MedCLIPSegParams) -> BackboneSpec:
        return VARIANT_BACKBONES[params.backbone_variant]
