"""Only this server's page and its clients can drive it: checks in front of every route.

    python -m t5x_like.serve --workdir=runs/sft [--allowed_hosts=chat.example.org]
        [--cors_origins=https://tools.example.org]

A page on any other site can make the browser send requests to this server (a form, a fetch
with a "simple" body), and a DNS name rebound to 127.0.0.1 makes the browser treat it as that
site's own. Without an API key (the default on 127.0.0.1) nothing else stops them, so:

    Host       must name the bound address, a loopback name (localhost, 127.0.0.1, ::1), an IP
               address (a rebinding attack needs a DNS name) or one of --allowed_hosts ("*"
               turns the check off): else 421
    Origin     a request from another origin is refused (403) unless --cors_origins lists it;
               CORS headers are sent to listed origins only, and a preflight from any other
               origin is refused
    body       POST/PUT/PATCH bodies must be `Content-Type: application/json` (415): the types a
               cross-site form may send (text/plain, form encodings) never reach a route, and a
               cross-site fetch of JSON needs a preflight, which is refused
    headers    every response: X-Content-Type-Options: nosniff, Referrer-Policy: no-referrer,
               X-Frame-Options: DENY and (unless the route set one) a Content-Security-Policy
               allowing nothing; the page's own policy (`page_headers`) allows only its inline
               script and style (by hash) and this server's /vendor/ scripts, with
               frame-ancestors 'none' and Trusted Types required for HTML sinks

Behind a TLS proxy on the same machine, pass the public name in --allowed_hosts and have the
proxy keep `Host` and send `X-Forwarded-Proto` (uvicorn trusts it from 127.0.0.1), so the page's
own https origin counts as this server's.

The web page and the two libraries it uses are served by `add_page_routes`: `/` and
`/vendor/<file>` (marked and DOMPurify, pinned copies from npm in serving/web/vendor/ with their
licenses and checksums in VERSIONS.json), so the page makes no request to any other host.
"""

import base64
import dataclasses
import hashlib
import ipaddress
import json
import os
import re
from typing import Iterable
from urllib.parse import urlsplit

