"""The web UI (setup, join, chat): static files under `static/`, no build step.

`mount_web_ui(app)` serves `index.html` at `/` and the rest under `/static/`. The page only
talks to relative URLs (`model/list`, `cluster/status`, `v1/chat/completions`...), so the same
files work behind the scheduler (`parallax run`) and behind `parallax chat`.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"
# the page is small and changes with the package: always revalidate
_NO_CACHE = {"Cache-Control": "no-cache"}


def mount_web_ui(app: FastAPI) -> None:
    """Serve the UI on `app`: `GET /` → index.html, `GET /static/*` → the other files."""
    index = STATIC_DIR / "index.html"
    if not index.is_file():
        raise FileNotFoundError(f"the web UI files are missing from {STATIC_DIR}")

    async def index_page() -> FileResponse:
        return FileResponse(index, media_type="text/html; charset=utf-8", headers=_NO_CACHE)

    app.add_api_route("/", index_page, methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="parallax-web-static")
