"""`lorafleet data caption`: sidecar captions from a BLIP-style captioning model on a local path."""

from __future__ import annotations

# Imports inside functions: torch and transformers only when a captioning model runs.
from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.errors import BaseModelError

from .data import IMAGE_SUFFIXES, open_image


@dataclass
class CaptionReport:
    written: list[str] = field(default_factory=list)
    kept_existing: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)


def load_captioner(model_path: Path):
    """Processor and model from a local folder (never a hub download, never remote code)."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    if not Path(model_path).is_dir():
        raise BaseModelError(f"captioning model {model_path} is not a local folder", field="model")
    try:
        processor = BlipProcessor.from_pretrained(str(model_path), local_files_only=True)
        model = BlipForConditionalGeneration.from_pretrained(str(model_path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"cannot load a BLIP captioner from {model_path}: {exc}", field="model") from exc
    return processor, model.eval()


def caption_folder(folder: Path, model_path: Path, overwrite: bool = False, max_new_tokens: int = 30,
                   prefix: str | None = None) -> CaptionReport:
    """Write NAME.txt for every image; existing captions are kept unless ``overwrite``."""
    import torch

    processor, model = load_captioner(model_path)
    report = CaptionReport()
    for path in sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        sidecar = path.with_suffix(".txt")
        if sidecar.exists() and not overwrite:
            report.kept_existing.append(path.name)
            continue
        try:
            image = open_image(path)
        except (OSError, ValueError, SyntaxError):
            report.unreadable.append(path.name)
            continue
        inputs = processor(images=image, text=prefix, return_tensors="pt")
        with torch.no_grad():
            tokens = model.generate(**inputs, max_new_tokens=max_new_tokens)
        sidecar.write_text(processor.decode(tokens[0], skip_special_tokens=True).strip())
        report.written.append(path.name)
    return report
