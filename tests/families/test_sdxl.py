"""The SDXL family end to end where it works today: the built-in `tiny-sdxl` base, its export and
detection, LoRA files as diffusers' SDXL pipeline and kohya write them, family mismatches, and
the serving engine against plain diffusers `StableDiffusionXLPipeline` + `load_lora_weights`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from peft_files import add_random_lora
from safetensors.torch import save_file

from lorafleet.accelerator import resolve_placement
from lorafleet.bases import base_spec, export_base, load_base
from lorafleet.registry import AdapterRegistry, PublishRequest
from lorafleet.registry.errors import AdapterIncompatible
from lorafleet.registry.formats import payload_from_stored
from lorafleet.registry.kohya import to_kohya
from lorafleet.serve.adapter_cache import AdapterFetcher
from lorafleet.serve.engine import PipelineEngine
from lorafleet.serve.jobs import AdapterUse, BatchRequest, GenerationJob

PROMPT, STEPS, GUIDANCE = "a red circle on the left", 4, 5.0
TOLERANCE = 1e-4
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def diffusers_sdxl_lora(directory, seed: int, text_encoders: bool = False):
    """An SDXL LoRA as diffusers' SDXL training script writes it: peft layers on the UNet (and both
    text encoders), ``save_lora_weights`` with the adapter metadata. Random, non-zero B."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    pipe = load_base("tiny-sdxl").pipeline
    torch.manual_seed(seed)
    layers, metadata = {}, {}
    parts = [("unet", UNET_TARGETS)] + ([("text_encoder", TEXT_TARGETS), ("text_encoder_2", TEXT_TARGETS)]
                                        if text_encoders else [])
    for component, targets in parts:
        model = getattr(pipe, component)
        config = add_random_lora(model, targets, seed=None)
        layers[f"{component}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
        metadata[f"{component}_lora_adapter_metadata"] = config.to_dict()
    StableDiffusionXLPipeline.save_lora_weights(str(directory), **layers, **metadata)
    return directory / "pytorch_lora_weights.safetensors"


def plain_sdxl_image(lora_file=None, seed: int = 0, prompt: str = PROMPT) -> np.ndarray:
    pipe = load_base("tiny-sdxl").pipeline
    if lora_file is not None:
        pipe.load_lora_weights(str(lora_file))
    return pipe(prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=32, width=32,
                generator=torch.Generator().manual_seed(seed), output_type="np").images[0]


@pytest.fixture(scope="module")
def sdxl_spec():
    return base_spec("tiny-sdxl")


@pytest.fixture(scope="module")
def sdxl_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-loras")
    files = {}
    for index in range(3):
        (root / f"d{index}").mkdir()
        files[f"sdxl{index}"] = diffusers_sdxl_lora(root / f"d{index}", seed=40 + index, text_encoders=index == 0)
    return files


@pytest.fixture(scope="module")
def sdxl_registry(tmp_path_factory, sdxl_spec, sdxl_files):
    registry = AdapterRegistry(f"file://{tmp_path_factory.mktemp('sdxl-registry') / 'r'}")
    for name, path in sdxl_files.items():
        registry.publish(path, PublishRequest(name=name, base=sdxl_spec))
    kohya, metadata = to_kohya(payload_from_stored(registry.read_blob(registry.resolve("sdxl0"))), sdxl_spec)
    kohya_file = tmp_path_factory.mktemp("kohya") / "sdxl0-kohya.safetensors"
    save_file(kohya, str(kohya_file), metadata=metadata)
    sdxl_files["kohya0"] = kohya_file
    registry.publish(kohya_file, PublishRequest(name="kohya0", base=sdxl_spec))
    return registry


def test_tiny_sdxl_exports_a_directory_plain_diffusers_loads_and_lorafleet_detects(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    built = export_base("tiny-sdxl", tmp_path / "sdxl")
    plain = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "sdxl"), local_files_only=True)
    assert type(plain).__name__ == "StableDiffusionXLPipeline"
    loaded = load_base(str(tmp_path / "sdxl"))
    assert loaded.family.name == "sdxl" and loaded.fingerprint == built.fingerprint
    assert load_base("tiny").fingerprint != built.fingerprint
    result = subprocess.run([sys.executable, "-m", "lorafleet.cli", "base", "fingerprint", str(tmp_path / "sdxl"),
                             "--json"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout) == {"base": loaded.id, "family": "sdxl", "fingerprint": built.fingerprint}


def test_the_spec_knows_both_text_encoders_and_sgm_names(sdxl_spec):
    assert sdxl_spec.family == "sdxl"
    assert sdxl_spec.lora_components == ("unet", "text_encoder", "text_encoder_2")
    names = sdxl_spec.kohya_names["unet"]
    assert names["input_blocks_4_1_transformer_blocks_0_attn1_to_q"] == \
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert names["middle_block_1_proj_in"] == "mid_block.attentions.0.proj_in"
    assert names["output_blocks_2_2_conv"] == "up_blocks.0.upsamplers.0.conv"


def test_a_diffusers_sdxl_lora_round_trips_through_the_registry(sdxl_registry, sdxl_files, tmp_path):
    manifest = sdxl_registry.resolve("sdxl0")
    assert set(manifest.components) == {"unet", "text_encoder", "text_encoder_2"}
    _, pulled = sdxl_registry.pull("sdxl0", tmp_path)
    original, served = plain_sdxl_image(sdxl_files["sdxl0"]), plain_sdxl_image(pulled)
    assert np.abs(original - served).max() <= 1e-6
    assert np.abs(original - plain_sdxl_image()).max() > 1e-3  # the adapter does change the image


def test_the_kohya_export_means_the_same_adapter_to_diffusers_kohya_loader(sdxl_registry, sdxl_files):
    kohya_keys = set(json.loads(sdxl_files["kohya0"].read_bytes()[8:8 + int.from_bytes(
        sdxl_files["kohya0"].read_bytes()[:8], "little")]))
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in kohya_keys)
    assert any(k.startswith("lora_te2_") for k in kohya_keys)
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") for k in kohya_keys)
    original = plain_sdxl_image(sdxl_files["sdxl0"])
    assert np.abs(plain_sdxl_image(sdxl_files["kohya0"]) - original).max() <= TOLERANCE
    assert sdxl_registry.resolve("kohya0").source_format == "kohya"


