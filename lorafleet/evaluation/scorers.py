"""What an image shows, as evaluation needs it: prompt accuracy per image, an attribute's label,
an embedding (diversity, fidelity) and a drift distance between two images of the same prompt
and seed (with and without an adapter).

The toy world's scorer reads colour and shape exactly and drift is the foreground hue's shift in
degrees; on real bases CLIP from a local folder (loaded by transformers) gives the CLIP score,
zero-shot labels ("a photo of a {label}") and image embeddings (drift: 1 - cosine).
"""

from __future__ import annotations

# Imports inside functions: transformers only with a CLIP folder.
import re
from pathlib import Path
from typing import Protocol

import numpy as np

from lorafleet.toyworld.scorer import hue_distance, score
from lorafleet.toyworld.world import COLOUR_HUES, SHAPES


class Scorer(Protocol):
    name: str
    drift_unit: str

    def accuracy(self, prompt: str, images: list[np.ndarray]) -> list[float]: ...

    def labels(self, images: list[np.ndarray], attribute: str, labels: list[str]) -> list[str | None]: ...

    def embed(self, images: list[np.ndarray]) -> np.ndarray: ...

    def drift(self, with_adapter: list[np.ndarray], without: list[np.ndarray]) -> list[float]: ...


class ToyScorer:
    """The toy world's own scorer: a prompt is right when the image shows every colour and shape
    word it names."""

    name = "toy scorer"
    drift_unit = "degrees of hue"

    def accuracy(self, prompt: str, images: list[np.ndarray]) -> list[float]:
        words = set(re.findall(r"[a-z]+", prompt.lower()))
        colour = next((c for c in COLOUR_HUES if c in words), None)
        shape = next((s for s in SHAPES if s in words), None)
        verdicts = [score(image) for image in images]
        return [float((colour is None or v.colour == colour) and (shape is None or v.shape == shape)
                      and v.accepted) for v in verdicts]

    def labels(self, images: list[np.ndarray], attribute: str, labels: list[str]) -> list[str | None]:
        if attribute not in ("colour", "shape"):
            raise ValueError(f"the toy scorer reads colour or shape, not {attribute!r}")
        found = [getattr(score(image), attribute) for image in images]
        return [label if label in labels else None for label in found]

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        return np.stack([np.asarray(image, dtype=np.float32).ravel() for image in images])

    def drift(self, with_adapter: list[np.ndarray], without: list[np.ndarray]) -> list[float]:
        shifts = []
        for a, b in zip(with_adapter, without):
            hue_a, hue_b = score(a).features.get("hue"), score(b).features.get("hue")
            if hue_a is not None and hue_b is not None:
                shifts.append(hue_distance(hue_a, hue_b))
        return shifts


class ClipScorer:
    """CLIP from a local folder: CLIP score / 100 as accuracy, zero-shot labels, embeddings."""

    name = "CLIP"
    drift_unit = "1 - cosine of CLIP image embeddings"

    def __init__(self, folder: Path):
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval()
        self.processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)

    def _image_features(self, images: list[np.ndarray]):
        import torch

        pixels = [(np.clip(image, 0, 1) * 255).round().astype(np.uint8) for image in images]
        with torch.no_grad():
            inputs = self.processor(images=pixels, return_tensors="pt")
            features = _tensor(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
        return features / features.norm(dim=-1, keepdim=True)

    def _text_features(self, texts: list[str]):
        import torch

        with torch.no_grad():
            inputs = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True)
            features = _tensor(self.model.get_text_features(input_ids=inputs["input_ids"],
                                                            attention_mask=inputs.get("attention_mask")))
        return features / features.norm(dim=-1, keepdim=True)

    def accuracy(self, prompt: str, images: list[np.ndarray]) -> list[float]:
        cosine = self._image_features(images) @ self._text_features([prompt]).T
        return [float(max(0.0, c)) for c in cosine[:, 0]]

    def labels(self, images: list[np.ndarray], attribute: str, labels: list[str]) -> list[str | None]:
        texts = [f"a photo of a {label} {attribute}" if attribute not in label else label for label in labels]
        best = (self._image_features(images) @ self._text_features(texts).T).argmax(dim=-1)
        return [labels[int(i)] for i in best]

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        return self._image_features(images).numpy()

    def drift(self, with_adapter: list[np.ndarray], without: list[np.ndarray]) -> list[float]:
        cosine = (self._image_features(with_adapter) * self._image_features(without)).sum(dim=-1)
        return [float(1 - c) for c in cosine]


def _tensor(output):
    """transformers 5 may return a model output where 4 returned the tensor."""
    return output if hasattr(output, "norm") else output.pooler_output


def scorer_for(base: str, clip: Path | None) -> Scorer:
    if clip is not None:
        return ClipScorer(clip)
    if base != "toy":
        raise ValueError("evaluating a real base needs --clip DIR (a local CLIP model folder)")
    return ToyScorer()
