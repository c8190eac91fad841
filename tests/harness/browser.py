"""A small scripted browser for end-to-end tests.

Not a mock: real HTTP over real TLS with aiohttp.  It follows redirects itself
(one hop at a time, so every hop is recorded) and keeps its own cookie jar with
the rules a real browser applies to what the enforcer sets:

* ``Secure`` cookies only from and to https (http://127.0.0.1 / localhost counts
  as secure, as in Chromium);
* ``__Secure-`` needs ``Secure``; ``__Host-`` needs ``Secure``, ``Path=/`` and no
  ``Domain`` -- otherwise the cookie is dropped, as Chromium does;
* host-only vs. ``Domain`` matching, path matching, ``Max-Age``/``Expires``;
* ``SameSite``: ``Strict`` cookies are not sent when the navigation (or any
  redirect before it) came from another site, ``Lax`` (and no attribute) are not
  sent on cross-site POSTs, ``None`` needs ``Secure``;
* IP-address hosts work (aiohttp's own jar refuses them without unsafe=True).

``resolve={"app.test": "127.0.0.1"}`` makes names that exist only in tests
resolve to loopback, while TLS still verifies against the name.
"""

from __future__ import annotations

import email.utils
import ipaddress
import socket
import ssl
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from html.parser import HTMLParser
from urllib.parse import urlencode, urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

DEFAULT_HEADERS: dict[str, str] = {
    "Accept": "text/html",
    "Sec-Fetch-Mode": "navigate",
    "Sec-Fetch-Dest": "document",
}
USER_AGENT = "enforcer-scripted-browser/1.0"
REDIRECT_STATUSES = {301, 302, 303, 307, 308}


class BrowserError(Exception):
    pass


# ---------------------------------------------------------------- responses


@dataclass
class Response:
    status: int
    url: str
    headers: Mapping[str, str]
    text: str
    history: list[Response] = field(default_factory=list)
    method: str = "GET"
    set_cookies: list[str] = field(default_factory=list)

    @property
    def location(self) -> str | None:
        return self.headers.get("Location")

    @property
    def urls(self) -> list[str]:
        """Every URL visited, in order, ending with this one."""
        return [h.url for h in self.history] + [self.url]

    def forms(self) -> list[Form]:
        return parse_forms(self.text, self.url)

    def login_form(self) -> Form | None:
        for form in self.forms():
            if "password" in form.field_names():
                return form
        return None

    def consent_form(self) -> Form | None:
        """The OP's consent page's form (a ``consent`` field), shown after the sign-in when the
        client asked ``prompt=consent``."""
        for form in self.forms():
            if "consent" in form.field_names():
                return form
        return None


