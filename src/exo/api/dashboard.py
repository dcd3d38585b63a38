"""The web dashboard: its built files when there are any, else a page saying how to build it."""

from html import escape
from pathlib import Path

from fastapi import FastAPI
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.staticfiles import StaticFiles

NOT_BUILT_PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>exo</title>
<style>body{{font-family:system-ui,sans-serif;max-width:40rem;margin:4rem auto;line-height:1.5}}
code,pre{{background:#f3f3f3;padding:.1rem .3rem;border-radius:4px}}</style></head>
<body>
<h1>exo is running</h1>
<p>The web dashboard is not built{where}. Build it once with:</p>
<pre>cd dashboard &amp;&amp; npm ci &amp;&amp; npm run build</pre>
<p>and restart exo (or pass <code>--dashboard-dir</code>). The API works without it:</p>
<ul>
<li><a href="/v1/models">/v1/models</a> &mdash; the models this cluster serves</li>
<li><a href="/state">/state</a> &mdash; the cluster state</li>
<li><a href="/instances">/instances</a> &mdash; placed model instances</li>
<li><a href="/docs">/docs</a> &mdash; the API reference</li>
</ul>
</body></html>
"""


def dashboard_built(dashboard_dir: Path | None) -> bool:
    return dashboard_dir is not None and (dashboard_dir / "index.html").is_file()


def not_built_page(dashboard_dir: Path | None) -> str:
    where = f" (no index.html in {escape(str(dashboard_dir))})" if dashboard_dir else ""
    return NOT_BUILT_PAGE.format(where=where)


def mount_dashboard(app: FastAPI, dashboard_dir: Path | None) -> None:
    """GET / and the dashboard's assets; call after every API route so they take precedence."""

    @app.get("/", include_in_schema=False, response_model=None)
    async def index() -> Response:  # pyright: ignore[reportUnusedFunction]
        if dashboard_dir is not None and dashboard_built(dashboard_dir):
            return FileResponse(dashboard_dir / "index.html", media_type="text/html")
        return HTMLResponse(not_built_page(dashboard_dir))

    if dashboard_dir is not None and dashboard_dir.is_dir():
        app.mount("/", StaticFiles(directory=dashboard_dir, html=True), name="dashboard")
