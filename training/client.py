"""`lorafleet train submit|status|list|cancel --server URL`: the training service from a terminal.

submit packs a data folder (or takes an archive), uploads it, submits the config, and with
``--follow`` streams the training's events with a progress bar until the adapter is published.
"""

from __future__ import annotations

# Imports inside functions: tqdm only when following a training.
import json
import os
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx

from lorafleet.errors import ErrorKind, LorafleetError

from .errors import TrainingInputInvalid

TOKEN_ENV = "LORAFLEET_TOKEN"


class ServiceError(LorafleetError):
    """The training service answered with an error (its message and field are shown)."""

    code = "service_error"
    kind = ErrorKind.unavailable


class TrainingClient:
    def __init__(self, server: str, token: str | None = None, timeout_s: float = 600):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=server.rstrip("/"), headers=headers, timeout=timeout_s)

    def _checked(self, response: httpx.Response) -> dict | list:
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                message, field = error.get("message", response.text), error.get("field")
            except (ValueError, KeyError, TypeError):
                message, field = response.text[:500], None
            raise ServiceError(f"{response.status_code}: {message}" + (f" (field {field})" if field else ""),
                               field=field)
        return response.json()

    def upload(self, data: Path) -> dict:
        """A folder (packed as tar.gz) or an archive file -> the dataset report."""
        with tempfile.TemporaryDirectory(prefix="lorafleet-submit-") as folder:
            archive = _archive_of(data, Path(folder))
            with archive.open("rb") as body:
                return self._checked(self.http.post("/v1/datasets", content=body,
                                                    headers={"Content-Type": "application/gzip"}))

    def submit(self, config: dict, dataset: str, name: str | None, aliases: list[str]) -> dict:
        body: dict = {"config": config, "dataset": dataset}
        if name:
            body["publish"] = {"name": name, "aliases": aliases}
        return self._checked(self.http.post("/v1/trainings", json=body))

    def status(self, training_id: str) -> dict:
        return self._checked(self.http.get(f"/v1/trainings/{training_id}"))

    def list(self, state: str | None = None) -> list:
        return self._checked(self.http.get("/v1/trainings", params={"state": state} if state else None))

    def cancel(self, training_id: str) -> dict:
        return self._checked(self.http.delete(f"/v1/trainings/{training_id}"))

    def events(self, training_id: str) -> Iterator[tuple[str, dict]]:
        """(event, data) pairs until the stream ends (the training finished)."""
        with self.http.stream("GET", f"/v1/trainings/{training_id}/events", timeout=None) as response:
            if response.status_code >= 400:
                response.read()
                self._checked(response)
            yield from parse_sse(response.iter_lines())


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, dict]]:
    event, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def _archive_of(data: Path, folder: Path) -> Path:
    if data.is_file():
        return data
    if not data.is_dir():
        raise TrainingInputInvalid(f"--data {data}: no such folder or archive", field="data")
    archive = folder / "dataset.tar.gz"
    with tarfile.open(archive, "w:gz") as packed:
        for path in sorted(data.iterdir()):
            if path.is_file():
                packed.add(path, arcname=path.name)
    return archive


def _config_tree(path: Path, overrides: list[str]) -> dict:
    """The YAML config with --set overrides, checked locally (data.path is the uploaded dataset's)."""
    from .config import load_train_config

    config = load_train_config(path, overrides, **{"data.path": "/uploaded"})
    tree = config.model_dump(mode="json", exclude={"output_dir"})
    tree["data"].pop("path")
    return tree


def follow(client: TrainingClient, training_id: str, out=sys.stderr) -> dict:
    """Progress bar until the training ends; the final record."""
    from tqdm import tqdm

    bar, final = None, None
    try:
        for event, data in client.events(training_id):
            if event == "progress":
                if bar is None:
                    bar = tqdm(total=data.get("max_steps"), unit="step", dynamic_ncols=True, file=out)
                bar.n = data.get("step", 0)
                bar.set_postfix(loss=f"{data.get('loss', 0):.4f}", refresh=True)
            elif event == "state":
                final = data["training"]
                if bar is None:
                    print(f"{training_id}: {data['state']}" + (f" ({data['reason']})" if data.get("reason") else ""),
                          file=out, flush=True)
    finally:
        if bar is not None:
            bar.close()
    return final or client.status(training_id)


def _summary(record: dict) -> str:
    losses = record.get("losses") or []
    line = f"{record['id']}  {record['state']:<9}  {record['publish']['name']:<20}  step {record['step']}/" \
           f"{record['max_steps']}"
    line += f"  loss {losses[-1]:.4f}" if losses else ""
    line += f"  eta {record['eta_s']:.0f}s" if record.get("eta_s") else ""
    if record.get("published"):
        line += f"  -> {record['published']['adapter']}"
    if record.get("error"):
        line += f"  error: {record['error']}"
    return line


def _client(args) -> TrainingClient:
    return TrainingClient(args.server, args.token or os.environ.get(TOKEN_ENV))


def cmd_submit(args) -> int:
    client = _client(args)
    tree = _config_tree(Path(args.config), args.set)
    report = client.upload(Path(args.data))
    print(f"dataset {report['digest']}: {report['images']} images", file=sys.stderr)
    record = client.submit(tree, report["digest"], args.name, args.alias)
    print(record["id"], flush=True)
    if not args.follow:
        return 0
    final = follow(client, record["id"])
    print(_summary(final))
    return 0 if final["state"] == "succeeded" else 1


def cmd_status(args) -> int:
    record = _client(args).status(args.id)
    print(json.dumps(record, indent=2) if args.json else _summary(record))
    return 0


def cmd_list(args) -> int:
    records = _client(args).list(args.state)
    print(json.dumps(records, indent=2) if args.json else "\n".join(_summary(r) for r in records) or "no trainings")
    return 0


def cmd_cancel(args) -> int:
    record = _client(args).cancel(args.id)
    print(f"{record['id']}: cancel requested ({record['state']})")
    return 0


def add_commands(subparsers) -> None:
    """`train-submit` etc.; `lorafleet train submit ...` is routed to them (lorafleet/cli.py)."""
    def remote(name: str, handler, help_text: str):
        parser = subparsers.add_parser(f"train-{name}", prog=f"lorafleet train {name}", help=help_text)
        parser.add_argument("--server", required=True, help="the lorafleet server (http://HOST:PORT)")
        parser.add_argument("--token", help=f"a token with the train scope (default ${TOKEN_ENV})")
        parser.set_defaults(handler=handler)
        return parser

    submit = remote("submit", cmd_submit, "`train submit`: upload data, submit a training to a server")
    submit.add_argument("config", help="YAML training config")
    submit.add_argument("--data", required=True, help="a data folder (uploaded as tar.gz) or a zip/tar archive")
    submit.add_argument("--name", help="publish as (default: the config's publish.name)")
    submit.add_argument("--alias", action="append", default=[], help="alias to move to the new version")
    submit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    submit.add_argument("--follow", action="store_true", help="stream progress until the adapter is published")
    for name, handler, text in (("status", cmd_status, "`train status ID`: a training's state"),
                                ("cancel", cmd_cancel, "`train cancel ID`: stop a training")):
        parser = remote(name, handler, text)
        parser.add_argument("id")
        parser.add_argument("--json", action="store_true")
    listing = remote("list", cmd_list, "`train list`: trainings on a server, newest first")
    listing.add_argument("--state", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    listing.add_argument("--json", action="store_true")


