"""One router per resource, mounted under ``/api/v1`` by ``create_app``."""

from __future__ import annotations

from urllib.parse import unquote

from fastapi.routing import APIRoute
from starlette.routing import Match
from starlette.types import Scope


def _keep_encoded(segment: str) -> str:
    return segment.replace("%", "%25").replace("/", "%2F")


class EncodedSlashRoute(APIRoute):
    """A route whose path parameters may hold '/', sent percent-encoded as ``%2F``.

    The server decodes the path before routing, so an event id ``line3/cam2/7`` sent as
    ``line3%2Fcam2%2F7`` arrives as three segments and matches no ``{event_id}``. When the raw
    path has an encoded slash, this route matches the path with the '/' (and '%') inside each
    segment kept encoded, then decodes the parameters: an id is the segment the client sent, so
    ``/slices/a%2Ftimeline`` is slice ``a/timeline``, not the timeline of slice ``a``. (A
    ``{slice_id:path}`` converter would make those one URL, and change the route template the
    OpenAPI paths, the unknown-query check and the metrics' ``route`` label are keyed on.)
    """

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        raw = scope.get("raw_path")
        if scope["type"] != "http" or not raw or b"%2f" not in raw.lower():
            return super().matches(scope)
        try:
            sent = raw.decode("ascii")
        except UnicodeDecodeError:
            return super().matches(scope)
        path: str = scope["path"]
        decoded = unquote(sent)
        if not path.endswith(decoded):  # rewritten on the way in: route what the server saw
            return super().matches(scope)
        kept = "/".join(_keep_encoded(unquote(segment)) for segment in sent.split("/"))
        match, child = super().matches({**scope, "path": path[:len(path) - len(decoded)] + kept})
        if match != Match.NONE:
            params = dict(child.get("path_params", {}))
            for name in self.param_convertors:
                if isinstance(params.get(name), str):
                    params[name] = unquote(params[name])
            child["path_params"] = params
        return match, child
