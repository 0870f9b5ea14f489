"""Training data: a folder of images and captions, checked and prepared, with a report.

One bad file never stops a run: unreadable, too small, oversized (decompression bombs) and
duplicate images are skipped and counted. Captions come from ``metadata.jsonl``
(``file_name``, ``text``) or sidecar ``NAME.txt`` files.
"""

from __future__ import annotations

# Imports inside functions: PIL only when images are read.
import hashlib
import io
import json
import math
import os
import random
import stat
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lorafleet.registry.safetensors_io import UntrustedJsonError, parse_untrusted_json

from .config import DataConfig
from .errors import TrainingInputInvalid

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
# Decoders Pillow may use on untrusted files (whatever their suffix says): never EPS (Ghostscript),
# PSD, SPIDER... Keep in step with IMAGE_SUFFIXES and the README's list.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_CAPTION_BYTES = 64 * 1024
MAX_METADATA_BYTES = 64 * 1024**2
DEFAULT_MAX_FILE_BYTES = 50 * 1024**2


class UnusableFile(ValueError):
    """A data file that is not read: ``reason`` is its key in DataReport.skipped."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def read_regular_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of ``path`` if it is a regular file (not a symlink, FIFO, device or folder) of at
    most ``max_bytes``; opened without following links and without blocking on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:  # ELOOP: a symlink
        raise UnusableFile("not_a_regular_file", f"{path.name}: not a regular file ({exc.strerror})") from exc
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UnusableFile("not_a_regular_file", f"{path.name}: not a regular file")
        data = handle.read(max_bytes + 1) if info.st_size <= max_bytes else b""
        if info.st_size > max_bytes or len(data) > max_bytes:  # too large, or grew while we read it
            raise UnusableFile("too_large", f"{path.name}: over {max_bytes} bytes")
        return data
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # refuse images that decompress beyond this (PIL's bomb guard)
RECOMMENDED_WORDS = (5, 20)


@dataclass
class Example:
    path: Path
    caption: str
    digest: str
    weight: float = 1.0  # sampling weight (metadata.jsonl "weight")
    aspect: float = 1.0  # width / height after EXIF rotation
    regularization: bool = False  # its caption does not name the trigger (config.RegularizationConfig)


@dataclass
class DataReport:
    folder: str
    kept: int = 0
    resized: int = 0
    skipped: dict[str, list[str]] = field(default_factory=lambda: {
        "unreadable": [], "too_small": [], "too_large": [], "duplicate": [], "not_a_regular_file": []})
    missing_captions: list[str] = field(default_factory=list)
    caption_words: dict[str, float] = field(default_factory=dict)
    captions_outside_recommended: int = 0
    regularization: int = 0  # examples whose caption does not name the trigger
    dataset_digest: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        skipped = ", ".join(f"{len(v)} {k.replace('_', ' ')}" for k, v in self.skipped.items() if v) or "none"
        words = self.caption_words
        return (f"{self.kept} images kept ({self.resized} resized), skipped: {skipped}; "
                f"{len(self.missing_captions)} without caption; caption words min/mean/max "
                f"{words.get('min', 0):.0f}/{words.get('mean', 0):.1f}/{words.get('max', 0):.0f} "
                f"({self.captions_outside_recommended} outside {RECOMMENDED_WORDS[0]}-{RECOMMENDED_WORDS[1]})"
                + (f"; {self.regularization} regularization (no [trigger])" if self.regularization else ""))


def _read_metadata(folder: Path) -> dict[str, tuple[str, float]]:
    """file_name -> (caption, weight) from metadata.jsonl."""
    metadata = folder / "metadata.jsonl"
    if not metadata.exists() and not metadata.is_symlink():
        return {}
    try:
        text = read_regular_file(metadata, MAX_METADATA_BYTES).decode("utf-8", errors="replace")
    except UnusableFile as exc:
        raise TrainingInputInvalid(f"metadata.jsonl: {exc}", field="data.path") from exc
    rows = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = parse_untrusted_json(line)
            weight = float(row.get("weight", 1.0))
            rows[str(row["file_name"])] = (str(row["text"]), weight)
        except (UntrustedJsonError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise TrainingInputInvalid(f"metadata.jsonl line {number}: needs file_name and text ({exc})",
                                       field="data.path") from exc
        if not (0 < weight < float("inf")):
            raise TrainingInputInvalid(f"metadata.jsonl line {number}: weight must be a positive number",
                                       field="data.path")
    return rows


def _caption_for(image: Path, metadata: dict[str, tuple[str, float]], report: DataReport) -> str | None:
    if image.name in metadata:
        return metadata[image.name][0]
    sidecar = image.with_suffix(".txt")
    if not sidecar.exists() and not sidecar.is_symlink():
        return None
    try:
        return read_regular_file(sidecar, MAX_CAPTION_BYTES).decode("utf-8", errors="replace").strip()
    except UnusableFile as exc:  # a caption linked to /etc/passwd is not read, and is reported
        report.skipped[exc.reason].append(sidecar.name)
        return None


def apply_trigger(caption: str, config: DataConfig) -> str:
    if not config.trigger or config.trigger_mode == "none":
        return caption
    if config.trigger_mode == "substitute":
        return caption.replace("[trigger]", config.trigger)
    return f"{config.trigger} {caption}".strip()


def is_regularization(caption: str, config: DataConfig) -> bool:
    """In substitute mode, a caption without ``[trigger]`` is a regularization example."""
    return config.marks_regularization and "[trigger]" not in caption


def open_image(path: Path, data: bytes | None = None, max_bytes: int = DEFAULT_MAX_FILE_BYTES):
    """An 8-bit RGB image with its EXIF orientation applied, decoded only as PNG, JPEG or WEBP from
    a regular file; raises UnusableFile, OSError or ValueError if unusable."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    data = read_regular_file(path, max_bytes) if data is None else data
    try:
        raw = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError as exc:
        raise UnusableFile("unreadable", f"{path.name}: not a {'/'.join(IMAGE_FORMATS)} image") from exc
    with raw:
        if raw.width * raw.height > MAX_IMAGE_PIXELS:
            raise Image.DecompressionBombError(f"{raw.width}x{raw.height} pixels")
        image = ImageOps.exif_transpose(raw)
        return image.convert("RGB")


