"""`lorafleet registry ...`: a thin command-line layer over AdapterRegistry."""

from __future__ import annotations

# Imports inside functions: building the command-line parser must not import torch, diffusers or
# Ray (`lorafleet --help` takes 0.3 s).
import json
import sys
from pathlib import Path

from .adapter_registry import AdapterRegistry, PublishRequest
from .errors import InvalidAdapter
from .manifest import AdapterMethod, Manifest


def _registry(args) -> AdapterRegistry:
    return AdapterRegistry(args.registry)


def _emit(args, payload, human: str) -> None:
    print(json.dumps(payload, indent=2, default=str) if args.json else human)


def _manifest_json(manifest: Manifest) -> dict:
    return json.loads(manifest.model_dump_json())


def _manifest_line(m: Manifest) -> str:
    flags = " (yanked)" if m.yanked else ""
    rank = f"r={m.rank} alpha={m.alpha:g}" if m.rank is not None else m.format.value
    return f"{m.name}@{m.version}  {m.digest[:19]}  {m.size:>9} B  {m.method.value:<17} {rank}{flags}"


def _manifest_text(m: Manifest) -> str:
    lines = [
        f"{m.name}@{m.version}{'  YANKED: ' + (m.yanked_reason or '') if m.yanked else ''}",
        f"  digest:   {m.digest}",
        f"  size:     {m.size} bytes, {m.num_parameters} parameters, format {m.format.value} "
        f"(published from {m.source_format})",
        f"  method:   {m.method.value}",
        f"  base:     {m.base.id} ({m.base.fingerprint[:23]}...)",
    ]
    if m.rank is not None:
        lines.append(f"  lora:     rank {m.rank}, alpha {m.alpha:g}, {len(m.target_modules)} target modules")
    if m.trigger_tokens:
        lines.append(f"  triggers: {', '.join(m.trigger_tokens)}")
    lines.append(f"  created:  {m.created_at.isoformat()}")
    if m.description:
        lines.append(f"  about:    {m.description}")
    return "\n".join(lines)


def cmd_publish(args) -> int:
    from lorafleet.bases import base_spec

    aliases = list(dict.fromkeys(args.alias or []))
    request = PublishRequest(name=args.name, base=base_spec(args.base), method=AdapterMethod(args.method),
                             aliases=aliases, description=args.description or "")
    manifest = _registry(args).publish(Path(args.path), request)
    _emit(args, _manifest_json(manifest), _manifest_text(manifest))
    return 0


def _report_skipped(skipped: list[str]) -> None:
    for problem in skipped:
        print(f"warning: skipped: {problem} (an admin can remove it: registry delete NAME@V --force)",
              file=sys.stderr)


def cmd_list(args) -> int:
    registry = _registry(args)
    listing = registry.listing(args.name)
    _report_skipped(listing.skipped)
    manifests = listing.manifests
    payload = [_manifest_json(m) for m in manifests]
    if args.name:
        aliases = registry.aliases(args.name)
        alias_lines = [f"  {a} -> {args.name}@{v}" for a, v in sorted(aliases.items())]
        human = "\n".join([_manifest_line(m) for m in manifests] + (["aliases:"] + alias_lines if aliases else []))
        _emit(args, {"versions": payload, "aliases": aliases}, human)
    else:
        human = "\n".join(_manifest_line(m) for m in manifests) or f"(registry {registry.uri} is empty)"
        _emit(args, payload, human)
    return 0


def cmd_show(args) -> int:
    manifest = _registry(args).resolve(args.ref)
    _emit(args, _manifest_json(manifest), _manifest_text(manifest))
    return 0


def cmd_pull(args) -> int:
    manifest, path = _registry(args).pull(args.ref, Path(args.dest))
    _emit(args, {"manifest": _manifest_json(manifest), "path": str(path)}, f"{manifest.adapter_id} -> {path}")
    return 0


def _target(text: str) -> int | dict[int, float]:
    """'5' -> 5; '4=0.9,5=0.1' -> {4: 0.9, 5: 0.1} (a canary split)."""
    try:
        if "=" not in text:
            return int(text)
        pairs = (item.split("=", 1) for item in text.split(",") if item.strip())
        return {int(version): float(weight) for version, weight in pairs}
    except ValueError:
        raise InvalidAdapter(f"expected VERSION or VERSION=WEIGHT,VERSION=WEIGHT, got {text!r}",
                             field="version") from None


def cmd_alias(args) -> int:
    target, registry = _target(args.version), _registry(args)
    if isinstance(target, dict):
        record = registry.split_alias(args.name, args.alias, target, expected_version=args.expect)
        split = ", ".join(f"@{v} {w:.0%}" for v, w in record.split.items()) if record.split else f"@{record.version}"
        human = f"{args.name}:{args.alias} -> {args.name} {split}"
    else:
        record = registry.set_alias(args.name, args.alias, target, expected_version=args.expect)
        human = f"{args.name}:{args.alias} -> {args.name}@{record.version}"
    _emit(args, json.loads(record.model_dump_json()), human)
    return 0


