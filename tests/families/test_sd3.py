"""The SD 3.5 family (the third family, added as one module and its tiny base): `tiny-sd3`'s export,
LoRA files as diffusers' SD3 pipeline writes them, and the serving engine against plain
`StableDiffusion3Pipeline` + `load_lora_weights`; textual inversion refused, as SD3 loads none."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_same_model
from peft_files import add_random_lora
from safetensors.torch import save_file

from lorafleet.accelerator import resolve_placement
from lorafleet.bases import base_spec, export_base, load_base
from lorafleet.registry import AdapterRegistry, PublishRequest
from lorafleet.registry.errors import AdapterIncompatible
from lorafleet.serve.adapter_cache import AdapterFetcher
from lorafleet.serve.engine import PipelineEngine
from lorafleet.serve.jobs import AdapterUse, BatchRequest, GenerationJob

PROMPT, STEPS, GUIDANCE, SIZE, TOLERANCE = "a red circle on the left", 4, 5.0, 64, 1e-4


def diffusers_sd3_lora(directory, seed: int, targets, text_encoders: bool = False):
    """An SD3 LoRA as diffusers' SD3 training script writes it (peft layers, `save_lora_weights`
    with the adapter metadata), on the transformer and, optionally, both CLIP encoders."""
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    pipe = load_base("tiny-sd3").pipeline
    layers, metadata = {}, {}
    parts = [("transformer", targets)] + [(name, ["q_proj", "v_proj"]) for name in ("text_encoder", "text_encoder_2")
                                          if text_encoders]
    for index, (component, component_targets) in enumerate(parts):
        model = getattr(pipe, component)
        config = add_random_lora(model, component_targets, seed + index)
        layers[f"{component}_lora_layers"] = get_peft_model_state_dict(model)
        metadata[f"{component}_lora_adapter_metadata"] = config.to_dict()
    StableDiffusion3Pipeline.save_lora_weights(str(directory), **layers, **metadata)
    return directory / "pytorch_lora_weights.safetensors"


def plain_sd3_image(lora=None, seed: int = 0, prompt: str = PROMPT, pipe=None, **call) -> np.ndarray:
    pipe = pipe or load_base("tiny-sd3").pipeline
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    return pipe(prompt, num_inference_steps=STEPS, height=SIZE, width=SIZE, max_sequence_length=32,
                generator=torch.Generator().manual_seed(seed), output_type="np",
                **{"guidance_scale": GUIDANCE, **call}).images[0]


@pytest.fixture(scope="module")
def sd3_registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    files = {}
    for name, seed, targets, text in (("a", 1, ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj"], True),
                                      ("b", 2, ["ff.net.0.proj", "ff.net.2", "to_add_out"], False)):
        (root / name).mkdir()
        files[name] = diffusers_sd3_lora(root / name, seed, targets, text)
    registry = AdapterRegistry(f"file://{root / 'registry'}")
    for name, path in files.items():
        registry.publish(path, PublishRequest(name=name, base=base_spec("tiny-sd3")))
    return registry, files


def test_tiny_sd3_exports_a_directory_plain_diffusers_loads_and_lorafleet_detects(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    built = export_base("tiny-sd3", tmp_path / "sd3")
    plain = StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "sd3"), local_files_only=True)
    loaded = load_base(str(tmp_path / "sd3"))
    assert loaded.family.name == "sd3" and loaded.fingerprint == built.fingerprint and loaded.native_size == SIZE
    ours = load_base("tiny-sd3").pipeline
    assert_same_model(plain, ours, plain_sd3_image(pipe=plain), plain_sd3_image(pipe=ours))


def test_the_engine_serves_sd3_like_plain_diffusers(sd3_registry):
    """A mixed batch (two adapters, one with both CLIPs, and none; each image its own guidance and
    negative prompt), then fusing and the exact restore."""
    registry, files = sd3_registry
    fetcher = AdapterFetcher(registry, host_bytes=64 * 1024**2, disk=None)
    engine = PipelineEngine(load_base("tiny-sd3").pipeline, resolve_placement("cpu"), fuse_after=1)
    jobs = {"a": GenerationJob(PROMPT, "blue", STEPS, 4.0, SIZE, SIZE, (0,)),
            "b": GenerationJob("a green square", None, STEPS, 6.0, SIZE, SIZE, (1,)),
            None: GenerationJob(PROMPT, None, STEPS, GUIDANCE, SIZE, SIZE, (2,))}

    def expected(name):
        job = jobs[name]
        return plain_sd3_image(files[name] if name else None, seed=job.seeds[0], prompt=job.prompt,
                               negative_prompt=job.negative_prompt, guidance_scale=job.guidance_scale)

    requests = [BatchRequest(tuple(AdapterUse(fetcher.fetch(registry.resolve(n)).adapter, 1.0) for n in [n] if n),
                             jobs[n]) for n in jobs]
    for name, result in zip(jobs, engine.run_batch(requests)):
        assert result.mode == "mixed" and np.abs(result.images[0] - expected(name)).max() <= TOLERANCE, name
    pristine = {k: v.clone() for k, v in engine.pipe.transformer.state_dict().items()}
    for _ in range(2):
        fused = engine.run_batch([requests[0]])[0]
        assert np.abs(fused.images[0] - expected("a")).max() <= TOLERANCE
    assert fused.mode == "fused"
    base = engine.run_batch([requests[2]])[0]
    assert np.abs(base.images[0] - expected(None)).max() <= TOLERANCE
    now = {k.replace(".base_layer", ""): v for k, v in engine.pipe.transformer.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(now[k], pristine[k.replace(".base_layer", "")]) for k in now)


def test_embeddings_and_kohya_export_are_refused_naming_why(sd3_registry, tmp_path):
    from lorafleet.registry.errors import InvalidAdapter
    from lorafleet.registry.formats import payload_from_stored
    from lorafleet.registry.kohya import to_kohya

    registry, _ = sd3_registry
    path = tmp_path / "tok.safetensors"
    save_file({"<tok>": torch.randn(1, 32)}, str(path))
    with pytest.raises(AdapterIncompatible, match="Stable Diffusion 3.5 pipelines load no textual-inversion"):
        registry.publish(path, PublishRequest(name="tok", base=base_spec("tiny-sd3")))
    with pytest.raises(InvalidAdapter, match="no kohya layout"):
        to_kohya(payload_from_stored(registry.read_blob(registry.resolve("a"))), base_spec("tiny-sd3"))


def test_sd3_through_the_hot_swap_slot_and_from_a_peft_folder(sd3_registry, tmp_path):
    """The compile-safe slot (transformer and both CLIPs), and a peft `save_pretrained` folder of the
    transformer, served as peft itself loads it."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from lorafleet.serve.slots import LoraSlot

    registry, files = sd3_registry
    fetcher = AdapterFetcher(registry, host_bytes=64 * 1024**2, disk=None)
    pipe = load_base("tiny-sd3").pipeline
    engine = PipelineEngine(pipe, resolve_placement("cpu"), slot=LoraSlot(pipe, target_rank=8))
    job = GenerationJob(PROMPT, None, STEPS, GUIDANCE, SIZE, SIZE, (0,))
    for name in ("a", None, "b"):
        uses = (AdapterUse(fetcher.fetch(registry.resolve(name)).adapter, 1.0),) if name else ()
        result = engine.run_batch([BatchRequest(uses, job)])[0]
        expected = plain_sd3_image(files[name] if name else None)
        assert result.mode == "slot" and np.abs(result.images[0] - expected).max() <= TOLERANCE, name
    torch.manual_seed(9)
    peft_model = get_peft_model(load_base("tiny-sd3").pipeline.transformer,
                                LoraConfig(r=2, lora_alpha=6, target_modules=["to_k", "ff.net.2"],
                                           init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    registry.publish(tmp_path / "peft", PublishRequest(name="peft", base=base_spec("tiny-sd3")))
    served = PipelineEngine(load_base("tiny-sd3").pipeline, resolve_placement("cpu")).run_batch(
        [BatchRequest((AdapterUse(fetcher.fetch(registry.resolve("peft")).adapter, 1.0),), job)])[0]
    reference = load_base("tiny-sd3").pipeline
    PeftModel.from_pretrained(reference.transformer, str(tmp_path / "peft"))
    assert np.abs(served.images[0] - plain_sd3_image(pipe=reference)).max() <= TOLERANCE
    assert np.abs(served.images[0] - plain_sd3_image()).max() > 1e-3
