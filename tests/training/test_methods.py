"""Every method end to end on the tiny base: loss falls, publish, pull, serve, plain diffusers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from lorafleet.devtools.shapes import write_shapes_folder
from lorafleet.registry import AdapterRegistry
from lorafleet.serve.service import decode_npy
from lorafleet.training.config import load_train_config
from lorafleet.training.errors import TrainingInputInvalid
from lorafleet.training.loop import Interrupted, train
from lorafleet.training.publish import publish_result

COMMON = ["max_steps=30", "optimizer.learning_rate=0.005", "batch_size=4", "data.trigger=sks",
          "validation_prompts=['sks a red circle']"]
METHOD_SETTINGS = {
    "lora": ["lora.text_encoder=true"],
    "dreambooth": ["dreambooth.num_class_images=4", "dreambooth.class_image_steps=4", "dreambooth.class_prompt=a circle"],
    "qlora": [],
    "textual_inversion": ["textual_inversion.token=<sks>", "data.trigger=<sks>", "textual_inversion.init_word=circle",
                          "optimizer.learning_rate=0.05", "validation_prompts=['<sks> a red circle']"],
    "full": ["optimizer.learning_rate=0.001"],
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_shapes_folder(tmp_path_factory.mktemp("data"), 8, colour="cyan", shape="circle")


def _config(method, dataset, output, *extra, base="tiny"):
    return load_train_config(None, [f"method={method}", f"base={base}", f"data.path={dataset}", f"output_dir={output}",
                                    *COMMON, *METHOD_SETTINGS[method], *extra])


# The family matrix: every method on SD 1.x-shaped `tiny`, SDXL-shaped `tiny-sdxl` and Flux-shaped `tiny-flux`;
# on SD 3.5-shaped `tiny-sd3` every method but textual inversion (its pipeline loads no embeddings).
MATRIX = [(base, method) for base in ("tiny", "tiny-sdxl", "tiny-flux", "tiny-sd3") for method in METHOD_SETTINGS
          if not (base == "tiny-sd3" and method == "textual_inversion")]


_npy = decode_npy


@pytest.mark.parametrize(("base", "method"), MATRIX, ids=[f"{b}-{m}" for b, m in MATRIX])
def test_method_trains_publishes_and_serves(base, method, dataset, tmp_path):
    from lorafleet.serve.app import create_local_app
    from lorafleet.serve.settings import ServeSettings

    config = _config(method, dataset, tmp_path / "run", base=base)
    result = train(config)
    assert result.metrics["loss_final"] < result.metrics["loss_first"]
    assert (tmp_path / "run" / "loss.png").is_file() and (tmp_path / "run" / "metrics.json").is_file()
    assert (tmp_path / "run" / "samples").is_dir()
    registry = AdapterRegistry(f"file://{tmp_path / 'registry'}")
    manifest = publish_result(result, config, registry, "trained")
    assert manifest.method.value == method
    assert manifest.dataset_digest == result.data_report.dataset_digest
    assert manifest.training_config["max_steps"] == 30 and manifest.metrics["steps"] == 30
    if method == "qlora":
        assert manifest.metrics["method"]["quantized_layers"] > 0
    if method == "full":
        return  # a full fine-tune is served as its own base, not as an adapter
    prompt = "<sks> a red circle" if method == "textual_inversion" else "sks a red circle"
    settings = ServeSettings(base=base, registry=registry.uri, cache={"disk_dir": str(tmp_path / "cache")})
    app, _ = create_local_app(settings, registry)
    with TestClient(app) as client:
        body = {"prompt": prompt, "steps": 6, "seed": 1, "guidance_scale": 5.0, "output_format": "npy"}
        with_adapter = client.post("/v1/generate", json={**body, "adapter": "trained"})
        without = client.post("/v1/generate", json=body)
    assert with_adapter.status_code == 200, with_adapter.text
    served = _npy(with_adapter.json()["images"][0])
    assert np.abs(served - _npy(without.json()["images"][0])).max() > 1e-3
    if method in ("lora", "dreambooth", "qlora"):
        from lorafleet.bases import load_base

        _, path = registry.pull("trained", tmp_path / "pulled")
        loaded = load_base(base)
        pipe = loaded.pipeline
        pipe.load_lora_weights(str(path))
        plain = pipe(prompt, num_inference_steps=6, guidance_scale=5.0, generator=[torch.Generator().manual_seed(1)],
                     output_type="np", height=loaded.native_size, width=loaded.native_size,
                     **loaded.family.pipeline_call_options(pipe)).images[0]
        assert np.abs(served - plain).max() <= 1e-4


def test_textual_inversion_is_refused_for_sd3_naming_the_method(dataset, tmp_path):
    with pytest.raises(TrainingInputInvalid, match="load no textual-inversion") as refused:
        train(_config("textual_inversion", dataset, tmp_path / "run", base="tiny-sd3"))
    assert refused.value.field == "method"


def test_resume_reproduces_the_uninterrupted_run(dataset, tmp_path):
    full = train(_config("lora", dataset, tmp_path / "full", "checkpoint_every=10", "max_steps=20"))

    def stop_at_ten(state):
        if state.step == 10:
            raise Interrupted()

    config = _config("lora", dataset, tmp_path / "cut", "checkpoint_every=10", "max_steps=20")
    with pytest.raises(Interrupted):
        train(config, progress=stop_at_ten)
    resumed = train(config, resume=True)
    assert len(resumed.state.losses) == 20
    assert np.allclose(resumed.state.losses, full.state.losses, rtol=0, atol=1e-6)
    for key, tensor in full.payload.tensors.items():
        assert torch.allclose(tensor, resumed.payload.tensors[key], atol=1e-6)


def test_interrupted_run_publishes_nothing(dataset, tmp_path):
    from lorafleet.training.cli import cmd_train  # noqa: F401  (the CLI publishes only after train returns)

    registry = AdapterRegistry(f"file://{tmp_path / 'registry'}")

    def stop(state):
        raise Interrupted()

    with pytest.raises(Interrupted):
        result = train(_config("lora", dataset, tmp_path / "run"), progress=stop)
        publish_result(result, _config("lora", dataset, tmp_path / "run"), registry, "never")
    assert registry.names() == []


def test_bad_datasets_give_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingInputInvalid, match="no usable images"):
        train(_config("lora", tmp_path / "empty", tmp_path / "run"))
    (tmp_path / "corrupt").mkdir()
    for index in range(3):
        (tmp_path / "corrupt" / f"{index}.png").write_bytes(b"garbage")
    with pytest.raises(TrainingInputInvalid, match="3 unreadable"):
        train(_config("lora", tmp_path / "corrupt", tmp_path / "run"))


def test_mixed_sizes_and_missing_captions_still_train(tmp_path):
    from PIL import Image

    write_shapes_folder(tmp_path / "mixed", 3, size=40)
    Image.new("RGB", (64, 24), (10, 200, 10)).save(tmp_path / "mixed" / "wide.png")
    result = train(_config("lora", tmp_path / "mixed", tmp_path / "run", "max_steps=3"))
    assert result.data_report.kept == 4 and result.data_report.missing_captions == ["wide.png"]


def test_config_rejects_unknown_keys_by_name(tmp_path):
    with pytest.raises(TrainingInputInvalid) as caught:
        load_train_config(None, [f"data.path={tmp_path}", "lora.rnk=4"])
    assert caught.value.field == "lora.rnk"
    with pytest.raises(TrainingInputInvalid) as caught:
        load_train_config(None, [f"data.path={tmp_path}", "method=magic"])
    assert caught.value.field == "method"
    with pytest.raises(TrainingInputInvalid):
        load_train_config(None, ["max_steps=10"])  # data.path is required


def test_printed_example_configs_are_valid(tmp_path):
    import yaml

    from lorafleet.families import FAMILIES
    from lorafleet.training.cli import example_config
    from lorafleet.training.config import Method, TrainConfig

    for family in FAMILIES.values():
        for method in METHOD_SETTINGS:
            if method == "textual_inversion" and not family.textual_inversion:
                continue  # refused when printed (tests/test_cli.py)
            tree = yaml.safe_load(example_config(Method(method), family.name, None))
            assert TrainConfig.model_validate(tree).method.value == method


def test_training_options_run_together(dataset, tmp_path):
    result = train(_config("lora", dataset, tmp_path / "run", "max_steps=6", "gradient_checkpointing=true",
                           "ema_decay=0.9", "min_snr_gamma=5", "noise_offset=0.05", "data.caption_dropout=0.5",
                           "gradient_accumulation=2", "optimizer.warmup_steps=2", "optimizer.schedule=cosine",
                           "data.flip=true", "data.color_jitter=0.1", "data.crop=random", "optimizer.name=adamw8bit"))
    assert len(result.state.losses) == 6 and all(np.isfinite(result.state.losses))
    assert result.metrics["latent_distance_with_adapter"] is None  # random augmentation: no cached latents


def test_epochs_set_the_number_of_steps(dataset, tmp_path):
    result = train(_config("lora", dataset, tmp_path / "run", "epochs=2", "batch_size=4", "checkpoint_every=2"))
    assert result.state.step == 4  # 2 passes over 8 images at 4 per step
    assert (tmp_path / "run" / "loss.png").is_file()


def test_dreambooth_instance_prompt_replaces_captions(dataset, tmp_path):
    from lorafleet.training.loop import Trainer

    config = _config("dreambooth", dataset, tmp_path / "run", "dreambooth.instance_prompt=a photo of sks circle",
                     "max_steps=1")
    trainer = Trainer(config)
    assert {e.caption for e in trainer.examples} == {"a photo of sks circle"}
    assert trainer.class_source is not None and len(trainer.class_source.latents) == 4


@pytest.mark.gpu
def test_qlora_on_cuda_uses_the_diffusers_bitsandbytes_path(dataset, tmp_path):
    result = train(_config("qlora", dataset, tmp_path / "run", "max_steps=3"))
    details = result.metrics["method"]
    assert details["quantized_layers"] > 0 and details["memory_saving_bytes"] > 0


@pytest.fixture(scope="module")
def regularized_dataset(tmp_path_factory):
    """4 cyan circles captioned with [trigger], 4 red squares without it (regularization examples)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("regularized")
    for index in range(4):
        for name, colour, caption in (("concept", (0, 255 - index, 255), "a [trigger] circle"),
                                      ("regularization", (255 - index, 0, 0), "a red square")):
            Image.new("RGB", (32, 32), colour).save(folder / f"{name}-{index}.png")
            (folder / f"{name}-{index}.txt").write_text(caption)
    return folder


