"""Who may use the server: the Host it is asked by, the Origin a browser names, the body's type,
and the API key.

A server on localhost is reachable from every web page the user opens. Two ways in, both
closed here before any work is done:

* DNS rebinding: a page at attacker.example re-points its name to 127.0.0.1 and talks to the
  server as its own origin. Its requests say `Host: attacker.example`. Bound to a loopback
  address, the server answers only Hosts that are loopback names or addresses (or one
  `--allowed-hosts` names); bound elsewhere, any Host unless `--allowed-hosts` is given.
* Cross-origin "simple" requests: a POST with `Content-Type: text/plain` reaches the server
  without a CORS preflight, and CORS only hides the answer, after the work is done. A request
  whose Origin is not allowed (localhost pages, editor and desktop webviews, `--cors-origin`,
  origins on an `--allowed-hosts` name) is refused with 403, and a body must say it is JSON
  (415 otherwise), which no simple request can.

With API keys set, /v1 and the store routes need one (`Authorization: Bearer KEY` or
`x-api-key`). The refusals are raised as HTTP errors, so each route's own error handlers give
them the API's shape (Anthropic's on /v1/messages, OpenAI's elsewhere).
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from dataclasses import dataclass

from litestar.connection import ASGIConnection
from litestar.exceptions import HTTPException, NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler

LOOPBACK_NAMES = ("localhost",)
# pages that are not on the web: editors' and desktop apps' webviews (Ollama allows the same)
APP_ORIGIN_SCHEMES = ("app", "tauri", "vscode-webview", "vscode-file")
_BODY_METHODS = ("POST", "PUT", "PATCH")


def is_loopback(host: str) -> bool:
    """A loopback name or address: localhost, *.localhost, 127.0.0.0/8, ::1."""
    host = host.lower().rstrip(".")
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str:
    """The name in a Host header or an origin's authority, without its port: `[::1]:8000` -> `::1`."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value[1:]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """check_host: answer only loopback Hosts and allowed_hosts (true when bound to loopback or
    when hosts were named). allowed_hosts: names (or `*`) beyond loopback; cors_origins: exact
    origins (or `*`) beyond localhost and app webviews."""

    check_host: bool = True
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()

    @classmethod
    def for_bind(cls, bind_host: str, allowed_hosts: tuple[str, ...] = (),
                 cors_origins: tuple[str, ...] = ()) -> "AccessPolicy":
        names = tuple(host_name(h) if h != "*" else h for h in allowed_hosts)
        check = "*" not in names and (is_loopback(bind_host) or bool(names))
        return cls(check_host=check, allowed_hosts=names, cors_origins=tuple(cors_origins))

    def host_allowed(self, host: str | None) -> bool:
        if not self.check_host or not host:  # no Host at all: HTTP/1.0, never a browser
            return True
        name = host_name(host)
        return is_loopback(name) or name in self.allowed_hosts

    def origin_allowed(self, origin: str) -> bool:
        if "*" in self.cors_origins or origin in self.cors_origins:
            return True
        scheme, sep, authority = origin.partition("://")
        if not sep:
            return False  # "null": a file:// page, a sandboxed frame, a redirect
        if scheme.lower() in APP_ORIGIN_SCHEMES:
            return True
        if scheme.lower() not in ("http", "https"):
            return False
        name = host_name(authority)
        return is_loopback(name) or (name in self.allowed_hosts and "*" not in self.allowed_hosts)

    def cors_regex(self) -> str:
        """The same origins for the CORS middleware, which answers preflights and sets the
        headers that let an allowed page read an answer."""
        names = [r"localhost", r"[a-z0-9.-]+\.localhost", r"127(?:\.\d{1,3}){3}", r"\[::1\]"]
        names += [re.escape(h) for h in self.allowed_hosts if h != "*"]
        schemes = "|".join(re.escape(s) for s in APP_ORIGIN_SCHEMES)
        return rf"https?://(?:{'|'.join(names)})(?::\d+)?|(?:{schemes})://.*"


class UnsupportedMediaType(HTTPException):
    status_code = 415


def is_json_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def access_guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Host, Origin and content type, for every route, before its body is read."""
    from localserve.server.state import STATE_KEY

    policy: AccessPolicy = connection.app.state[STATE_KEY].access
    host = connection.headers.get("host")
    if not policy.host_allowed(host):
        raise PermissionDeniedException(
            f"host {host!r} is not allowed: this server answers localhost names and addresses; "
            "start it with --allowed-hosts NAME to serve another name")
    origin = connection.headers.get("origin")
    if origin is not None and not policy.origin_allowed(origin):
        raise PermissionDeniedException(
            f"origin {origin!r} is not allowed: pages on localhost and editor webviews are; "
            "start the server with --cors-origin ORIGIN to allow another")
    if connection.scope["method"] in _BODY_METHODS and not is_json_type(connection.headers.get("content-type", "")):
        given = connection.headers.get("content-type") or "none"
        raise UnsupportedMediaType(
            f"the request body must be JSON, sent with 'Content-Type: application/json' (got {given})")


def given_key(connection: ASGIConnection) -> str:
    auth = connection.headers.get("authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else connection.headers.get("x-api-key", "")


def key_matches(given: str, keys: tuple[str, ...]) -> bool:
    return any(hmac.compare_digest(given.encode(), k.encode()) for k in keys)


def api_key_guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """With API keys set, every /v1 route needs `Authorization: Bearer KEY` (or `x-api-key`)."""
    from localserve.server.state import STATE_KEY

    keys = connection.app.state[STATE_KEY].api_keys
    if not keys or not connection.url.path.startswith("/v1"):
        return
    given = given_key(connection)
    if not given:
        raise NotAuthorizedException("missing API key: send 'Authorization: Bearer <key>'")
    if not key_matches(given, keys):
        raise NotAuthorizedException("invalid API key")


def store_key_guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """The store's routes (pull, quantize, delete, and what they list) need the key whenever the
    server has one."""
    from localserve.server.state import STATE_KEY

    keys = connection.app.state[STATE_KEY].api_keys
    if keys and not key_matches(given_key(connection), keys):
        raise NotAuthorizedException("this route needs the server's API key: send 'Authorization: Bearer <key>'")
