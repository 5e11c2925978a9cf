"""The JSON API's results: the adapters table, one adapter, an adapter's folder as a zip, and the report, each from
the api/ function the CLI's command calls (GET /report answers exactly what `report --format json` prints)."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response, StreamingResponse

from api.adapters import adapter_dict, adapter_folder, get_adapter, list_adapters
from api.render import render_report
from api.report import ReportQuery, report_rows
from api.web.auth import api_token, context
from models.errors import InputError, NotFound
from models.specs import MAX_ID
from worker.store import MANIFEST, VERIFIED, LocalStore, store_for

router = APIRouter(dependencies=[Depends(api_token)])
CHUNK_BYTES = 1024 * 1024


@router.get("/adapters", tags=["adapters"], summary="Every adapter, oldest first")
def adapters_table(request: Request, base: str | None = Query(None, description="Only adapters of this base model."),
                   ) -> list[dict]:
    """What `adapters list --json` prints: base, kind, method, parameters, size on disk, losses, training time."""
    ctx = context(request)
    with ctx.session() as session:
        return [adapter_dict(adapter, ctx.settings.home) for adapter in list_adapters(session, base)]


@router.get("/adapters/{name}", tags=["adapters"], summary="One adapter")
def show_adapter(request: Request, name: str) -> dict:
    ctx = context(request)
    with ctx.session() as session:
        return adapter_dict(get_adapter(session, name), ctx.settings.home)


@router.get("/adapters/{name}/download", tags=["adapters"], response_class=StreamingResponse,
            summary="An adapter's folder as NAME.zip",
            responses={200: {"content": {"application/zip": {}}, "description": "The zip, streamed."}})
def download_adapter(request: Request, name: str) -> StreamingResponse:
    """The PEFT folder (adapter_config.json + adapter_model.safetensors; a whole model folder for a full fine-tune)
    under NAME/ in the zip: unzip it and load it with `PeftModel.from_pretrained(base, "NAME")`."""
    ctx = context(request)
    with ctx.session() as session:
        adapter = get_adapter(session, name)
    store = store_for(ctx.settings.home, ctx.settings)
    if isinstance(store, LocalStore):  # whatever a row says, nothing outside the store is served
        root = store.root.resolve()
        folder = (root / adapter.path).resolve()
        if not folder.is_relative_to(root) or folder == root:
            raise InputError(f"adapter {adapter.name!r} is recorded at {adapter.path!r}, outside the artifact store")
    try:
        folder = adapter_folder(adapter, ctx.settings.home)  # a remote store's folder: its verified local copy
    except InputError as exc:
        raise NotFound(str(exc)) from None
    return StreamingResponse(_zipped(folder, adapter.name), media_type="application/zip",
                             headers={"Content-Disposition": f'attachment; filename="{adapter.name}.zip"'})


class _Chunks(io.RawIOBase):
    """A write-only stream whose bytes are taken out as they come: zipfile writes a streamed archive into it."""

    def __init__(self):
        super().__init__()
        self.parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data, self.parts = b"".join(self.parts), []
        return data


def _zipped(folder: Path, name: str):
    """The folder's regular files as a zip under `name`/, yielded a chunk at a time; links are left out, so no
    file outside the folder is read."""
    sink = _Chunks()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_DEFLATED) as archive:
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not os.path.islink(os.path.join(root, d)))
            for file in sorted(files):
                path = Path(root, file)
                if path.is_symlink() or not path.is_file() or (Path(root) == folder and file in (MANIFEST, VERIFIED)):
                    continue
                entry_info = zipfile.ZipInfo.from_file(path, f"{name}/{path.relative_to(folder).as_posix()}")
                entry_info.compress_type = zipfile.ZIP_DEFLATED
                with path.open("rb") as source, archive.open(entry_info, "w") as entry:
                    while chunk := source.read(CHUNK_BYTES):
                        entry.write(chunk)
                        yield sink.take()
    yield sink.take()


@router.get("/report", tags=["report"], summary="The report's rows, intervals and deltas as JSON")
def report(request: Request,
           metric: list[str] = Query(["rouge"], description="'rouge', 'classification' or a stored metric name; "
                                                            "repeatable."),
           sweep: str | None = Query(None, description="Only the base row and adapters of this sweep."),
           split: str = "test", sort: str | None = Query(None, description="Sort by this metric, best first."),
           top: int | None = Query(None, ge=1, le=MAX_ID, description="The base row and the N best adapters.")
           ) -> Response:
    """Exactly what `manage.py report --metric M... [--sweep --split --sort --top] --format json` prints: one row
    per run with each metric's mean, 95% interval and Δ vs the base row, examples, training time, the varied
    hyperparameters and the best row marked."""
    query = ReportQuery(list(metric), split, sweep, sort, top)
    with context(request).session() as session:
        rows = report_rows(session, query)
    return Response(render_report(rows, query.metric_names, "json"), media_type="application/json")
