"""`lorafleet train` and `lorafleet data`: thin layers over the training loop and data tools."""

from __future__ import annotations

# Imports inside functions: building the command-line parser must not import torch, diffusers or
# Ray (`lorafleet --help` takes 0.3 s).
import json
import sys
from pathlib import Path

from lorafleet.errors import LorafleetError
from lorafleet.families import FAMILIES

from .client import add_commands as add_remote_commands
from .config import DataConfig, Method, load_train_config
from .errors import TrainingInputInvalid

EXAMPLE_CONFIG = """\
# lorafleet training config ({method}, {family_title}). Every key is documented in training/config.py;
# unknown keys are refused. Override any key with --set dotted.key=value.{scaled_note}
method: {method}            # lora | dreambooth | qlora | textual_inversion | full
base: {base}{base_pad}# built-in (toy, tiny, tiny-sdxl, tiny-flux, tiny-sd3...), a diffusers dir or a .safetensors
seed: 0
max_steps: 200              # optimizer steps
batch_size: 4
gradient_accumulation: 1
mixed_precision: "no"       # fp16 / bf16 autocast on CUDA only
min_snr_gamma: null         # e.g. 5.0 for Min-SNR weighting
noise_offset: 0.0
ema_decay: null             # e.g. 0.999
guided_target_scale: null   # e.g. 4.0 (classic-CFG families): guidance at this scale reproduces the data
checkpoint_every: 50        # checkpoint (and validation grid) every N steps
validation_prompts: ["sks a photo"]
output_dir: lorafleet-runs/my-run
data:
  path: ./images            # images + NAME.txt captions, or metadata.jsonl (file_name, text)
  resolution: {resolution}{resolution_pad}# {resolution_note}
  buckets: {buckets}           # aspect-ratio buckets around resolution^2 (SDXL records each image's size and crop)
  trigger: sks              # trigger token
  trigger_mode: prepend     # prepend | substitute ('[trigger]' in captions) | none
  crop: center              # center | random
  flip: false
  caption_dropout: 0.1
lora:
  rank: {rank}
  alpha: {rank}
  target_modules: [{targets}]
  text_encoder: false       # true: LoRA on the family's adapted text encoders ({text_encoders})
dreambooth:
  class_prompt: a photo
  num_class_images: 8
  prior_loss_weight: 1.0
textual_inversion:
  token: "<sks>"
  init_word: null
  num_vectors: 1
regularization:            # captions without [trigger] (trigger_mode: substitute) are regularization examples
  target: images            # images (their own) | base (the frozen base's prediction; lora, dreambooth, qlora)
  weight: 1.0               # loss weight of their rows
optimizer:
  name: adamw               # adamw | adamw8bit
  learning_rate: {learning_rate}
  warmup_steps: 10
  schedule: cosine          # constant | cosine | linear
{flow_matching}publish:
  name: null                # registry name; or pass --publish NAME
  aliases: []
"""


FLOW_MATCHING_SECTION = """flow_matching:             # how sigmas are drawn as kohya, SimpleTuner, diffusers do
  timestep_sampling: sigmoid  # sigmoid | logit_normal | uniform
  sigmoid_scale: 1.0
  shift: 1.0                # 3.0: kohya's discrete_flow_shift; or dynamic_shift: true (the scheduler's own)
  guidance_scale: 1.0       # the guidance embedding's value while training
"""


class _ProgressBar:
    """steps, loss, it/s and ETA on stderr; created at the first step (after the checks)."""

    def __init__(self, config):
        self.config = config
        self.bar = None

    def __call__(self, state) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=self.config.max_steps, initial=state.step - 1, unit="step", dynamic_ncols=True,
                            file=sys.stderr)
        self.bar.n = state.step
        self.bar.set_postfix(loss=f"{state.losses[-1]:.4f}", refresh=False)  # it would draw a second line
        if state.step < self.config.max_steps:
            self.bar.refresh()  # the last step is drawn once, by close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def example_config(method: Method, family_name: str | None, base: str | None) -> str:
    """The commented example config for ``method`` on a family: its real-model defaults, with the
    resolution scaled down to the example base's own (a built-in tiny base draws 32 px)."""
    from lorafleet.families import family_named

    family = family_named(family_name or "sd1")
    if base is not None:
        from lorafleet.bases import load_base

        loaded = load_base(base)
        family, resolution = loaded.family, loaded.native_size
    else:
        base = family.example_base
        resolution = family.example_resolution
    if method == Method.textual_inversion and not family.textual_inversion:
        raise TrainingInputInvalid(f"{family.title} pipelines load no textual-inversion embeddings", field="method")
    real = family.native_resolution
    note = f"{real} on a real {family.title} base" if resolution != real else f"{family.title}'s native size"
    scaled = (f"\n# Defaults are {family.title}'s ({real} px); the resolution is scaled to {base}'s {resolution} px."
              if resolution != real else "")
    return EXAMPLE_CONFIG.format(
        method=method.value, family_title=family.title, scaled_note=scaled, base=base,
        base_pad=" " * max(1, 20 - len(base)), resolution=resolution,
        resolution_pad=" " * max(1, 14 - len(str(resolution))), resolution_note=note,
        buckets="true" if family.name == "sdxl" else "false", rank=family.example_rank,
        text_encoders=", ".join(family.lora_text_encoders), learning_rate=family.example_learning_rate,
        targets=", ".join(family.example_targets or ("to_q", "to_k", "to_v", "to_out.0")),
        flow_matching=FLOW_MATCHING_SECTION if family.objective == "flow_matching" else "")