def test_an_adapter_for_another_family_is_refused_naming_both(sdxl_registry, sdxl_files, tiny_spec, tmp_path):
    registry = AdapterRegistry(f"file://{tmp_path / 'sd1'}")
    with pytest.raises(AdapterIncompatible) as refused:
        registry.publish(sdxl_files["sdxl0"], PublishRequest(name="wrong", base=tiny_spec))
    assert "Stable Diffusion XL" in str(refused.value) and "Stable Diffusion 1.x/2.x" in str(refused.value)
    with pytest.raises(AdapterIncompatible) as refused:
        registry.publish(sdxl_files["kohya0"], PublishRequest(name="wrong", base=tiny_spec))
    assert "Stable Diffusion XL" in str(refused.value)
    assert registry.list() == []  # nothing was stored


def _uses(fetcher, registry, refs):
    return tuple(AdapterUse(fetcher.fetch(registry.resolve(ref)).adapter, 1.0) for ref in refs)


def test_the_engine_serves_sdxl_like_plain_diffusers_across_swaps_fuses_and_evictions(sdxl_registry, sdxl_files):
    """Diffusers and kohya files; routed (mixed) batches, fusing, eviction and reload."""
    fetcher = AdapterFetcher(sdxl_registry, host_bytes=64 * 1024**2, disk=None)
    engine = PipelineEngine(load_base("tiny-sdxl").pipeline, resolve_placement("cpu"), max_active=2, fuse_after=2)
    pristine = {name: {k: v.clone() for k, v in getattr(engine.pipe, name).state_dict().items()}
                for name in ("unet", "text_encoder", "text_encoder_2")}
    references = {name: plain_sdxl_image(path) for name, path in sdxl_files.items()}
    references[None] = plain_sdxl_image()
    job = GenerationJob(PROMPT, None, STEPS, GUIDANCE, 32, 32, (0,))
    modes, events = set(), []
    for names in (["sdxl0", "sdxl1", None], ["sdxl1"], ["sdxl1"], ["sdxl1"], ["kohya0"], ["sdxl2"], ["kohya0"],
                  ["kohya0"], ["sdxl0", "kohya0", "sdxl2"], [None]):
        requests = [BatchRequest(_uses(fetcher, sdxl_registry, [n]) if n else (), job) for n in names]
        for name, result in zip(names, engine.run_batch(requests)):
            modes.add(result.mode)
            events += result.fuse_events
            assert np.abs(result.images[0] - references[name]).max() <= TOLERANCE, (name, result.mode)
    assert {"mixed", "fused", "base"} <= modes and "unfuse" in events
    for name, weights in pristine.items():  # left the fused state: the base is bit-identical again
        now = {k.replace(".base_layer", ""): v for k, v in getattr(engine.pipe, name).state_dict().items()
               if "lora_" not in k}
        assert set(now) == set(weights) and all(torch.equal(now[k], weights[k]) for k in weights), name