def _base_target_config(method, dataset, output, *extra, base="tiny"):
    return _config(method, dataset, output, "data.trigger_mode=substitute", "data.caption_dropout=0",
                   "regularization.target=base", "max_steps=2", *extra, base=base)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_base_target_regularization_rows_aim_at_the_frozen_base(method, regularized_dataset, tmp_path):
    from lorafleet.training.batches import Batch
    from lorafleet.training.config import RegularizationConfig
    from lorafleet.training.loop import Trainer

    trainer = Trainer(_base_target_config(method, regularized_dataset, tmp_path / "run"))
    assert trainer.data_report.regularization == 4
    examples = trainer.examples
    rows = [i for i, e in enumerate(examples) if e.regularization]
    assert {examples[i].caption for i in rows} == {"a red square"}
    assert all("sks" in e.caption for e in examples if not e.regularization)
    latents = trainer.batches.cached
    batch = Batch(latents[rows], [examples[i].caption for i in rows], torch.ones(len(rows), dtype=torch.bool),
                  torch.ones(len(rows)))
    # A fresh LoRA (B = 0) predicts exactly what the base does: nothing to learn on those rows.
    assert float(trainer._loss(batch, 0, 0)) == 0.0
    trainer.config = trainer.config.model_copy(update={"regularization": RegularizationConfig(target="images")})
    assert float(trainer._loss(batch, 0, 0)) > 0.01  # toward their own images: a real loss
    trainer.step(0)  # the adapters are switched back on and keep training after the base prediction
    assert all(p.requires_grad for p in trainer.parameters)
    assert any(float(p.abs().sum()) > 0 for n, p in trainer.pipe.unet.named_parameters() if "lora_B" in n)
    trainer.config = trainer.config.model_copy(update={"regularization": RegularizationConfig(target="base")})
    noisy, timesteps = torch.randn_like(batch.latents), torch.full((len(rows),), 500)
    with torch.no_grad():
        target = trainer._toward_base(batch, noisy, timesteps, torch.zeros_like(noisy))
        adapted = trainer.pipe.unet(noisy, timesteps, trainer.text(batch.captions)[0]).sample
        adapted_models = [trainer.pipe.unet] + ([trainer.pipe.text_encoder] if method == "lora" else [])
        for model in adapted_models:  # `lora` here also trains the text encoder (METHOD_SETTINGS)
            model.disable_adapters()
        base = trainer.pipe.unet(noisy, timesteps, trainer.text(batch.captions)[0]).sample
        for model in adapted_models:
            model.enable_adapters()
    assert torch.equal(target, base) and not torch.allclose(target, adapted)