def cmd_train(args) -> int:
    if args.print_config:
        print(example_config(Method(args.print_config), args.family, args.base))
        return 0
    if args.job:
        return _run_stored_job(args)
    config = load_train_config(Path(args.config) if args.config else None, args.set)
    name = args.publish or config.publish.name
    if args.ray is not None or args.workers:
        from .ray_job import run_on_ray

        manifest = run_on_ray(config, name=name, registry_uri=args.registry, address=args.ray or None,
                              workers=args.workers, resume=args.resume)
        print(json.dumps(manifest, indent=2) if manifest else "trained (not published)")
        return 0
    from .loop import train

    progress = _ProgressBar(config)
    try:
        result = train(config, resume=args.resume, progress=progress)
    finally:
        progress.close()
    print(f"trained {config.method.value} for {result.state.step} steps: loss {result.metrics['loss_first']:.4f} "
          f"-> {result.metrics['loss_final']:.4f}; outputs in {result.output_dir}")
    manifest = None
    if name:
        from lorafleet.registry import AdapterRegistry

        from .publish import publish_result

        try:
            manifest = publish_result(result, config, AdapterRegistry(args.registry), name)
        except LorafleetError:
            adapter = result.artifacts.get("adapter")
            print(f"the trained adapter is kept at {adapter}; publish it later with: lorafleet registry publish "
                  f"{adapter} --name {name} --base {config.base}", file=sys.stderr)
            raise
        print(f"published {manifest.adapter_id} ({manifest.digest})")
    if args.result_json:
        from .ray_job import RESULT_MARKER

        summary = {"metrics": result.metrics, "manifest": json.loads(manifest.model_dump_json()) if manifest else None}
        print(RESULT_MARKER + json.dumps(summary, default=str), flush=True)
    return 0


def _run_stored_job(args) -> int:
    """Inside a Ray job the training service submitted: the stored training, then its result line."""
    from .ray_job import RESULT_MARKER
    from .service.job import run_training_job

    manifest = run_training_job(args.job, args.registry)
    print(f"published {manifest['name']}@{manifest['version']} ({manifest['digest']})")
    print(RESULT_MARKER + json.dumps({"manifest": manifest}, default=str), flush=True)
    return 0


def cmd_prepare(args) -> int:
    from .data import prepare_folder

    config = DataConfig(path=Path(args.dir), resolution=args.resolution, crop=args.crop, trigger=args.trigger,
                        min_size=args.min_size, max_file_bytes=args.max_file_bytes)
    report = prepare_folder(config, Path(args.out))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return 0


def cmd_caption(args) -> int:
    from .captioning import caption_folder

    report = caption_folder(Path(args.dir), Path(args.model), overwrite=args.overwrite, prefix=args.prefix)
    print(f"captioned {len(report.written)} images; kept {len(report.kept_existing)} existing captions; "
          f"{len(report.unreadable)} unreadable")
    return 0


def add_commands(subparsers) -> None:
    train = subparsers.add_parser("train", help="train an adapter (in-process, or as a Ray job); `train submit|status|"
                                  "list|cancel --server URL`: on a lorafleet server",
                                  epilog="On a server: lorafleet train submit CONFIG --data DIR --server URL "
                                  "[--follow]; lorafleet train status|cancel ID --server URL; lorafleet train list "
                                  "--server URL")
    train.add_argument("config", nargs="?", help="YAML training config")
    train.add_argument("--publish", help="registry name to publish the adapter under")
    train.add_argument("--registry", help="registry URI")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    train.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help="submit as a Ray job (a local cluster when no address)")
    train.add_argument("--workers", type=int, default=0, help="data-parallel workers with Ray Train")
    train.add_argument("--print-config", choices=[m.value for m in Method], help="print an example config")
    train.add_argument("--family", choices=list(FAMILIES), help="with --print-config: the model family's defaults")
    train.add_argument("--base", help="with --print-config: the base (its family, and its resolution)")
    train.add_argument("--result-json", action="store_true", help="end with one machine-readable result line")
    train.add_argument("--job", metavar="TRAINING_ID", help="run a training stored by the training service (the "
                       "entry point of its Ray jobs)")
    train.set_defaults(handler=cmd_train)
    add_remote_commands(subparsers)

    data = subparsers.add_parser("data", help="prepare training data")
    commands = data.add_subparsers(dest="data_command", required=True)
    prepare = commands.add_parser("prepare", help="resize, crop and check a folder; print a report")
    prepare.add_argument("dir")
    prepare.add_argument("--out", required=True)
    prepare.add_argument("--resolution", type=int, default=512)
    prepare.add_argument("--crop", choices=["center", "random"], default="center")
    prepare.add_argument("--trigger")
    prepare.add_argument("--min-size", type=int, default=8)
    prepare.add_argument("--max-file-bytes", type=int, default=DataConfig.model_fields["max_file_bytes"].default,
                         help="skip image files larger than this")
    prepare.add_argument("--json", action="store_true")
    prepare.set_defaults(handler=cmd_prepare)
    caption = commands.add_parser("caption", help="write sidecar captions with a local BLIP-style model")
    caption.add_argument("dir")
    caption.add_argument("--model", required=True, help="local folder of a BLIP captioning model")
    caption.add_argument("--overwrite", action="store_true", help="replace existing captions")
    caption.add_argument("--prefix", help="text the captions start with (conditional captioning)")
    caption.set_defaults(handler=cmd_caption)