@dataclass
class Form:
    action: str
    method: str
    fields: list[tuple[str, str]]  # name, value (hidden/text/etc. with their values)
    input_ids: dict[str, str]  # id -> name
    attrs: dict[str, str]

    def field_names(self) -> set[str]:
        return {name for name, _ in self.fields}

    def values(self, overrides: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
        overrides = dict(overrides or {})
        out: list[tuple[str, str]] = []
        for name, value in self.fields:
            if name in overrides:
                out.append((name, overrides.pop(name)))
            else:
                out.append((name, value))
        out.extend(overrides.items())
        return out


class _FormParser(HTMLParser):
    def __init__(self, base_url: str) -> None:
        super().__init__(convert_charrefs=True)
        self.base_url = base_url
        self.forms: list[Form] = []
        self._current: Form | None = None
        self._by_id: dict[str, Form] = {}
        self._orphans: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs_list: list[tuple[str, str | None]]) -> None:
        attrs = {k: (v or "") for k, v in attrs_list}
        if tag == "form":
            form = Form(
                action=urljoin(self.base_url, attrs.get("action") or self.base_url),
                method=(attrs.get("method") or "get").upper(),
                fields=[],
                input_ids={},
                attrs=attrs,
            )
            self.forms.append(form)
            self._current = form
            if "id" in attrs:
                self._by_id[attrs["id"]] = form
            return
        if tag in {"input", "button", "textarea", "select"}:
            owner = self._current
            if "form" in attrs:
                owner = self._by_id.get(attrs["form"])
                if owner is None:
                    self._orphans.append((tag, attrs))
                    return
            if owner is not None:
                self._add(owner, tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._current = None

    def close(self) -> None:
        super().close()
        for tag, attrs in self._orphans:
            owner = self._by_id.get(attrs.get("form", ""))
            if owner is not None:
                self._add(owner, tag, attrs)

    @staticmethod
    def _add(form: Form, tag: str, attrs: dict[str, str]) -> None:
        name = attrs.get("name")
        if "id" in attrs and name:
            form.input_ids[attrs["id"]] = name
        if not name:
            return
        kind = attrs.get("type", "text" if tag == "input" else "submit").lower()
        if kind in {"submit", "button", "image", "reset", "file"}:
            return  # buttons only count when clicked
        if kind in {"checkbox", "radio"} and "checked" not in attrs:
            return
        form.fields.append((name, attrs.get("value", "")))


def parse_forms(html: str, base_url: str) -> list[Form]:
    parser = _FormParser(base_url)
    parser.feed(html)
    parser.close()
    return parser.forms


# ---------------------------------------------------------------- cookies


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _site(scheme: str, host: str) -> tuple[str, str]:
    """Approximate 'site' (scheme + registrable domain) without a public suffix list."""
    host = host.lower().rstrip(".")
    if _is_ip(host) or "." not in host:
        return scheme, host
    return scheme, ".".join(host.split(".")[-2:])


def _potentially_trustworthy(scheme: str, host: str) -> bool:
    if scheme in {"https", "wss"}:
        return True
    host = host.strip("[]").lower()
    return host in {"localhost", "127.0.0.1", "::1"} or host.endswith(".localhost")


@dataclass
class Cookie:
    name: str
    value: str
    domain: str
    host_only: bool
    path: str
    secure: bool
    http_only: bool
    same_site: str  # "strict" | "lax" | "none" | "" (unspecified, treated as lax)
    expires: float | None  # epoch seconds; None = session cookie
    created: float

    def expired(self, now: float) -> bool:
        return self.expires is not None and self.expires <= now


class BrowserCookieJar:
    """Browser-like cookie storage (RFC 6265bis subset)."""

    def __init__(self) -> None:
        self._cookies: dict[tuple[str, str, str], Cookie] = {}
        self.rejected: list[tuple[str, str]] = []  # (set-cookie header, reason)

    def __iter__(self) -> Iterator[Cookie]:
        now = time.time()
        return iter([c for c in self._cookies.values() if not c.expired(now)])

    def __len__(self) -> int:
        return len(list(iter(self)))

    def get(self, name: str, host: str | None = None) -> Cookie | None:
        for c in self:
            if c.name == name and (host is None or c.domain == host.lower()):
                return c
        return None

    def names(self) -> list[str]:
        return sorted({c.name for c in self})

    def clear(self) -> None:
        self._cookies.clear()

    def _reject(self, header: str, reason: str) -> None:
        self.rejected.append((header, reason))

    def set_from_header(self, header: str, url: str) -> None:
        parts = urlsplit(url)
        scheme = parts.scheme
        host = (parts.hostname or "").lower()
        now = time.time()
        pieces = header.split(";")
        name, sep, value = pieces[0].partition("=")
        if not sep:
            self._reject(header, "no '='")
            return
        name, value = name.strip(), value.strip()
        if not name:
            self._reject(header, "empty name")
            return
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        attrs: dict[str, str] = {}
        for piece in pieces[1:]:
            k, _, v = piece.partition("=")
            attrs[k.strip().lower()] = v.strip()

        secure = "secure" in attrs
        if secure and not _potentially_trustworthy(scheme, host):
            self._reject(header, "Secure cookie from an insecure origin")
            return
        domain_attr = attrs.get("domain", "").lstrip(".").lower()
        if domain_attr:
            if _is_ip(host):
                if domain_attr != host:
                    self._reject(header, "Domain does not match IP host")
                    return
                domain_attr = ""
            elif not (host == domain_attr or host.endswith("." + domain_attr)):
                self._reject(header, "Domain does not domain-match the host")
                return
        path = attrs.get("path", "")
        if not path.startswith("/"):
            default = parts.path or "/"
            path = default[: default.rfind("/")] or "/"

        lname = name.lower()
        if lname.startswith("__secure-") and not secure:
            self._reject(header, "__Secure- cookie without Secure")
            return
        if lname.startswith("__host-"):
            if not secure:
                self._reject(header, "__Host- cookie without Secure")
                return
            if "domain" in attrs:
                self._reject(header, "__Host- cookie with Domain")
                return
            if path != "/":
                self._reject(header, "__Host- cookie without Path=/")
                return

        same_site = attrs.get("samesite", "").lower()
        if same_site not in {"strict", "lax", "none"}:
            same_site = ""
        if same_site == "none" and not secure:
            self._reject(header, "SameSite=None without Secure")
            return

        expires: float | None = None
        if "max-age" in attrs:
            try:
                expires = now + int(attrs["max-age"])
            except ValueError:
                expires = None
        elif attrs.get("expires"):
            try:
                expires = email.utils.parsedate_to_datetime(attrs["expires"]).timestamp()
            except (TypeError, ValueError):
                expires = None

        cookie_domain = domain_attr or host
        key = (cookie_domain, path, name)
        if expires is not None and expires <= now:
            self._cookies.pop(key, None)
            return
        old = self._cookies.get(key)
        self._cookies[key] = Cookie(
            name=name,
            value=value,
            domain=cookie_domain,
            host_only=not domain_attr,
            path=path,
            secure=secure,
            http_only="httponly" in attrs,
            same_site=same_site,
            expires=expires,
            created=old.created if old else now,
        )

    def header_for(self, url: str, *, same_site: bool, method: str) -> str:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        path = parts.path or "/"
        secure_ok = _potentially_trustworthy(parts.scheme, host)
        now = time.time()
        chosen: list[Cookie] = []
        for c in list(self._cookies.values()):
            if c.expired(now):
                self._cookies.pop((c.domain, c.path, c.name), None)
                continue
            if c.host_only:
                if host != c.domain:
                    continue
            elif not (host == c.domain or host.endswith("." + c.domain)):
                continue
            if not (
                path == c.path
                or (path.startswith(c.path) and (c.path.endswith("/") or path[len(c.path)] == "/"))
            ):
                continue
            if c.secure and not secure_ok:
                continue
            if not same_site:
                if c.same_site == "strict":
                    continue
                if c.same_site in {"lax", ""} and method not in {"GET", "HEAD"}:
                    continue
            chosen.append(c)
        chosen.sort(key=lambda c: (-len(c.path), c.created))
        return "; ".join(f"{c.name}={c.value}" for c in chosen)


# ---------------------------------------------------------------- resolver


class StaticResolver(AbstractResolver):
    """Resolve a few test-only names to loopback; everything else must be an IP
    literal or localhost (tests never leave the machine)."""

    def __init__(self, mapping: Mapping[str, str]) -> None:
        self._mapping = {k.lower(): v for k, v in mapping.items()}

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        name = host.lower().rstrip(".")
        address = self._mapping.get(name)
        if address is None:
            if _is_ip(name):
                address = name.strip("[]")
            elif name == "localhost" or name.endswith(".localhost"):
                address = "127.0.0.1"
            else:
                raise OSError(f"scripted browser: no address for {host!r} (add it to resolve=)")
        ip = ipaddress.ip_address(address)
        fam = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        return [
            {
                "hostname": host,
                "host": str(ip),
                "port": port,
                "family": fam,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        return None


# ---------------------------------------------------------------- browser


class ScriptedBrowser:
    """Real HTTP(S) client that behaves like a browser navigating pages.

    Use as ``async with ScriptedBrowser(ctx) as b: ...`` (or call ``close()``).
    """

    def __init__(
        self,
        ssl_context: ssl.SSLContext | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        resolve: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        new_connection_per_request: bool = False,
    ) -> None:
        self.ssl_context = ssl_context or ssl.create_default_context()
        self.force_close = new_connection_per_request
        self.headers = dict(DEFAULT_HEADERS if headers is None else headers)
        self.resolve = dict(resolve or {})
        self.timeout = timeout
        self.cookies = BrowserCookieJar()
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ScriptedBrowser:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                ssl=self.ssl_context,
                resolver=StaticResolver(self.resolve),
                force_close=self.force_close,
                limit=10,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                auto_decompress=True,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _one(
        self,
        method: str,
        url: str,
        *,
        data: list[tuple[str, str]] | None,
        same_site: bool,
        fetch_site: str,
        origin: str | None,
        extra_headers: Mapping[str, str] | None,
    ) -> Response:
        headers = {"User-Agent": USER_AGENT, **self.headers, "Sec-Fetch-Site": fetch_site}
        if extra_headers:
            headers.update(extra_headers)
        cookie = self.cookies.header_for(url, same_site=same_site, method=method)
        if cookie:
            headers["Cookie"] = cookie
        body: bytes | None = None
        if data is not None:
            body = urlencode(data).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            if origin is not None:
                headers["Origin"] = origin
        session = self._get_session()
        async with session.request(
            method, url, headers=headers, data=body, allow_redirects=False
        ) as resp:
            text = await resp.text(errors="replace")
            set_cookies = resp.headers.getall("Set-Cookie", [])
            for sc in set_cookies:
                self.cookies.set_from_header(sc, url)
            return Response(
                status=resp.status,
                url=url,
                headers=dict(resp.headers),
                text=text,
                method=method,
                set_cookies=list(set_cookies),
            )

    async def request(
        self,
        method: str,
        url: str,
        *,
        data: list[tuple[str, str]] | Mapping[str, str] | None = None,
        follow: bool = True,
        max_hops: int = 20,
        referrer: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Navigate: ``referrer`` is the page the navigation starts from (None =
        typed into the address bar)."""
        if isinstance(data, Mapping):
            data = list(data.items())
        history: list[Response] = []
        initiator = referrer
        chain_cross_site = False
        method = method.upper()
        for _ in range(max_hops + 1):
            target = urlsplit(url)
            if initiator is None:
                fetch_site, same = "none", True
            else:
                ini = urlsplit(initiator)
                ini_origin = (ini.scheme, ini.hostname, ini.port)
                if ini_origin == (target.scheme, target.hostname, target.port):
                    fetch_site = "same-origin"
                elif _site(ini.scheme, ini.hostname or "") == _site(
                    target.scheme, target.hostname or ""
                ):
                    fetch_site = "same-site"
                else:
                    fetch_site = "cross-site"
                chain_cross_site = chain_cross_site or fetch_site == "cross-site"
                same = not chain_cross_site
            origin = None
            if referrer is not None and data is not None:
                r = urlsplit(referrer)
                origin = f"{r.scheme}://{r.netloc}"
            resp = await self._one(
                method,
                url,
                data=data,
                same_site=same,
                fetch_site=fetch_site,
                origin=origin,
                extra_headers=headers,
            )
            if not follow or resp.status not in REDIRECT_STATUSES or not resp.location:
                resp.history = history
                return resp
            history.append(resp)
            next_url = urljoin(url, resp.location)
            next_url = next_url.split("#", 1)[0]
            if resp.status in {301, 302, 303} and method not in {"GET", "HEAD"}:
                method, data = "GET", None
            initiator = url
            url = next_url
        raise BrowserError(f"more than {max_hops} redirects: {[h.url for h in history]}")

    async def get(self, url: str, follow: bool = True, max_hops: int = 20) -> Response:
        return await self.request("GET", url, follow=follow, max_hops=max_hops)

    async def post(
        self,
        url: str,
        data: list[tuple[str, str]] | Mapping[str, str],
        *,
        follow: bool = True,
        referrer: str | None = None,
    ) -> Response:
        return await self.request("POST", url, data=data, follow=follow, referrer=referrer)

    async def submit_form(
        self,
        page: Response,
        values: Mapping[str, str] | None = None,
        *,
        form: Form | None = None,
        follow: bool = True,
    ) -> Response:
        """Submit a form of ``page`` (default: the first), as a click on its
        submit button would."""
        if form is None:
            forms = page.forms()
            if not forms:
                raise BrowserError(f"no form on {page.url} (status {page.status})")
            form = forms[0]
        fields = form.values(values)
        if form.method == "GET":
            parts = urlsplit(form.action)
            url = parts._replace(query=urlencode(fields), fragment="").geturl()
            return await self.request("GET", url, follow=follow, referrer=page.url)
        result = await self.request(
            form.method, form.action, data=fields, follow=follow, referrer=page.url
        )
        result.history = [*page.history, page, *result.history]
        return result

    async def submit_login(
        self, page: Response, username: str, password: str, *, follow: bool = True
    ) -> Response:
        """Fill the OP's login form (fields ``login`` and ``password``) and post it."""
        form = page.login_form()
        if form is None:
            raise BrowserError(
                f"no login form on {page.url} (status {page.status}): {page.text[:300]!r}"
            )
        user_field = "login" if "login" in form.field_names() else "username"
        return await self.submit_form(
            page, {user_field: username, "password": password}, form=form, follow=follow
        )

    async def login(self, start_url: str, username: str, password: str) -> Response:
        """GET a protected URL, follow to the OP, log in, allow access on the OP's consent
        page if it shows one (as a user clicks "Allow"), follow back.  If no login form shows
        up (already logged in) the first response (after any consent) is returned."""
        page = await self.get(start_url)
        if page.login_form() is not None:
            page = await self.submit_login(page, username, password)
        return await self.confirm_consent(page)

    async def confirm_consent(self, page: Response) -> Response:
        """Click "Allow" on the OP's consent page if ``page`` is one; else ``page``."""
        form = page.consent_form()
        return page if form is None else await self.submit_form(page, form=form)

    async def logout(self, url: str) -> Response:
        """GET a logout URL and confirm the OP's sign-out form if one is shown."""
        page = await self.get(url)
        for form in page.forms():
            if "logout" in form.field_names() or "xsrf" in form.field_names():
                return await self.submit_form(page, form=form)
        return page
