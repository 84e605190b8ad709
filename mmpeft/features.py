"""Image features of a frozen image tower, computed once and reused across epochs, seeds and compare cells.

Why: a method that leaves the image tower frozen (zero-shot, linear probe, text-side prompts, text-only LoRA) would
otherwise load, preprocess and encode every image again in every epoch and in every cell of a grid.

What identifies a feature: the backbone (hashes of its folder's files, which hold the weights and the image
processor's settings, plus dtype and quantisation) and the example (its image: path + size + modification time, a
`datasets` row, or the pixels of an in-memory image; the shifts; its position in the split when a shift is seeded by
it). Features live in memory for the process; with `train.feature_cache: disk` they are also kept as safetensors
files under $MMPEFT_CACHE/features/<backbone fingerprint>/.

A cache hit is spot-checked against a fresh forward pass of a few images, so a method that alters the image path
without saying so falls back to no cache instead of training on stale features. Features are computed in eval mode:
for a frozen tower they are what a forward pass in train mode gives too, except under dropout inside the tower.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from mmpeft.core.io import atomic_path, cache_dir, caches_shared
from mmpeft.data.dataset import Example, ImageDataset
from mmpeft.data.image_cache import INDEX_SEEDED_SHIFTS
from mmpeft.data.loader import make_loader
from mmpeft.data.sources import DatasetImage, ShardImage

if TYPE_CHECKING:
    from mmpeft.backbones import Backbone
    from mmpeft.specs import BackboneSpec, Recipe

logger = logging.getLogger("mmpeft")

SPOT_CHECK = 4  # cached features compared against a fresh forward pass, at the first cache hit of a run
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_hash(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) for the life of the process."""
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _FILE_HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _FILE_HASHES[memo] = digest.hexdigest()
    return _FILE_HASHES[memo]


def backbone_fingerprint(spec: BackboneSpec, path: str) -> str | None:
    """A hash of what fixes the image features: the model folder's files, dtype, quantisation; None if unknowable.

    `backbone.init: scratch` draws random weights at load time, and a hub id that is not in the local cache has no
    files to hash: both get None (no cache).
    """
    if spec.init != "pretrained":
        return None
    folder = Path(path)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(spec.id, revision=spec.revision, local_files_only=True))
        except Exception:  # not cached locally, or not a hub id: nothing to hash
            return None
    files = {entry.name: file_hash(entry) for entry in sorted(folder.iterdir())
             if entry.is_file() and not entry.name.startswith(".")}
    quantization = None if spec.quantization is None else repr(spec.quantization)
    identity = {"files": files, "dtype": spec.dtype, "quantization": quantization}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def example_key(example: Example, position: int, shifts: Sequence[str]) -> str:
    """What identifies one example's image as the model sees it (before any augmentation)."""
    image = example.image
    if isinstance(image, str):
        stat = os.stat(image)
        ref = f"file:{os.path.abspath(image)}:{stat.st_size}:{stat.st_mtime_ns}"
    elif isinstance(image, ShardImage):
        stat = os.stat(image.shard)
        ref = f"shard:{os.path.abspath(image.shard)}:{stat.st_mtime_ns}:{image.offset}:{image.size}"
    elif isinstance(image, DatasetImage):
        ref = f"dataset:{getattr(image.dataset, '_fingerprint', id(image.dataset))}:{image.column}:{image.index}"
    else:
        digest = hashlib.sha1(f"{image.mode}:{image.size}".encode())
        digest.update(image.tobytes())
        ref = f"pixels:{digest.hexdigest()}"
    shift = "+".join(shifts)
    if any(name in INDEX_SEEDED_SHIFTS for name in shifts):
        shift += f"@{position}"
    return f"{ref}|{shift}"


class FeatureDataset(Dataset):
    """Items {"image_features", "label", "index"} standing in for an ImageDataset; brings its own collate."""

    accepts_epoch_keys = True

    def __init__(self, features: torch.Tensor, source: ImageDataset):
        self.features = features
        self.examples = source.examples
        self.seed, self.epoch = source.seed, source.epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index = key[1] if isinstance(key, tuple) else key
        return {"image_features": self.features[index], "label": self.examples[index].label, "index": index}

    @property
    def labels(self) -> list[int]:
        return [example.label for example in self.examples]

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        return {"image_features": torch.stack([item["image_features"] for item in items]),
                "labels": torch.tensor([item["label"] for item in items], dtype=torch.long),
                "index": torch.tensor([item["index"] for item in items], dtype=torch.long)}


@torch.no_grad()
def encode_dataset(backbone: Backbone, dataset: Dataset, batch_size: int, desc: str = "features") -> torch.Tensor:
    """Normalised image features [N, D] (float32, CPU) of every item, in eval mode."""
    was_training = backbone.training
    backbone.eval()
    loader = make_loader(dataset, backbone, batch_size=batch_size)
    chunks = [backbone.encode_images(batch["pixel_values"]).float().cpu()
              for batch in tqdm(loader, desc=desc, leave=False, disable=None)]
    backbone.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0)


