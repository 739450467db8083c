"""The studio's projects in the SQLite store: a story with its branches, Memory, Author's Note
and Lorebook, saved as JSON and exported as JSON or Markdown."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request as HTTPRequest
from fastapi.responses import Response

from llmos.server import protocol as P
from llmos.server.errors import APIError, not_found
from llmos.server.state import state

router = APIRouter(tags=["Studio projects"])


def _missing(project_id: int) -> APIError:
    return not_found(f"no project {project_id}", "project_id")


@router.get("/api/projects", response_model=P.Projects)
def list_projects(http: HTTPRequest):
    return {"projects": state(http).store.list_projects()}


@router.post("/api/projects", response_model=P.Project)
def create_project(body: P.ProjectBody, http: HTTPRequest):
    return state(http).store.save_project(body.name or "Untitled", body.data)


@router.get("/api/projects/{project_id}", response_model=P.Project)
def get_project(project_id: P.RowId, http: HTTPRequest):
    try:
        return state(http).store.get_project(project_id)
    except KeyError:
        raise _missing(project_id) from None


@router.put("/api/projects/{project_id}", response_model=P.Project)
def put_project(project_id: P.RowId, body: P.ProjectBody, http: HTTPRequest):
    try:
        return state(http).store.save_project(body.name or "Untitled", body.data, project_id)
    except KeyError:
        raise _missing(project_id) from None


@router.delete("/api/projects/{project_id}", response_model=P.Deleted)
def delete_project(project_id: P.RowId, http: HTTPRequest):
    try:
        state(http).store.delete_project(project_id)
    except KeyError:
        raise _missing(project_id) from None
    return {"deleted": project_id}


@router.get("/api/projects/{project_id}/export",
            responses={200: {"content": {"application/json": {}, "text/markdown": {}}}})
def export_project(project_id: P.RowId, http: HTTPRequest, format: str = "json"):
    try:
        p = state(http).store.get_project(project_id)
    except KeyError:
        raise _missing(project_id) from None
    if format == "json":
        return Response(json.dumps(p, ensure_ascii=False, indent=2), media_type="application/json",
                        headers={"Content-Disposition": f'attachment; filename="project-{project_id}.json"'})
    if format in ("md", "markdown"):
        return Response(_markdown(p), media_type="text/markdown",
                        headers={"Content-Disposition": f'attachment; filename="project-{project_id}.md"'})
    raise APIError(400, "format must be json or md", "format")


def _markdown(project: dict) -> str:
    data = project.get("data", {})
    lines = [f"# {project['name']}", ""]
    for key, title in (("memory", "Memory"), ("authors_note", "Author's Note")):
        if data.get(key):
            lines += [f"**{title}:** {data[key]}", ""]
    text = data.get("text")
    if text is None and isinstance(data.get("nodes"), dict) and data.get("current") in data["nodes"]:
        node, parts = data["current"], []
        while node is not None and node in data["nodes"]:
            parts.append(data["nodes"][node].get("text", ""))
            node = data["nodes"][node].get("parent")
        text = "".join(reversed(parts))
    lines.append(text or "")
    for entry in data.get("lorebook", []) or []:
        if isinstance(entry, dict):
            lines += ["", f"- **{', '.join(entry.get('keys', []))}**: {entry.get('content', '')}"]
    return "\n".join(lines) + "\n"