@pytest.mark.parametrize("base", ["tiny", "tiny-sdxl"])
def test_guided_target_makes_guidance_at_its_scale_reproduce_the_instance_rows(base, regularized_dataset, tmp_path):
    from lorafleet.training.loop import Trainer

    scale = 4.0
    trainer = Trainer(_base_target_config("lora", regularized_dataset, tmp_path / "run", "batch_size=8",
                                          f"guided_target_scale={scale}", base=base))
    trainer.step(0)  # a trained adapter: the base's prediction needs it switched off
    batch = trainer.batches.batch(1, 0)
    instance = ~batch.regularization
    assert instance.any() and batch.regularization.any()
    noisy, timesteps = torch.randn_like(batch.latents), torch.full((len(batch.captions),), 500)
    data_target = torch.randn_like(noisy)
    adapted = [model for model in (trainer.pipe.unet, trainer.pipe.text_encoder,
                                   getattr(trainer.pipe, "text_encoder_2", None)) if getattr(model, "peft_config", None)]
    with torch.no_grad():
        target = trainer._for_guidance(batch, noisy, timesteps, data_target)
        unconditional = dataclasses.replace(batch, captions=[""] * len(batch.captions))
        for model in adapted:  # the frozen base's own unconditional prediction
            model.disable_adapters()
        u = trainer._predict(unconditional, noisy, timesteps)
        for model in adapted:
            model.enable_adapters()
        assert not torch.allclose(trainer._predict(unconditional, noisy, timesteps), u)  # the adapter matters
    # Guidance at `scale` from that target gives back the data's own target.
    assert torch.allclose(u[instance] + scale * (target[instance] - u[instance]), data_target[instance], atol=1e-4)
    assert torch.equal(target[batch.regularization], data_target[batch.regularization])  # untouched