def scan(config: DataConfig) -> tuple[list[Example], DataReport]:
    """Every usable image with its caption, and what was skipped and why."""
    from PIL import Image

    folder = Path(config.path).expanduser()
    if not folder.is_dir():
        raise TrainingInputInvalid(f"data folder {folder} does not exist", field="data.path")
    metadata = _read_metadata(folder)
    report, examples, seen = DataReport(folder=str(folder)), [], set()
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            data = read_regular_file(path, config.max_file_bytes)
        except UnusableFile as exc:
            report.skipped[exc.reason].append(path.name)
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            report.skipped["duplicate"].append(path.name)
            continue
        try:
            image = open_image(path, data)
        except UnusableFile as exc:
            report.skipped[exc.reason].append(path.name)
            continue
        except Image.DecompressionBombError:
            report.skipped["too_large"].append(path.name)
            continue
        except (OSError, ValueError, SyntaxError):
            report.skipped["unreadable"].append(path.name)
            continue
        if min(image.size) < config.min_size:
            report.skipped["too_small"].append(path.name)
            continue
        seen.add(digest)
        caption = _caption_for(path, metadata, report)
        if caption is None:
            report.missing_captions.append(path.name)
            caption = ""
        report.resized += int(image.size != (config.resolution, config.resolution))
        weight = metadata.get(path.name, ("", 1.0))[1] if config.weighted_sampling else 1.0
        examples.append(Example(path, apply_trigger(caption, config), digest, weight, image.width / image.height,
                                is_regularization(caption, config)))
    _caption_statistics(report, examples)
    report.kept = len(examples)
    report.regularization = sum(example.regularization for example in examples)
    report.dataset_digest = dataset_digest(examples)
    return examples, report