class FeatureCache:
    """key -> feature vector, in memory; optionally mirrored to a folder per backbone fingerprint."""

    def __init__(self) -> None:
        self.memory: dict[str, torch.Tensor] = {}
        self._loaded_dirs: set[Path] = set()

    def clear(self) -> None:
        self.memory.clear()
        self._loaded_dirs.clear()

    def lookup(self, fingerprint: str, keys: list[str], disk: bool) -> list[int]:
        """Positions of `keys` not cached yet (reading the disk folder first when `disk`)."""
        if disk:
            self._load_dir(cache_dir("features", fingerprint))
        return [i for i, key in enumerate(keys) if f"{fingerprint}/{key}" not in self.memory]

    def store(self, fingerprint: str, keys: list[str], features: torch.Tensor, disk: bool) -> None:
        for key, row in zip(keys, features):
            self.memory[f"{fingerprint}/{key}"] = row
        if disk and keys:
            folder = cache_dir("features", fingerprint)
            name = hashlib.sha1("\n".join(keys).encode()).hexdigest()[:20]
            with atomic_path(folder / f"{name}.safetensors") as tmp:
                save_file({"features": features.contiguous()}, str(tmp), metadata={"keys": json.dumps(keys)})

    def get(self, fingerprint: str, keys: list[str]) -> torch.Tensor:
        return torch.stack([self.memory[f"{fingerprint}/{key}"] for key in keys])

    def _load_dir(self, folder: Path) -> None:
        if folder in self._loaded_dirs:
            return
        fingerprint = folder.name
        for path in sorted(folder.glob("*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as handle:
                    keys = json.loads(handle.metadata()["keys"])
                    features = handle.get_tensor("features")
            except Exception as error:  # a damaged file costs a recomputation, never a wrong feature
                logger.warning("feature cache: ignoring unreadable %s (%s)", path, error)
                continue
            for key, row in zip(keys, features):
                self.memory.setdefault(f"{fingerprint}/{key}", row)
        self._loaded_dirs.add(folder)


PROCESS_CACHE = FeatureCache()


class FeatureBinding:
    """The process cache bound to one run's backbone: turns ImageDatasets into FeatureDatasets, counting the work."""

    def __init__(self, backbone, fingerprint: str, batch_size: int, disk: bool, cache: FeatureCache = PROCESS_CACHE):
        self.backbone, self.fingerprint, self.batch_size, self.disk, self.cache = (
            backbone, fingerprint, batch_size, disk, cache)
        self.computed = self.reused = 0
        self.seconds = 0.0
        self.enabled = True
        self.checked = False  # one spot check per run: every wrap of a run sees the same model

    def wrap(self, dataset: ImageDataset, desc: str = "features") -> Dataset:
        """A FeatureDataset over `dataset` (the dataset itself once a spot check has failed)."""
        if not self.enabled:
            return dataset
        tic = time.perf_counter()
        keys = [example_key(example, i, dataset.shifts) for i, example in enumerate(dataset.examples)]
        missing = self.cache.lookup(self.fingerprint, keys, self.disk)
        absent = set(missing)
        hits = [i for i in range(len(keys)) if i not in absent]
        if hits and not self.checked and not self.spot_check(dataset, keys, hits[:SPOT_CHECK]):
            return dataset
        if missing:
            fresh = encode_dataset(self.backbone, Subset(dataset, missing), self.batch_size, desc=f"{desc} features")
            self.cache.store(self.fingerprint, [keys[i] for i in missing], fresh, self.disk)
        self.computed += len(missing)
        self.reused += len(hits)
        self.seconds += time.perf_counter() - tic
        return FeatureDataset(self.cache.get(self.fingerprint, keys), dataset)

    def spot_check(self, dataset: ImageDataset, keys: list[str], positions: list[int]) -> bool:
        fresh = encode_dataset(self.backbone, Subset(dataset, positions), self.batch_size, desc="spot check")
        cached = self.cache.get(self.fingerprint, [keys[i] for i in positions])
        tolerance = 1e-4 if self.backbone.base_model.dtype == torch.float32 else 2e-2
        difference = (fresh - cached).abs().max().item()
        if difference <= tolerance:
            self.checked = True
            return True
        logger.warning("feature cache: cached image features differ from this model's by %.2g (> %.0g): the "
                       "method changes the image path without training it; recomputing every batch instead",
                       difference, tolerance)
        self.enabled = False
        return False

    def stats(self) -> dict:
        return {"used": self.enabled, "computed": self.computed, "reused": self.reused,
                "seconds": round(self.seconds, 3), "disk": self.disk}


def bind_features(recipe: Recipe, backbone: Backbone) -> FeatureBinding | None:
    """The cache for this run's backbone, or None (logged) when the recipe or the backbone rules it out."""
    setting = recipe.train.feature_cache
    if setting == "recompute" or not backbone.caches_image_features:
        return None  # generative backbones score each example's own prompt: no image-only features to reuse
    fingerprint = backbone_fingerprint(recipe.backbone, backbone.name_or_path)
    if fingerprint is None:
        logger.info("feature cache: off: backbone %r has no files that identify its weights (init: %s)",
                    recipe.backbone.id, recipe.backbone.init)
        return None
    disk = setting == "disk" or caches_shared()  # a grid worker shares its features with the other workers
    return FeatureBinding(backbone, fingerprint, recipe.eval.batch_size, disk=disk)


def keep_after_apply(binding: FeatureBinding | None, recipe: Recipe, method,
                     backbone: Backbone) -> FeatureBinding | None:
    """Keep the cache for training and evaluation only if the applied method leaves the image features alone."""
    if binding is None:
        return None
    reason = None
    if not method.image_tower_frozen(backbone, recipe.method):
        reason = f"method {method.name!r} trains or changes the image tower"
    elif any(name in vars(backbone) for name in ("encode_images", "classify", "score")):
        reason = f"method {method.name!r} replaces how the backbone scores images"
    elif method.trains and recipe.train.objective != "classification":
        reason = f"train.objective {recipe.train.objective!r} encodes images itself"
    if reason:
        logger.info("feature cache: not used: %s", reason)
        return None
    logger.info("feature cache: on (%s): image features computed once and reused across epochs and runs",
                recipe.train.feature_cache)
    return binding