def cmd_yank(args) -> int:
    manifest = _registry(args).yank(args.ref, args.reason or "")
    _emit(args, _manifest_json(manifest), f"yanked {manifest.adapter_id}")
    return 0


def cmd_delete(args) -> int:
    if not args.force:
        print("error: delete removes a version for good; pass --force", file=sys.stderr)
        return 2
    dangling = _registry(args).delete(args.ref, force=True)
    note = f"; aliases that pointed at it no longer resolve: {', '.join(dangling)}" if dangling else ""
    _emit(args, {"deleted": args.ref, "dangling_aliases": dangling}, f"deleted {args.ref}{note}")
    return 0


def cmd_reindex(args) -> int:
    added = _registry(args).reindex()
    _emit(args, {"added": added}, f"digest index: {added} entries added")
    return 0


def cmd_gc(args) -> int:
    report = _registry(args).gc(grace_seconds=args.grace_seconds, dry_run=args.dry_run)
    _report_skipped(report.unreadable)
    verb = "would remove" if args.dry_run else "removed"
    _emit(args, report.__dict__, f"{verb} {len(report.removed)} unreferenced blobs ({report.bytes_freed} bytes); "
                                 f"{report.referenced} referenced, {report.kept_recent} recent kept")
    return 0


def cmd_export(args) -> int:
    from safetensors.torch import save_file

    from lorafleet.bases import base_spec

    from .formats import payload_from_stored
    from .kohya import to_kohya

    registry = _registry(args)
    manifest = registry.resolve(args.ref)
    payload = payload_from_stored(registry.read_blob(manifest))
    if args.format != "kohya":
        raise InvalidAdapter(f"unknown export format {args.format!r}", field="format")
    tensors, metadata = to_kohya(payload, base_spec(manifest.base.id))
    target = Path(args.dest)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target), metadata=metadata)
    _emit(args, {"path": str(target), "format": args.format}, f"{manifest.adapter_id} -> {target} ({args.format})")
    return 0


def cmd_init(args) -> int:
    registry = _registry(args)
    create_bucket = getattr(registry.store, "create_bucket", None)
    if create_bucket:
        create_bucket()
    registry.check()
    _emit(args, {"registry": registry.uri}, f"registry ready at {registry.uri}")
    return 0


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser("registry", help="publish, inspect and manage adapter versions")
    commands = parser.add_subparsers(dest="registry_command", required=True)

    def command(name, handler, help_text):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--registry", help="registry URI (file:///path or s3://bucket/prefix); "
                                            "default $LORAFLEET_REGISTRY or ~/.lorafleet/registry")
        sub.add_argument("--json", action="store_true", help="print JSON")
        sub.set_defaults(handler=handler)
        return sub

    publish = command("publish", cmd_publish, "publish an adapter file or folder as a new version")
    publish.add_argument("path")
    publish.add_argument("--name", required=True)
    publish.add_argument("--base", default="tiny", help="built-in base name or a diffusers directory")
    publish.add_argument("--alias", action="append", help="alias to point at the new version (repeatable)")
    publish.add_argument("--description", default="")
    publish.add_argument("--method", default="lora", choices=[m.value for m in AdapterMethod])

    command("list", cmd_list, "list adapters, or the versions of one").add_argument("name", nargs="?")
    command("show", cmd_show, "show the manifest a reference resolves to").add_argument("ref")
    pull = command("pull", cmd_pull, "download a verified adapter file")
    pull.add_argument("ref")
    pull.add_argument("dest")
    alias = command("alias", cmd_alias, "point NAME:ALIAS at a version, or split it across versions (a canary: "
                    "4=0.9,5=0.1), by compare-and-swap")
    alias.add_argument("name")
    alias.add_argument("alias")
    alias.add_argument("version", help="VERSION, or VERSION=WEIGHT,... summing to 1 (sticky per caller)")
    alias.add_argument("--expect", type=int, help="move only if the alias points to this version now")
    yank = command("yank", cmd_yank, "yank a version (kept, never served by alias or latest)")
    yank.add_argument("ref")
    yank.add_argument("--reason", default="")
    delete = command("delete", cmd_delete, "admin: remove one version for good (even an unreadable one)")
    delete.add_argument("ref", help="NAME@VERSION")
    delete.add_argument("--force", action="store_true", help="required: the version cannot be restored")
    command("reindex", cmd_reindex, "rebuild the digest index (registries written before it existed)")
    gc = command("gc", cmd_gc, "remove blobs no manifest references")
    gc.add_argument("--grace-seconds", type=float, default=3600.0,
                    help="keep unreferenced blobs younger than this (publishes in flight)")
    gc.add_argument("--dry-run", action="store_true")
    export = command("export", cmd_export, "write an adapter in another layout")
    export.add_argument("ref")
    export.add_argument("dest")
    export.add_argument("--format", default="kohya", choices=["kohya"])
    command("init", cmd_init, "create the registry's bucket or directory if needed")