def test_every_route_serves_tiny_sdxl_over_http(sdxl_registry, sdxl_files, tmp_path):
    """`lorafleet serve --base tiny-sdxl`'s app on loopback (no Ray): sizes follow the family's base,
    adapters apply, the official openai client works, the adapter and alias routes answer."""
    import base64
    import io

    import httpx
    import openai
    from PIL import Image

    from lorafleet.local_cluster import free_port
    from lorafleet.serve.server import serving_in_thread
    from lorafleet.serve.service import decode_npy
    from lorafleet.serve.settings import ServeSettings

    settings = ServeSettings(base="tiny-sdxl", registry=sdxl_registry.uri, host="127.0.0.1", port=free_port(),
                             cache={"disk_dir": str(tmp_path / "cache")})
    with serving_in_thread(settings, sdxl_registry) as url, httpx.Client(base_url=url, timeout=300) as client:
        ready = client.get("/readyz").json()
        assert ready["family"] == "sdxl" and ready["base"] == "tiny-sdxl"
        body = {"prompt": PROMPT, "adapter": "kohya0", "seed": 0, "steps": STEPS, "guidance_scale": GUIDANCE,
                "output_format": "npy"}
        answer = client.post("/v1/generate", json=body)
        assert answer.status_code == 200, answer.text
        image = decode_npy(answer.json()["images"][0])
        assert image.shape == (32, 32, 3)  # the base's native size
        assert np.abs(image - plain_sdxl_image(sdxl_files["kohya0"])).max() <= TOLERANCE
        assert {a["name"] for a in client.get("/v1/adapters").json()} >= {"sdxl0", "kohya0"}
        assert client.get("/v1/adapters/sdxl1").json()["name"] == "sdxl1"
        moved = client.put("/v1/adapters/sdxl1/aliases/prod", json={"version": 1})
        assert moved.status_code == 200, moved.text
        openai_client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        generated = openai_client.images.generate(prompt=PROMPT, model="sdxl1:prod", n=1, size="32x32")
        png = Image.open(io.BytesIO(base64.b64decode(generated.data[0].b64_json)))
        assert png.size == (32, 32)
        assert "lorafleet_requests" in client.get("/metrics").text