def test_guided_target_is_refused_where_it_cannot_work(regularized_dataset, dataset, tmp_path):
    from lorafleet.training.loop import Trainer

    with pytest.raises(TrainingInputInvalid) as caught:
        _config("full", regularized_dataset, tmp_path / "full", "guided_target_scale=4")
    assert caught.value.field == "guided_target_scale"
    with pytest.raises(TrainingInputInvalid) as caught:  # Flux guides through an embedding, not classic CFG
        Trainer(_config("lora", dataset, tmp_path / "flux", "guided_target_scale=4", base="tiny-flux"))
    assert caught.value.field == "guided_target_scale" and "embedding" in str(caught.value)


@pytest.mark.parametrize(("method", "extra"), [("full", []), ("textual_inversion", []),
                                               ("lora", ["data.trigger_mode=prepend"]),
                                               ("qlora", ["data.trigger_mode=none"])])
def test_base_target_is_refused_where_it_cannot_work(method, extra, regularized_dataset, tmp_path):
    with pytest.raises(TrainingInputInvalid) as caught:
        _base_target_config(method, regularized_dataset, tmp_path / "run", *extra)
    assert caught.value.field == "regularization.target"


def test_regularization_weight_applies_to_regularization_rows_only(regularized_dataset, tmp_path):
    from lorafleet.training.loop import Trainer

    trainer = Trainer(_config("lora", regularized_dataset, tmp_path / "run", "data.trigger_mode=substitute",
                              "regularization.weight=3", "batch_size=16"))
    batch = trainer.batches.batch(0, 0)
    assert batch.regularization.any() and not batch.regularization.all()
    assert batch.weights.tolist() == [3.0 if row else 1.0 for row in batch.regularization.tolist()]


def test_dreambooth_base_target_class_rows_aim_at_the_base(dataset, tmp_path):
    from lorafleet.training.loop import Trainer

    trainer = Trainer(_config("dreambooth", dataset, tmp_path / "run", "regularization.target=base", "max_steps=1"))
    class_batch = trainer.class_source.batch(0, 0)
    assert class_batch.regularization.all()
    assert float(trainer._loss(class_batch, 0, 0)) == 0.0  # a fresh LoRA predicts what the base does
    assert float(trainer._loss(trainer.batches.batch(0, 0), 0, 0)) > 0.01  # instance rows: their images


@pytest.mark.parametrize(("share", "expected"), [(None, 0.5), ("0.8", 0.8), ("0.25", 0.25)])
def test_regularization_share_sets_the_share_of_regularization_rows_per_batch(share, expected, regularized_dataset,
                                                                              tmp_path):
    from lorafleet.training.loop import Trainer

    extra = [f"regularization.share={share}"] if share else []
    trainer = Trainer(_config("lora", regularized_dataset, tmp_path / "run", "data.trigger_mode=substitute",
                              "batch_size=16", *extra))
    rows = torch.cat([trainer.batches.batch(step, 0).regularization for step in range(60)])
    assert float(rows.float().mean()) == pytest.approx(expected, abs=0.04)  # 960 rows: 3 standard errors
