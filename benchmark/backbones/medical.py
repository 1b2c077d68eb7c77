"""Medical CLIP backbones by name, as timm's pretrained tables: one weights tag resolves the model, the file its
weights come in, where its publishers put it and under which licence. Torch-free (reports read it).

A protocol names one as ``backbone: {model: MODEL, weights: TAG}``; ``fetch-weights MODEL TAG`` downloads it
(with its text tower's config and tokenizer) from the Hugging Face Hub into the local cache.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MedicalClip:
    tag: str  # the weights tag a protocol names
    model: str  # the model it loads into: an open_clip name, a config we ship, or an ``hf-hub:`` name
    hub: tuple[tuple[str, str], ...]  # (Hugging Face repo, file) where it is published, in the order looked up
    text_repo: str  # the Hugging Face repo of its BERT text tower's config and tokenizer ("" for CLIP's own)
    source: str  # where its publishers put it
    licence: str  # as its publishers state it
    paper: str
    quick_gelu: bool = False  # its vision tower's activation (OpenAI's weights: QuickGELU)

    @property
    def files(self) -> tuple[str, ...]:
        """The checkpoint's file names as published."""
        return tuple(f.rsplit("/", 1)[-1] for _, f in self.hub)


BIOMEDBERT = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
MEDICAL_CLIPS: dict[str, MedicalClip] = {
    c.tag: c
    for c in (
        MedicalClip(
            "unimedclip",
            "UniMedCLIP-ViT-B-16",  # benchmark/backbones/model_configs: ViT-B/16 (QuickGELU) + BiomedBERT
            (
                ("UzairK/unimed-clip-vit-b16", "unimed-clip-vit-b16.pt"),
                ("TahaKoleilat/MedCLIPSeg", "checkpoints/unimed_clip_vit_b16.pt"),
            ),
            BIOMEDBERT,
            "https://github.com/mbzuai-oryx/UniMed-CLIP (Hugging Face UzairK/unimed-clip-vit-b16; MedCLIPSeg's "
            "copy: TahaKoleilat/MedCLIPSeg, checkpoints/unimed_clip_vit_b16.pt)",
            "CC BY-NC 4.0 (its model card and repository)",
            "Khattak et al., UniMed-CLIP, 2024",
        ),
        MedicalClip(
            "biomedclip",
            "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
            (("microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", "open_clip_pytorch_model.bin"),),
            BIOMEDBERT,
            "https://huggingface.co/microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
            "MIT (its model card)",
            "Zhang et al., BiomedCLIP, NEJM AI 2024",
        ),
        MedicalClip(
            "pubmedclip",
            "ViT-B-32",
            (("TahaKoleilat/MedCLIPSeg", "checkpoints/PubMedCLIP_ViT32.pth"),),
            "",
            "https://github.com/sarahESL/PubMedCLIP (Google Drive link in its README; MedCLIPSeg's copy: "
            "TahaKoleilat/MedCLIPSeg, checkpoints/PubMedCLIP_ViT32.pth)",
            "MIT (its repository)",
            "Eslami et al., EACL Findings 2023",
            quick_gelu=True,  # OpenAI's ViT-B/32 fine-tuned
        ),
    )
}


def clip_of_file(name: str) -> MedicalClip | None:
    """The medical CLIP whose checkpoint is published under the file name ``name``, or None."""
    return next((c for c in MEDICAL_CLIPS.values() if name in c.files), None)


def tag_of_file(name: str) -> str:
    """The weights tag a checkpoint file is published as (``PubMedCLIP_ViT32.pth`` -> ``pubmedclip``), else the
    file's name."""
    clip = clip_of_file(name)
    return clip.tag if clip else name
