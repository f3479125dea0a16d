"""The few calls of Label Studio's REST API that the review loop needs (requests, token auth).

Create a project from ``review.labeling_config``, import ``review.to_tasks``'s tasks (their
predictions included), annotate a task (the demo answers from the generator's truth), and
export the project as JSON for ``review.import_reviews``. Tokens are Label Studio's legacy API
tokens (``Authorization: Token ...``; the server needs ``LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true``
for them in 1.20 and later).
"""

from __future__ import annotations

import logging
from typing import Any

import requests

from .export import FROM_NAME, TO_NAME

log = logging.getLogger(__name__)


class LabelStudioError(RuntimeError):
    """Label Studio answered with an error."""


class LabelStudio:
    """A client for one server: ``LabelStudio("http://127.0.0.1:8080", token)``."""

    def __init__(self, url: str, token: str, timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {token}"
        self.timeout = timeout

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        answer = self.session.request(method, self.url + path, timeout=self.timeout, **kwargs)
        if answer.status_code >= 400:
            raise LabelStudioError(f"Label Studio {method} {path}: HTTP {answer.status_code}: {answer.text[:300]}")
        return answer.json() if answer.content else None

    def create_project(self, title: str, label_config: str) -> int:
        return self._call("POST", "/api/projects", json={"title": title, "label_config": label_config})["id"]

    def import_tasks(self, project: int, tasks: list[dict[str, Any]]) -> int:
        """Import tasks (with their predictions); returns how many the server took."""
        return self._call("POST", f"/api/projects/{project}/import", json=tasks)["task_count"]

    def tasks(self, project: int) -> list[dict[str, Any]]:
        """Every task of a project, predictions included."""
        out: list[dict[str, Any]] = []
        page = 1
        while True:
            answer = self._call("GET", "/api/tasks", params={"project": project, "page": page, "page_size": 500,
                                                             "fields": "all"})
            out += answer["tasks"]
            if len(out) >= answer["total"] or not answer["tasks"]:
                return out
            page += 1

    def annotate(self, task: int, choices: list[str], cancelled: bool = False) -> int:
        """Submit one annotation (the chosen labels; ``cancelled`` for a skip); returns its id."""
        result = [] if cancelled else [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices",
                                        "value": {"choices": choices}}]
        return self._call("POST", f"/api/tasks/{task}/annotations",
                          json={"result": result, "was_cancelled": cancelled})["id"]

    def export(self, project: int) -> bytes:
        """The project's annotated tasks in Label Studio's JSON export format."""
        answer = self.session.get(f"{self.url}/api/projects/{project}/export", params={"exportType": "JSON"},
                                  timeout=self.timeout)
        if answer.status_code >= 400:
            raise LabelStudioError(f"Label Studio export of project {project}: HTTP {answer.status_code}")
        return answer.content
