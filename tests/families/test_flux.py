"""The Flux family end to end: the built-in `tiny-flux` base, its export, a single-file transformer
checkpoint in Black Forest Labs' layout, LoRA files as users have them (diffusers' FluxPipeline
`save_lora_weights`, a peft folder, ai-toolkit, XLabs, kohya with fused qkv), textual inversion on
CLIP, and the serving engine and HTTP app against plain diffusers `FluxPipeline` + `load_lora_weights`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import assert_same_model
from peft_files import add_random_lora
from safetensors.torch import load_file, save_file

from lorafleet.accelerator import resolve_placement
from lorafleet.bases import base_spec, export_base, load_base
from lorafleet.errors import BaseModelError
from lorafleet.families.flux_layout import to_bfl
from lorafleet.registry import AdapterRegistry, PublishRequest
from lorafleet.registry.errors import AdapterIncompatible
from lorafleet.registry.formats import payload_from_stored
from lorafleet.registry.kohya import to_kohya
from lorafleet.serve.adapter_cache import AdapterFetcher
from lorafleet.serve.engine import PipelineEngine
from lorafleet.serve.jobs import AdapterUse, BatchRequest, GenerationJob

PROMPT, STEPS, GUIDANCE, SIZE = "a red circle on the left", 4, 3.5, 64
TOLERANCE = 1e-4
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
EVERY_LINEAR = ATTENTION + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
                            "proj_out", "norm1.linear", "norm1_context.linear", "norm.linear"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
DOUBLE_BLOCKS_ONLY = r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)|ff\.net\.2)"
# (diffusers' kohya Flux loader splits a single block's linear1 by real Flux's widths, 3072 and 12288, so
# it reads a tiny base's kohya file only without single blocks; the real-width test below covers them)


def diffusers_flux_lora(directory, seed: int, targets=ATTENTION, text_encoder: bool = False):
    """A Flux LoRA as diffusers' Flux training script writes it: peft layers on the transformer (and
    CLIP), `FluxPipeline.save_lora_weights` with the adapter metadata."""
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    pipe = load_base("tiny-flux").pipeline
    layers, metadata = {}, {}
    parts = [("transformer", targets)] + ([("text_encoder", TEXT_TARGETS)] if text_encoder else [])
    for index, (component, component_targets) in enumerate(parts):
        model = getattr(pipe, component)
        config = add_random_lora(model, component_targets, seed + index)
        layers[f"{component}_lora_layers"] = get_peft_model_state_dict(model)
        metadata[f"{component}_lora_adapter_metadata"] = config.to_dict()
    FluxPipeline.save_lora_weights(str(directory), **layers, **metadata)
    return directory / "pytorch_lora_weights.safetensors"


def peft_folder(directory, seed: int):
    """`PeftModel.save_pretrained` of the transformer: base_model.model.* keys + adapter_config.json."""
    from peft import LoraConfig, get_peft_model

    transformer = load_base("tiny-flux").pipeline.transformer
    torch.manual_seed(seed)
    model = get_peft_model(transformer, LoraConfig(r=2, lora_alpha=6, target_modules=["proj_mlp", "to_out.0"],
                                                   init_lora_weights=False))
    model.save_pretrained(str(directory))
    return directory


def ai_toolkit_file(path, seed: int):
    """ai-toolkit's diffusers layout: `transformer.` keys, no peft config (alpha = rank), its `software`
    header entry."""
    transformer = load_base("tiny-flux").pipeline.transformer
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in transformer.named_modules():
        if name.endswith(("attn.to_q", "attn.to_k", "proj_mlp")):
            tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(4, module.in_features, generator=generator) * 0.2
            tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, 4, generator=generator) * 0.2
    save_file(tensors, str(path), metadata={"format": "pt", "software": json.dumps({"name": "ai-toolkit"}),
                                             "training_info": json.dumps({"step": 1000})})
    return path


def xlabs_file(path, seed: int):
    """XLabs' layout: `double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight` (1: image
    stream, 2: text stream), no alpha."""
    config = load_base("tiny-flux").pipeline.transformer.config
    inner = config.num_attention_heads * config.attention_head_dim
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for block in range(config.num_layers):
        for stream in ("1", "2"):
            for kind, out in (("qkv", 3 * inner), ("proj", inner)):
                key = f"double_blocks.{block}.processor.{kind}_lora{stream}"
                tensors[f"{key}.down.weight"] = torch.randn(4, inner, generator=generator) * 0.2
                tensors[f"{key}.up.weight"] = torch.randn(out, 4, generator=generator) * 0.2
    save_file(tensors, str(path))
    return path


def plain_flux_image(lora=None, seed: int = 0, prompt: str = PROMPT, pipe=None, guidance_scale: float = GUIDANCE,
                     **call) -> np.ndarray:
    pipe = pipe or load_base("tiny-flux").pipeline
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    return pipe(prompt, num_inference_steps=STEPS, guidance_scale=guidance_scale, height=SIZE, width=SIZE,
                generator=torch.Generator().manual_seed(seed), output_type="np", max_sequence_length=32,
                **call).images[0]


@pytest.fixture(scope="module")
def flux_spec():
    return base_spec("tiny-flux")


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-loras")
    for name in ("d0", "d1", "d2", "d3", "peft"):
        (root / name).mkdir()
    return {
        "flux0": diffusers_flux_lora(root / "d0", seed=40, targets=EVERY_LINEAR, text_encoder=True),
        "flux1": diffusers_flux_lora(root / "d1", seed=41),
        "flux2": diffusers_flux_lora(root / "d2", seed=42, targets=["proj_mlp", "proj_out", "ff.net.2"]),
        "flux3": diffusers_flux_lora(root / "d3", seed=46, targets=DOUBLE_BLOCKS_ONLY, text_encoder=True),
        "peft": peft_folder(root / "peft", seed=43),
        "aitk": ai_toolkit_file(root / "aitk.safetensors", seed=44),
        "xlabs": xlabs_file(root / "xlabs.safetensors", seed=45),
    }


@pytest.fixture(scope="module")
def flux_registry(tmp_path_factory, flux_spec, flux_files):
    registry = AdapterRegistry(f"file://{tmp_path_factory.mktemp('flux-registry') / 'r'}")
    for name, path in flux_files.items():
        registry.publish(path, PublishRequest(name=name, base=flux_spec))
    for source, name in (("flux0", "kohya0"), ("flux3", "kohya3")):
        kohya, metadata = to_kohya(payload_from_stored(registry.read_blob(registry.resolve(source))), flux_spec)
        kohya_file = tmp_path_factory.mktemp("kohya") / f"{name}.safetensors"
        save_file(kohya, str(kohya_file), metadata=metadata)
        flux_files[name] = kohya_file
        registry.publish(kohya_file, PublishRequest(name=name, base=flux_spec))
    return registry


def peft_image(folder) -> np.ndarray:
    """A peft folder as peft users load it (diffusers' Flux loader takes files in its own layouts)."""
    from peft import PeftModel

    pipe = load_base("tiny-flux").pipeline
    PeftModel.from_pretrained(pipe.transformer, str(folder))  # injects into the pipeline's transformer
    return plain_flux_image(pipe=pipe)


@pytest.fixture(scope="module")
def references(flux_registry, flux_files):
    """Each file as plain diffusers (peft, for the peft folder) reads it: the image the server must give."""
    images = {name: plain_flux_image(path) for name, path in flux_files.items() if name not in ("peft", "kohya0")}
    assert np.abs(images["kohya3"] - images["flux3"]).max() <= TOLERANCE  # the export means the same to diffusers
    return images | {"peft": peft_image(flux_files["peft"]), "kohya0": images["flux0"], None: plain_flux_image()}


def test_tiny_flux_exports_a_directory_plain_diffusers_loads_and_lorafleet_detects(tmp_path):
    from diffusers import FluxPipeline

    built = export_base("tiny-flux", tmp_path / "flux")
    plain = FluxPipeline.from_pretrained(str(tmp_path / "flux"), local_files_only=True)
    assert type(plain).__name__ == "FluxPipeline"
    loaded = load_base(str(tmp_path / "flux"))
    assert loaded.family.name == "flux" and loaded.fingerprint == built.fingerprint and loaded.native_size == 64
    ours = load_base("tiny-flux").pipeline
    assert_same_model(plain, ours, plain_flux_image(pipe=plain), plain_flux_image(pipe=ours))


def test_a_bfl_single_file_transformer_loads_with_its_directory_and_draws_the_same(tmp_path):
    """A transformer checkpoint in BFL's layout (fused qkv, swapped final modulation; ComfyUI's
    `model.diffusion_model.` prefix), its other parts from a Flux directory; refused without one."""
    export_base("tiny-flux", tmp_path / "flux")
    transformer = load_base("tiny-flux").pipeline.transformer
    checkpoint = {f"model.diffusion_model.{k}": v.contiguous() for k, v in
                  to_bfl(transformer.state_dict(), transformer.config).items()}
    assert "model.diffusion_model.double_blocks.0.img_attn.qkv.weight" in checkpoint
    assert "model.diffusion_model.single_blocks.1.linear1.weight" in checkpoint
    single = tmp_path / "flux1-tiny.safetensors"
    save_file(checkpoint, str(single))
    loaded = load_base(str(single), base_config=str(tmp_path / "flux"))
    assert loaded.family.name == "flux"
    ours = load_base("tiny-flux").pipeline
    assert_same_model(loaded.pipeline, ours, plain_flux_image(pipe=loaded.pipeline), plain_flux_image(pipe=ours))
    with pytest.raises(BaseModelError, match="base-config"):
        load_base(str(single))


def test_the_cli_exports_the_bfl_file_and_fingerprints_it_with_its_directory(tmp_path):
    import subprocess
    import sys

    def cli(*args):
        result = subprocess.run([sys.executable, "-m", "lorafleet.cli", *args, "--json"], capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout)

    directory = cli("base", "export", "tiny-flux", str(tmp_path / "flux"))
    exported = cli("base", "export", "tiny-flux", str(tmp_path / "flux1.safetensors"), "--format", "single-file")
    assert exported["family"] == "flux"
    assert set(load_file(str(tmp_path / "flux1.safetensors"))) >= {"double_blocks.0.img_attn.qkv.weight",
                                                                   "final_layer.adaLN_modulation.1.weight"}
    printed = cli("base", "fingerprint", str(tmp_path / "flux1.safetensors"), "--base-config", str(tmp_path / "flux"))
    assert printed["family"] == "flux" and printed["fingerprint"] == directory["fingerprint"]


def test_flow_matching_draws_sigmas_as_the_trainers_do():
    from lorafleet.families import FLUX, ObjectiveOptions
    from lorafleet.families.flow_matching import inference_shift, sample_sigmas, shifted

    generator = torch.Generator().manual_seed(0)
    for sampling in ("sigmoid", "logit_normal", "uniform"):
        sigmas = sample_sigmas(20_000, ObjectiveOptions(timestep_sampling=sampling), generator)
        assert 0 < float(sigmas.min()) and float(sigmas.max()) < 1 and abs(float(sigmas.mean()) - 0.5) < 0.01
    narrow = sample_sigmas(20_000, ObjectiveOptions(timestep_sampling="logit_normal", logit_std=0.3), generator)
    assert float(narrow.std()) < 0.1
    assert torch.allclose(shifted(torch.tensor([0.0, 0.5, 1.0]), 3.0), torch.tensor([0.0, 0.75, 1.0]))
    pipe = load_base("tiny-flux").pipeline
    assert inference_shift(pipe.scheduler.config, 256) == pytest.approx(np.exp(0.5))  # base_shift at 256 tokens
    objective = FLUX.training_objective(pipe, ObjectiveOptions(shift=3.0))
    latents = torch.randn(4, 16, 8, 8)
    noised = objective.noised(latents, torch.Generator().manual_seed(1))
    sigma = (noised.timesteps / 1000).view(-1, 1, 1, 1)
    noise = noised.target + latents  # the target is the velocity noise - x0
    assert torch.allclose(noised.noisy, (1 - sigma) * latents + sigma * noise, atol=1e-5)
    hidden, pooled = FLUX.encode_for_training(pipe, ["a red circle"] * 4, torch.device("cpu"))
    velocity = objective.predict(noised.noisy, noised.timesteps, hidden, pooled, None)
    assert velocity.shape == latents.shape


def test_the_spec_knows_clip_only_and_bfl_names(flux_spec):
    assert flux_spec.family == "flux"
    assert flux_spec.lora_components == ("transformer", "text_encoder")  # T5 is never adapted
    assert flux_spec.kohya_names["transformer"]["double_blocks_0_img_attn_proj"] == "transformer_blocks.0.attn.to_out.0"
    assert flux_spec.kohya_groups["transformer"]["double_blocks_1_txt_attn_qkv"] == (
        ("transformer_blocks.1.attn.add_q_proj", "transformer_blocks.1.attn.add_k_proj",
         "transformer_blocks.1.attn.add_v_proj"), False)
    assert flux_spec.kohya_groups["transformer"]["single_blocks_0_linear1"][0][-1] == "single_transformer_blocks.0.proj_mlp"
    assert flux_spec.kohya_groups["transformer"]["final_layer_adaLN_modulation_1"] == (("norm_out.linear",), True)


@pytest.mark.parametrize("name", ["flux0", "peft", "aitk", "xlabs", "kohya0", "kohya3"])
def test_every_layout_is_stored_as_diffusers_reads_it(name, flux_registry, flux_files, references, tmp_path):
    """Published, pulled (the stored diffusers layout), loaded by plain diffusers: the image the
    original file gives diffusers, and a changed one."""
    manifest = flux_registry.resolve(name)
    expected_source = {"peft": "peft", "xlabs": "xlabs", "kohya0": "kohya"}.get(name)
    if expected_source:
        assert manifest.source_format == expected_source
    _, pulled = flux_registry.pull(name, tmp_path)
    assert np.abs(plain_flux_image(pulled) - references[name]).max() <= TOLERANCE
    assert np.abs(references[name] - references[None]).max() > 1e-3


def test_the_kohya_export_fuses_qkv_as_kohya_and_bfl_do(flux_files):
    keys = set(load_file(str(flux_files["kohya0"])))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight" in keys
    assert "lora_unet_single_blocks_1_linear1.alpha" in keys
    assert "lora_unet_single_blocks_0_linear2.lora_down.weight" in keys
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    assert not any("to_q" in k for k in keys)


def test_kohya_names_mean_what_diffusers_converter_says_at_real_flux_widths():
    """At real Flux-dev widths (a transformer on the meta device: no weights), a kohya file with a
    fused double-block qkv, a single block's linear1 (q, k, v, mlp) and the final layer's swapped
    modulation: every diffusers module gets the same update from lorafleet's reading as from
    diffusers' own converter."""
    from types import SimpleNamespace

    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from lorafleet.bases.spec import BaseSpec, ModuleShape
    from lorafleet.families import FLUX
    from lorafleet.registry.kohya import from_kohya

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(guidance_embeds=True)
    pipe = SimpleNamespace(transformer=transformer)
    modules = {name: ModuleShape("linear", (m.out_features, m.in_features))
               for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    spec = BaseSpec(id="flux-dev-shaped", fingerprint="sha256:0", modules={"transformer": modules}, parameters={},
                    text_hidden_size=768, family="flux", kohya_names={"transformer": FLUX.kohya_names(
                        pipe, "transformer", list(modules))}, kohya_groups={"transformer": FLUX.kohya_groups(
                            pipe, "transformer")})
    generator = torch.Generator().manual_seed(0)
    kohya = {}
    for name, rows in (("double_blocks_3_img_attn_qkv", 3 * 3072), ("single_blocks_7_linear1", 3 * 3072 + 12288),
                       ("final_layer_adaLN_modulation_1", 2 * 3072), ("double_blocks_0_txt_mlp_0", 12288)):
        kohya[f"lora_unet_{name}.lora_down.weight"] = torch.randn(4, 3072, generator=generator)
        kohya[f"lora_unet_{name}.lora_up.weight"] = torch.randn(rows, 4, generator=generator)
        kohya[f"lora_unet_{name}.alpha"] = torch.tensor(2.0)
    ours = from_kohya(dict(kohya), spec)
    theirs = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    config = ours.components["transformer"]
    assert len(config.target_modules) == 3 + 4 + 1 + 1
    for module in config.target_modules:
        scale = config.alpha_pattern.get(module, config.alpha) / config.rank_pattern.get(module, config.rank)
        delta = ours.tensors[f"transformer.{module}.lora_B.weight"] @ ours.tensors[f"transformer.{module}.lora_A.weight"]
        if module == "norm_out.linear":  # diffusers reads the final layer without its alpha ("TODO: alphas")
            expected = theirs[f"{module}.lora_B.weight"] @ theirs[f"{module}.lora_A.weight"] * scale
        else:
            expected = theirs[f"transformer.{module}.lora_B.weight"] @ theirs[f"transformer.{module}.lora_A.weight"]
        assert torch.allclose(delta * scale, expected, atol=1e-4), module


def test_an_adapter_of_another_family_is_refused_naming_both(flux_files, flux_registry, flux_spec, tiny_spec, tmp_path):
    registry = AdapterRegistry(f"file://{tmp_path / 'sd1'}")
    with pytest.raises(AdapterIncompatible, match="Flux"):
        registry.publish(flux_files["flux1"], PublishRequest(name="wrong", base=tiny_spec))
    with pytest.raises(AdapterIncompatible, match="Flux"):
        registry.publish(flux_files["kohya0"], PublishRequest(name="wrong", base=tiny_spec))
    sd1_kohya = tmp_path / "sd1-kohya.safetensors"
    save_file({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 32),
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(32, 2)},
              str(sd1_kohya))
    with pytest.raises(AdapterIncompatible, match="Stable Diffusion 1"):
        flux_registry.publish(sd1_kohya, PublishRequest(name="wrong", base=flux_spec))
    assert registry.list() == []


def _uses(fetcher, registry, refs, weight: float = 1.0):
    return tuple(AdapterUse(fetcher.fetch(registry.resolve(ref)).adapter, weight) for ref in refs)


def _job(**fields) -> GenerationJob:
    return GenerationJob(**{"prompt": PROMPT, "negative_prompt": None, "steps": STEPS, "guidance_scale": GUIDANCE,
                            "width": SIZE, "height": SIZE, "seeds": (0,), **fields})


def test_the_engine_serves_flux_like_plain_diffusers_across_swaps_fuses_and_evictions(flux_registry, references):
    """Every layout; routed (mixed) batches, fusing, eviction and reload; the base bit-identical after."""
    fetcher = AdapterFetcher(flux_registry, host_bytes=64 * 1024**2, disk=None)
    engine = PipelineEngine(load_base("tiny-flux").pipeline, resolve_placement("cpu"), max_active=2, fuse_after=2)
    pristine = {name: {k: v.clone() for k, v in getattr(engine.pipe, name).state_dict().items()}
                for name in ("transformer", "text_encoder")}
    modes, events = set(), []
    for names in (["flux0", "flux1", None], ["flux1"], ["flux1"], ["flux1"], ["kohya0"], ["xlabs"], ["kohya0"],
                  ["kohya0"], ["peft", "aitk", "flux2", "xlabs"], ["flux0"], [None]):
        requests = [BatchRequest(_uses(fetcher, flux_registry, [n]) if n else (), _job()) for n in names]
        for name, result in zip(names, engine.run_batch(requests)):
            modes.add(result.mode)
            events += result.fuse_events
            assert np.abs(result.images[0] - references[name]).max() <= TOLERANCE, (name, result.mode)
    assert {"mixed", "fused", "base"} <= modes and "unfuse" in events
    for name, weights in pristine.items():
        now = {k.replace(".base_layer", ""): v for k, v in getattr(engine.pipe, name).state_dict().items()
               if "lora_" not in k}
        assert set(now) == set(weights) and all(torch.equal(now[k], weights[k]) for k in weights), name


def test_guidance_is_per_image_and_true_cfg_runs_as_flux_pipeline_does(flux_registry, flux_files):
    """A mixed batch with each image's own guidance embedding; a true-CFG batch (negative prompts,
    per-image true_cfg_scale) with adapters: each image equals FluxPipeline's for its own call."""
    fetcher = AdapterFetcher(flux_registry, host_bytes=64 * 1024**2, disk=None)
    engine = PipelineEngine(load_base("tiny-flux").pipeline, resolve_placement("cpu"))
    plain = [_job(guidance_scale=1.5, seeds=(3,)), _job(guidance_scale=6.0, prompt="a blue square")]
    cfg = [_job(negative_prompt="green", true_cfg_scale=2.0), _job(negative_prompt="a cat", true_cfg_scale=4.0,
                                                                  seeds=(5,))]
    assert len({engine.batch_key((), job) for job in plain}) == 1
    assert engine.batch_key((), plain[0]) != engine.batch_key((), cfg[0])  # a second pass per step
    for jobs, adapter in ((plain, "flux1"), (cfg, "flux2")):
        results = engine.run_batch([BatchRequest(_uses(fetcher, flux_registry, [adapter]), job) for job in jobs])
        for job, result in zip(jobs, results):
            expected = plain_flux_image(flux_files[adapter], seed=job.seeds[0], prompt=job.prompt,
                                        negative_prompt=job.negative_prompt, true_cfg_scale=job.true_cfg_scale,
                                        guidance_scale=job.guidance_scale)
            assert result.mode == "mixed" and np.abs(result.images[0] - expected).max() <= TOLERANCE


def test_weighted_composition_and_the_slot_match_diffusers(flux_registry, flux_files, references):
    from lorafleet.serve.slots import LoraSlot

    fetcher = AdapterFetcher(flux_registry, host_bytes=64 * 1024**2, disk=None)
    composed = tuple(AdapterUse(fetcher.fetch(flux_registry.resolve(ref)).adapter, weight)
                     for ref, weight in (("flux0", 0.7), ("flux2", 0.4)))
    pipe = load_base("tiny-flux").pipeline
    pipe.load_lora_weights(str(flux_files["flux0"]), adapter_name="a")
    pipe.load_lora_weights(str(flux_files["flux2"]), adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.4])
    expected = plain_flux_image(pipe=pipe)
    engine = PipelineEngine(load_base("tiny-flux").pipeline, resolve_placement("cpu"))
    result = engine.run_batch([BatchRequest(composed, _job()), BatchRequest((), _job(seeds=(1,)))])[0]
    assert result.mode == "mixed" and np.abs(result.images[0] - expected).max() <= TOLERANCE
    slot_pipe = load_base("tiny-flux").pipeline
    slotted = PipelineEngine(slot_pipe, resolve_placement("cpu"), slot=LoraSlot(slot_pipe, target_rank=8))
    for name in ("kohya0", "flux1", None):
        result = slotted.run_batch([BatchRequest(_uses(fetcher, flux_registry, [name]) if name else (), _job())])[0]
        assert result.mode == "slot" and np.abs(result.images[0] - references[name]).max() <= TOLERANCE, name