WEB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")
PAGE = os.path.join(WEB_DIR, "index.html")
VENDOR_DIR = os.path.join(WEB_DIR, "vendor")
VENDOR_FILES = ("marked.umd.js", "purify.min.js")  # the only files /vendor/ serves
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_WILDCARD_BINDS = ("0.0.0.0", "::", "")
_BODY_METHODS = ("POST", "PUT", "PATCH")
_CORS_METHODS = "GET, POST, PATCH, DELETE, OPTIONS"
_CORS_HEADERS = "Authorization, Content-Type, Idempotency-Key"
NOTHING_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
_COMMON = ((b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
           (b"x-frame-options", b"DENY"))


@dataclasses.dataclass(frozen=True)
class Policy:
    """Who may talk to the server; built from --host, --allowed_hosts and --cors_origins."""
    bound_host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()

    @classmethod
    def from_flags(cls, host: str, allowed_hosts: Iterable[str] = (),
                   cors_origins: Iterable[str] = ()) -> "Policy":
        from t5x_like.core.errors import UserError
        origins = []
        for origin in cors_origins or ():
            origin = origin.strip().rstrip("/")
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
                raise UserError(f"--cors_origins: {origin!r} is not an origin; write "
                                "scheme://host[:port], e.g. https://tools.example.org.")
            origins.append(origin.lower())
        return cls(host, tuple(h.strip().lower() for h in allowed_hosts or () if h.strip()),
                   tuple(origins))


def _hostname(host_header: str) -> str:
    """'Example.org:8000' -> 'example.org'; '[::1]:8000' -> '::1'."""
    host = host_header.strip().lower()
    port = ""
    if host.startswith("["):
        end = host.find("]")
        host, port = (host[1:end], host[end + 2:]) if end > 0 else ("", "")
    elif host.count(":") == 1:
        host, port = host.split(":", 1)
    if port and not port.isdigit():
        return ""  # not a host a browser would send
    return host.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def host_allowed(policy: Policy, host_header: str) -> bool:
    name = _hostname(host_header)
    if not name:
        return False
    if "*" in policy.allowed_hosts or _is_ip(name) or name in LOOPBACK_NAMES:
        return True
    bound = policy.bound_host.strip("[]").lower()
    return (bound not in _WILDCARD_BINDS and name == bound) or name in policy.allowed_hosts


def _host_port(host_header: str, scheme: str) -> tuple[str, str]:
    default = {"http": "80", "https": "443"}.get(scheme, "")
    host = host_header.strip().lower()
    if host.startswith("[") and "]" in host:
        name, rest = host[1:host.find("]")], host[host.find("]") + 1:]
        return name, rest[1:] if rest.startswith(":") else default
    if host.count(":") == 1:
        name, port = host.split(":")
        return name, port or default
    return host, default


def _same_origin(origin: str, scheme: str, host_header: str) -> bool:
    parts = urlsplit(origin)
    try:
        port = str(parts.port or {"http": 80, "https": 443}.get(parts.scheme, ""))
    except ValueError:
        return False
    return parts.scheme == scheme and \
        (parts.hostname or "", port) == _host_port(host_header, scheme)


def _json_error(status: int, message: str, code: str) -> tuple[int, bytes]:
    kind = "invalid_request_error" if status in (400, 415, 421) else "permission_error"
    return status, json.dumps({"error": {"message": message, "type": kind, "param": None,
                                         "code": code}}).encode()


class Middleware:
    """Pure ASGI: checks the request, then adds the security headers to the response."""

    def __init__(self, app, policy: Policy = Policy()):
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        method = scope["method"]
        origin = headers.get("origin")
        refused = self._refusal(scope, headers)
        if refused is not None:
            return await self._respond(send, *refused)
        cors = origin if origin is not None and origin.lower() in self.policy.cors_origins \
            else None
        if origin is not None and method == "OPTIONS" and \
                "access-control-request-method" in headers:
            return await self._respond(send, 204, b"", cors=cors)  # unlisted were refused

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                extra = [h for h in _COMMON if h[0] not in have]
                if b"content-security-policy" not in have:
                    extra.append((b"content-security-policy", NOTHING_CSP.encode()))
                if cors:
                    extra += self._cors_headers(cors, preflight=False)
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _refusal(self, scope, headers) -> tuple[int, bytes] | None:
        host = headers.get("host", "")
        if not host_allowed(self.policy, host):
            return _json_error(421, f"this server does not answer for host {host!r}; open it as "
                               "http://127.0.0.1:<port>/ (or localhost), or start it with "
                               "--allowed_hosts naming that host.", "host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and origin.lower() not in self.policy.cors_origins and \
                not _same_origin(origin, scope.get("scheme", "http"), host):
            return _json_error(403, f"requests from {origin!r} are not allowed; the server's "
                               "--cors_origins must list that origin.", "origin_not_allowed")
        if scope["method"] in _BODY_METHODS:
            media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media != "application/json":
                return _json_error(415, f"the request body must be sent as 'Content-Type: "
                                   f"application/json', not {media or 'no type'!r}.",
                                   "unsupported_media_type")
        return None

    def _cors_headers(self, origin: str, preflight: bool) -> list[tuple[bytes, bytes]]:
        out = [(b"access-control-allow-origin", origin.encode("latin-1")),
               (b"vary", b"Origin")]
        if preflight:
            out += [(b"access-control-allow-methods", _CORS_METHODS.encode()),
                    (b"access-control-allow-headers", _CORS_HEADERS.encode()),
                    (b"access-control-max-age", b"600")]
        return out

    async def _respond(self, send, status: int, body: bytes, cors: str | None = None):
        headers = [*_COMMON, (b"content-security-policy", NOTHING_CSP.encode()),
                   (b"content-length", str(len(body)).encode())]
        if body:
            headers.append((b"content-type", b"application/json"))
        if cors:
            headers += self._cors_headers(cors, preflight=True)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _hashes(tag: str, page: str) -> list[str]:
    out = []
    for body in re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S):
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        out.append(f"'sha256-{digest}'")
    return out


def page_headers(page: str) -> dict[str, str]:
    """The web page's headers: a CSP that runs only the page's own inline script and style
    (matched by hash, so an injected <script> never runs) and this server's /vendor/ files."""
    csp = "; ".join([
        "default-src 'none'",
        f"script-src 'self' {' '.join(_hashes('script', page))}",
        f"style-src 'self' {' '.join(_hashes('style', page))}",
        "img-src 'self' data:", "connect-src 'self'", "base-uri 'none'", "form-action 'none'",
        "frame-ancestors 'none'", "require-trusted-types-for 'script'",
        "trusted-types dompurify t5x_like"])
    return {"Content-Security-Policy": csp, "Cache-Control": "no-cache"}


def add_page_routes(app) -> None:
    """`/` (the chat page) and `/vendor/<file>` (its pinned libraries), read once now."""
    from fastapi.responses import JSONResponse, Response

    with open(PAGE, encoding="utf-8") as f:
        page = f.read()
    headers = page_headers(page)
    vendor = {}
    for name in VENDOR_FILES:
        with open(os.path.join(VENDOR_DIR, name), "rb") as f:
            vendor[name] = f.read()

    @app.get("/")
    async def chat_page():
        return Response(page, media_type="text/html; charset=utf-8", headers=headers)

    @app.get("/vendor/{name}")
    async def vendor_file(name: str):
        if name not in vendor:
            return JSONResponse({"error": {"message": f"no file {name!r}", "type":
                                           "not_found_error", "param": None, "code": None}},
                                status_code=404)
        return Response(vendor[name], media_type="text/javascript; charset=utf-8",
                        headers={"Cache-Control": "public, max-age=86400"})