def _caption_statistics(report: DataReport, examples: list[Example]) -> None:
    counts = [len(e.caption.split()) for e in examples]
    if counts:
        report.caption_words = {"min": min(counts), "mean": statistics.mean(counts), "max": max(counts)}
        low, high = RECOMMENDED_WORDS
        report.captions_outside_recommended = sum(1 for c in counts if not low <= c <= high)


def dataset_digest(examples: list[Example]) -> str:
    hasher = hashlib.sha256()
    for example in sorted(examples, key=lambda e: e.digest):
        hasher.update(f"{example.digest}|{example.caption}\n".encode())
    return "sha256:" + hasher.hexdigest()


BUCKET_ASPECTS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16)


def bucket_for(aspect: float, resolution: int, multiple: int = 8) -> tuple[int, int]:
    """(width, height) of about resolution^2 pixels whose aspect is nearest ``aspect``."""
    nearest = min(BUCKET_ASPECTS, key=lambda a: abs(math.log(a / aspect)))
    width = max(multiple, round(resolution * math.sqrt(nearest) / multiple) * multiple)
    height = max(multiple, round(resolution / math.sqrt(nearest) / multiple) * multiple)
    return width, height


def resize_and_crop(image, resolution: int | tuple[int, int], crop: str, rng: random.Random):
    """Resize to cover the target (keeping the aspect ratio), then crop to it (square or a bucket)."""
    return resize_and_crop_recorded(image, resolution, crop, rng)[0]


def resize_and_crop_recorded(image, resolution: int | tuple[int, int], crop: str,
                             rng: random.Random) -> tuple[object, tuple[int, int, int, int, int, int]]:
    """``resize_and_crop``, plus what SDXL is conditioned on: (original height, original width,
    crop top, crop left, target height, target width), as diffusers' SDXL training scripts record it."""
    original = (image.height, image.width)
    from PIL import Image

    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    spare_x, spare_y = image.width - width, image.height - height
    if crop == "random":
        left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
    else:
        left, top = spare_x // 2, spare_y // 2
    return image.crop((left, top, left + width, top + height)), (*original, top, left, height, width)


def to_array(image) -> np.ndarray:
    """[height, width, 3] uint8 -> [3, height, width] float32 in [-1, 1]."""
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return pixels.transpose(2, 0, 1)


def augment(pixels: np.ndarray, config: DataConfig, rng: random.Random) -> np.ndarray:
    if config.flip and rng.random() < 0.5:
        pixels = pixels[:, :, ::-1]
    if config.color_jitter:
        gain = 1 + rng.uniform(-config.color_jitter, config.color_jitter)
        shift = rng.uniform(-config.color_jitter, config.color_jitter)
        pixels = np.clip(pixels * gain + shift, -1, 1)
    return np.ascontiguousarray(pixels)


def random_augmentation(config: DataConfig) -> bool:
    """Whether images differ between epochs (then cached latents would be wrong)."""
    return config.flip or config.color_jitter > 0 or config.crop == "random"


def prepare_folder(config: DataConfig, destination: Path) -> DataReport:
    """`lorafleet data prepare`: write resized, cropped PNGs with captions and a report."""
    examples, report = scan(config)
    destination.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for index, example in enumerate(examples):
        image = resize_and_crop(open_image(example.path, max_bytes=config.max_file_bytes), config.resolution,
                                config.crop, rng)
        stem = f"{index:06d}-{example.path.stem}"
        image.save(destination / f"{stem}.png")
        (destination / f"{stem}.txt").write_text(example.caption)
    (destination / "report.json").write_text(json.dumps(report.to_dict(), indent=2))
    return report