def test_a_textual_inversion_serves_on_clip_like_diffusers(flux_spec, tmp_path):
    """A diffusers-format embedding ({token: vectors}); FluxPipeline loads it into CLIP (its default)."""
    torch.manual_seed(6)
    path = tmp_path / "learned_embeds.safetensors"
    save_file({"<shiny>": torch.randn(2, 32) * 0.5}, str(path))
    registry = AdapterRegistry(f"file://{tmp_path / 'r'}")
    registry.publish(path, PublishRequest(name="shiny", base=flux_spec))
    fetcher = AdapterFetcher(registry, host_bytes=64 * 1024**2, disk=None)
    engine = PipelineEngine(load_base("tiny-flux").pipeline, resolve_placement("cpu"))
    job = _job(prompt="a <shiny> circle")
    served = engine.run_batch([BatchRequest(_uses(fetcher, registry, ["shiny"]), job)])[0].images[0]
    pipe = load_base("tiny-flux").pipeline
    pipe.load_textual_inversion(str(path))
    assert np.abs(served - plain_flux_image(pipe=pipe, prompt="a <shiny> circle")).max() <= TOLERANCE
    assert np.abs(served - plain_flux_image(prompt="a <shiny> circle")).max() > 1e-3


def test_every_route_serves_tiny_flux_over_http(flux_registry, references, tmp_path):
    """`lorafleet serve --base tiny-flux`'s app on loopback: the family's size multiple (16) and
    guidance default (3.5), true CFG only where the family offers it, the openai client."""
    import httpx
    import openai

    from lorafleet.local_cluster import free_port
    from lorafleet.serve.server import serving_in_thread
    from lorafleet.serve.service import decode_npy
    from lorafleet.serve.settings import ServeSettings

    settings = ServeSettings(base="tiny-flux", registry=flux_registry.uri, host="127.0.0.1", port=free_port(),
                             limits={"max_steps": 8, "default_steps": 4}, cache={"disk_dir": str(tmp_path / "cache")})
    with serving_in_thread(settings, flux_registry) as url, httpx.Client(base_url=url, timeout=300) as client:
        assert client.get("/readyz").json()["family"] == "flux"
        schema = client.get("/openapi.json").json()["components"]["schemas"]["GenerateRequest"]["properties"]
        assert schema["width"]["anyOf"][0]["multipleOf"] == 16 and schema["true_cfg_scale"]["anyOf"][0]["maximum"] == 50
        body = {"prompt": PROMPT, "adapter": "kohya0", "seed": 0, "steps": STEPS, "output_format": "npy"}
        answer = client.post("/v1/generate", json=body)
        assert answer.status_code == 200, answer.text
        image = decode_npy(answer.json()["images"][0])
        assert image.shape == (64, 64, 3) and np.abs(image - references["kohya0"]).max() <= TOLERANCE
        refused = client.post("/v1/generate", json={**body, "width": 72})
        assert refused.status_code == 422 and "16" in refused.text and "width" in refused.text
        cfg = client.post("/v1/generate", json={**body, "negative_prompt": "blue", "true_cfg_scale": 2.0})
        assert cfg.status_code == 200, cfg.text
        generated = openai.OpenAI(base_url=f"{url}/v1", api_key="unused").images.generate(
            prompt=PROMPT, model="xlabs", n=1, size="64x64", response_format="b64_json")
        assert generated.data[0].b64_json


def test_true_cfg_is_refused_for_a_unet_family(tmp_path):
    from fastapi.testclient import TestClient

    from lorafleet.serve.app import create_local_app
    from lorafleet.serve.settings import ServeSettings

    registry = AdapterRegistry(f"file://{tmp_path / 'r'}")
    app, _ = create_local_app(ServeSettings(base="tiny", registry=registry.uri,
                                            cache={"disk_dir": str(tmp_path / "cache")}), registry)
    with TestClient(app) as client:
        answer = client.post("/v1/generate", json={"prompt": "a circle", "steps": 2, "true_cfg_scale": 3.0,
                                                   "negative_prompt": "red"})
        schema = client.get("/openapi.json").json()["components"]["schemas"]["GenerateRequest"]["properties"]
    assert answer.status_code == 422 and "true_cfg_scale" in answer.text
    assert schema["true_cfg_scale"]["anyOf"][0]["maximum"] == 1.0  # the schema says what the server accepts
