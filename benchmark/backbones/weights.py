"""Find pretrained weights on this machine, never downloading: fail in well under 5 s when absent.

``python -m benchmark fetch-weights MODEL TAG`` downloads them where there is a network.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from benchmark.backbones.medical import MEDICAL_CLIPS, clip_of_file
from benchmark.errors import BenchmarkError, WeightsUnavailableError

_HF_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_TIMM_HF_NAMES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def missing(name: str, fetch_model: str, tag: str) -> WeightsUnavailableError:
    """The one-line error for weights that are not on this machine, with the command that fetches them."""
    return WeightsUnavailableError(
        f"backbone weights '{name}' are not on this machine: run `python -m benchmark fetch-weights {fetch_model} "
        f"{tag}` on a machine with internet (it fills the Hugging Face cache; copy ~/.cache/huggingface here), "
        "or set backbone.weights to a local checkpoint file"
    )


def local_checkpoint(weights: str) -> str | None:
    """``weights`` if it is a checkpoint file; None if it reads as a pretrained tag; an error for a missing file."""
    if os.path.isfile(weights):
        return weights
    if any(weights.endswith(ext) for ext in (".pt", ".pth", ".bin", ".safetensors")) or os.sep in weights:
        raise WeightsUnavailableError(f"backbone.weights: checkpoint file '{weights}' not found")
    return None


def hf_cached(repo_id: str, filenames) -> str | None:
    """The first of ``filenames`` present in the local Hugging Face cache of ``repo_id``, without the network."""
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        found = try_to_load_from_cache(repo_id, name)
        if isinstance(found, str):
            return found
    return None


def resolve_clip_weights(model: str, weights: str) -> tuple[str, dict]:
    """Local file of ``weights`` (a checkpoint path, an open_clip pretrained tag or a medical CLIP's tag) and its
    pretrained config."""
    import open_clip

    checkpoint = local_checkpoint(weights)
    if checkpoint is not None:  # a medical CLIP's file, named as published, keeps its activation
        known = clip_of_file(os.path.basename(checkpoint))
        return checkpoint, {"quick_gelu": known.quick_gelu} if known else {}
    if weights in MEDICAL_CLIPS:
        return resolve_medical(model, weights), {"quick_gelu": MEDICAL_CLIPS[weights].quick_gelu}
    if model not in open_clip.list_models():
        raise BenchmarkError(f"backbone.model: unknown open_clip model '{model}'")
    cfg = open_clip.get_pretrained_cfg(model, weights)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
        raise BenchmarkError(f"backbone.weights: '{weights}' is no pretrained tag of '{model}' (tags: {tags})")
    hub = cfg.get("hf_hub", "")
    if hub:
        parts = hub.split("/")
        filename = "/".join(parts[2:])
        found = hf_cached("/".join(parts[:2]), [filename] if filename else _HF_NAMES)
        if found:
            return found, cfg
    url = cfg.get("url", "")
    if url:
        local = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if local.is_file():
            return str(local), cfg
    raise missing(f"{model} / {weights}", model, weights)


def resolve_medical(model: str, tag: str) -> str:
    """The local file of a medical CLIP's weights (``benchmark.backbones.medical``), with its text tower's config
    and tokenizer in the cache; a one-line error naming what is missing and how to fetch it."""
    clip = MEDICAL_CLIPS[tag]
    if model != clip.model:
        raise BenchmarkError(f"backbone.weights: '{tag}' are weights of model '{clip.model}', not '{model}'")
    found = next((f for repo, name in clip.hub if (f := hf_cached(repo, [name]))), None)
    if found is None:
        raise missing(f"{model} / {tag}", model, tag)
    if clip.text_repo and not hf_cached(clip.text_repo, ["config.json"]):
        raise missing(f"{model} / {tag} (its text tower's config and tokenizer, {clip.text_repo})", model, tag)
    return found


def text_repos(config: Path) -> list[str]:
    """The Hugging Face repos of an ``open_clip_config.json``'s BERT text tower (its model and tokenizer)."""
    text = json.loads(config.read_text()).get("model_cfg", {}).get("text_cfg", {})
    return list(dict.fromkeys(v for k, v in text.items() if k in ("hf_model_name", "hf_tokenizer_name")))


def hub_snapshot(repo: str, fetch_model: str, tag: str) -> Path:
    """The local snapshot folder of an open_clip model on the Hub (``open_clip_config.json`` and its weights) and
    of its text tower's config, never downloading; a one-line error naming what is missing."""
    config = hf_cached(repo, ["open_clip_config.json"])
    if config is None or hf_cached(repo, _HF_NAMES) is None:
        raise missing(f"hf-hub:{repo}", fetch_model, tag)
    for name in text_repos(Path(config)):
        if hf_cached(name, ["config.json"]) is None:
            raise missing(f"hf-hub:{repo} (its text tower's config and tokenizer, {name})", fetch_model, tag)
    return Path(config).parent


def resolve_timm_weights(model: str, weights: str) -> str:
    """Local file of a timm pretrained tag or checkpoint; never downloads."""
    import timm

    checkpoint = local_checkpoint(weights)
    if checkpoint is not None:
        return checkpoint
    name = f"{model}.{weights}"
    if name not in timm.list_pretrained(f"{model}.*"):
        tags = ", ".join(n.split(".", 1)[1] for n in timm.list_pretrained(f"{model}.*")) or "none"
        raise BenchmarkError(f"backbone.weights: '{weights}' is no timm pretrained tag of '{model}' (tags: {tags})")
    cfg = timm.models.get_pretrained_cfg(name)
    hub = getattr(cfg, "hf_hub_id", None)
    found = hf_cached(hub, _TIMM_HF_NAMES) if hub else None
    if found:
        return found
    raise missing(name, f"timm:{model}", weights)


def fetch_medical(model: str, tag: str) -> str:
    """Download a medical CLIP (or any ``hf-hub:`` open_clip model) and its BERT text tower's config and
    tokenizer files into the Hugging Face cache."""
    from huggingface_hub import hf_hub_download, snapshot_download

    text_files = ["config.json", "*.txt", "tokenizer*.json", "special_tokens_map.json"]
    if model.startswith("hf-hub:"):
        repo = model.removeprefix("hf-hub:")
        folder = snapshot_download(repo, allow_patterns=["open_clip_config.json", *_HF_NAMES])
        for name in text_repos(Path(folder) / "open_clip_config.json"):
            snapshot_download(name, allow_patterns=text_files)
        return str(hub_snapshot(repo, model, tag))
    clip = MEDICAL_CLIPS[tag]
    if model != clip.model:
        raise BenchmarkError(f"fetch-weights: '{tag}' are weights of model '{clip.model}', not '{model}'")
    repo, name = clip.hub[0]
    hf_hub_download(repo, name)
    if clip.text_repo:
        snapshot_download(clip.text_repo, allow_patterns=text_files)
    return resolve_medical(model, tag)


def hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the Hugging Face Hub (``HF_ENDPOINT``, else huggingface.co) cannot be reached, asked once with a
    short timeout; None when it answers."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return None  # through a proxy a direct connection says nothing; the download itself will tell
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        return f"{host}:{port} cannot be reached within {timeout_s:g} s ({type(exc).__name__}: {exc})"
    return None


def fetch_weights(model: str, weights: str) -> str:
    """Download an open_clip pretrained tag (or, for ``timm:MODEL``, a timm tag) into the caches (needs a
    network); offline or on a failed download, one line."""
    what = f"{model} / {weights}"
    problem = hub_unreachable()
    if problem:
        raise BenchmarkError(f"fetch-weights {what}: no network to download from: {problem}")
    try:
        if weights in MEDICAL_CLIPS or model.startswith("hf-hub:"):
            return fetch_medical(model, weights)
        if model.startswith("timm:"):
            import timm

            timm.create_model(f"{model[5:]}.{weights}", pretrained=True)
            return resolve_timm_weights(model[5:], weights)
        import open_clip

        open_clip.create_model(model, pretrained=weights)
        return resolve_clip_weights(model, weights)[0]
    except BenchmarkError:
        raise
    except Exception as exc:
        raise download_failed(what, exc) from None


def download_failed(what: str, exc: Exception, command: str = "fetch-weights") -> BenchmarkError:
    """The one-line error of a failed ``fetch-weights WHAT`` (or ``command``): the first line of the reason."""
    reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    return BenchmarkError(f"{command} {what}: the download failed ({reason})")


def fetch_checkpoint(cls, name: str) -> str:
    """Method ``cls``'s authors' checkpoint ``name`` downloaded into the Hugging Face cache where they publish it
    there, with the protocol entry that evaluates it; else where they publish it."""
    released = cls.released
    if released is None:
        raise BenchmarkError(f"fetch-weights {cls.name}: its authors publish no checkpoint this harness imports")
    # the dataset whose cells evaluate it (a data fraction's file, BUSI_25, is its dataset's)
    dataset = (name.split("_")[0] if released.hub_repo else name) or "DATASET"
    where = f"{{{dataset}: PATH}}" if released.per_dataset else "PATH"
    entry = f"  {cls.name}_authors: {{method: {cls.name}, checkpoint: {where}, checkpoint_format: official}}"
    setup = f"on its configuration: {released.configuration}"
    if not released.hub_repo:
        return "\n".join([
            f"{cls.name}: its authors' checkpoints are published at {released.where} (fetch-weights downloads from "
            "Hugging Face only)",
            f"download them ({released.files}), put them in any folder (e.g. checkpoints/{cls.name}/) and name them in "
            "a protocol's methods:", entry, setup,
        ])  # fmt: skip
    if name not in released.names:
        raise BenchmarkError(
            f"fetch-weights {cls.name} {name}: no such checkpoint (expected one of {', '.join(released.names)})"
        )
    problem = hub_unreachable()
    if problem:
        raise BenchmarkError(f"fetch-weights {cls.name} {name}: no network to download from: {problem}")
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(released.hub_repo, released.hub_path.format(name=name))
    except Exception as exc:
        raise download_failed(f"{cls.name} {name}", exc) from None
    return "\n".join([path, "name it in a protocol's methods:", entry.replace("PATH", path), setup])


def weights_identity(weights: str) -> str:
    """What a recipe records of a backbone's weights: a checkpoint file's path, size and modification time
    (a new file at the same path is new features); a tag or ``random-init`` as it is."""
    if os.path.isfile(weights):
        stat = os.stat(weights)
        return f"{os.path.abspath(weights)}:{stat.st_size}:{int(stat.st_mtime)}"
    return weights