def test_an_a1111_sdxl_embedding_serves_on_both_encoders_like_diffusers(sdxl_spec, tiny_spec, tmp_path):
    """An SDXL textual inversion as A1111/civitai files hold it (clip_l, clip_g; the token is the file
    name), served by the engine = diffusers' documented two-call loading; each family refuses the
    other's embeddings."""
    from safetensors.torch import load_file

    torch.manual_seed(5)
    path = tmp_path / "shinytok.safetensors"
    save_file({"clip_l": torch.randn(2, 32) * 0.5, "clip_g": torch.randn(2, 64) * 0.5}, str(path))
    registry = AdapterRegistry(f"file://{tmp_path / 'r'}")
    manifest = registry.publish(path, PublishRequest(name="shiny", base=sdxl_spec))
    assert manifest.trigger_tokens == ["shinytok"]
    fetcher = AdapterFetcher(registry, host_bytes=64 * 1024**2, disk=None)
    engine = PipelineEngine(load_base("tiny-sdxl").pipeline, resolve_placement("cpu"))
    job = GenerationJob("a shinytok circle", None, STEPS, GUIDANCE, 32, 32, (0,))
    served = engine.run_batch([BatchRequest(_uses(fetcher, registry, ["shiny"]), job)])[0].images[0]
    pipe = load_base("tiny-sdxl").pipeline
    state = load_file(str(path))
    pipe.load_textual_inversion(state["clip_l"], token="shinytok", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="shinytok", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    plain = pipe("a shinytok circle", num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=32, width=32,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert np.abs(served - plain).max() <= TOLERANCE
    after = engine.run_batch([BatchRequest((), job)])[0].images[0]  # the token is plain text again
    assert np.abs(after - plain_sdxl_image(prompt="a shinytok circle")).max() <= TOLERANCE
    with pytest.raises(AdapterIncompatible, match="Stable Diffusion XL"):
        AdapterRegistry(f"file://{tmp_path / 'sd1'}").publish(path, PublishRequest(name="x", base=tiny_spec))
    sd1_embedding = tmp_path / "sd1.safetensors"
    save_file({"<tok>": torch.randn(1, 32)}, str(sd1_embedding))
    with pytest.raises(AdapterIncompatible, match="Stable Diffusion 1"):
        registry.publish(sd1_embedding, PublishRequest(name="y", base=sdxl_spec))


def test_sdxl_through_the_hot_swap_slot_and_on_peft_layers(sdxl_registry, sdxl_files, sdxl_spec, tmp_path):
    """The compile-safe slot (LoRA on the UNet and both text encoders), and a convolution LoRA
    (not routable: its pass runs on peft layers), each equal to plain diffusers."""
    from lorafleet.serve.slots import SLOT, LoraSlot
    from lorafleet.synthetic import synthetic_lora

    fetcher = AdapterFetcher(sdxl_registry, host_bytes=64 * 1024**2, disk=None)
    pipe = load_base("tiny-sdxl").pipeline
    engine = PipelineEngine(pipe, resolve_placement("cpu"), slot=LoraSlot(pipe, target_rank=8))
    job = GenerationJob(PROMPT, None, STEPS, GUIDANCE, 32, 32, (0,))
    for name in ("sdxl0", "kohya0", None, "sdxl1"):
        result = engine.run_batch([BatchRequest(_uses(fetcher, sdxl_registry, [name]) if name else (), job)])[0]
        expected = plain_sdxl_image(sdxl_files[name]) if name else plain_sdxl_image()
        assert result.mode == "slot" and np.abs(result.images[0] - expected).max() <= TOLERANCE, name
    assert engine.slot.adapter_names() == {SLOT}
    conv = tmp_path / "conv.safetensors"
    conv.write_bytes(synthetic_lora(sdxl_spec, seed=7, targets=("conv1", "conv2")).to_bytes())
    sdxl_registry.publish(conv, PublishRequest(name="conv", base=sdxl_spec))
    _, pulled = sdxl_registry.pull("conv", tmp_path / "pulled")
    plain_engine = PipelineEngine(load_base("tiny-sdxl").pipeline, resolve_placement("cpu"))
    result = plain_engine.run_batch([BatchRequest(_uses(fetcher, sdxl_registry, ["conv"]), job)])[0]
    assert result.mode == "active" and np.abs(result.images[0] - plain_sdxl_image(pulled)).max() <= TOLERANCE


def test_a_weighted_composition_of_sdxl_adapters_matches_diffusers_set_adapters(sdxl_registry, sdxl_files):
    """Two adapters in one request (one with both text encoders), weighted, in a mixed batch."""
    fetcher = AdapterFetcher(sdxl_registry, host_bytes=64 * 1024**2, disk=None)
    engine = PipelineEngine(load_base("tiny-sdxl").pipeline, resolve_placement("cpu"))
    composed = tuple(AdapterUse(fetcher.fetch(sdxl_registry.resolve(ref)).adapter, weight)
                     for ref, weight in (("sdxl0", 0.7), ("sdxl2", 0.4)))
    job = GenerationJob(PROMPT, None, STEPS, GUIDANCE, 32, 32, (0,))
    results = engine.run_batch([BatchRequest(composed, job), BatchRequest(_uses(fetcher, sdxl_registry, ["sdxl1"]), job)])
    pipe = load_base("tiny-sdxl").pipeline
    pipe.load_lora_weights(str(sdxl_files["sdxl0"]), adapter_name="a")
    pipe.load_lora_weights(str(sdxl_files["sdxl2"]), adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.4])
    expected = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=32, width=32,
                    generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert results[0].mode == "mixed" and np.abs(results[0].images[0] - expected).max() <= TOLERANCE
    assert np.abs(results[1].images[0] - plain_sdxl_image(sdxl_files["sdxl1"])).max() <= TOLERANCE
