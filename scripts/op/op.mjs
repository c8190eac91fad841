// A real OpenID Provider for enforcer's end-to-end tests and demo.
//
// This is panva's oidc-provider (certified OpenID Connect implementation) with a
// tiny custom login page.  It is NOT a mock: discovery, JWKS, authorization
// endpoint, token endpoint, userinfo, revocation and RP-initiated logout are the
// library's real implementations.
//
//   node scripts/op/op.mjs config.json
//
// config.json:
//   {
//     "issuer": "https://127.0.0.1:PORT",   // optional: derived from the bound port
//     "host": "127.0.0.1", "port": 0,       // 0 = pick a free port
//     "cert": "/path/leaf.crt", "key": "/path/leaf.key",
//     "clients": [{ "client_id": "...", "client_secret": "...", "redirect_uris": [...],
//                   "post_logout_redirect_uris": [...],
//                   "token_endpoint_auth_method": "client_secret_basic" }],
//     "users": { "alice": { "password": "...", "claims": { "email": "...", "groups": [...] } } },
//     "ttl": { "IdToken": 10, ... },          // optional: token lifetimes (s) instead of the defaults
//     "rotate_refresh_tokens": true,          // optional: a new refresh token at every refresh
//     "test_admin_port": 0                    // optional, TESTS ONLY: see "test admin" below
//   }
//
// Consent: a request with prompt=consent (what enforcer sends when it asks offline_access)
// gets a consent page after the sign-in, which the user confirms with a button (#submit, a
// form field "consent"); oidc-provider keeps offline_access (and issues a refresh token) only
// then. Any other request is consented to without asking (a first-party test OP).
//
// Test admin (a test device, never for a real deployment): with "test_admin_port", a second,
// plain-HTTP listener on 127.0.0.1 only (loopback of the OP's network namespace) answers
//   GET  /events                the provider's events so far (authorization requests, token
//                               grants with their grant_type, errors, rotations, revocations)
//   POST /users/NAME/claims     {"groups": [...]}: merge into that user's claims (what the next
//                               ID token, e.g. of a refresh, says)
// It prints "ADMIN <port>" on stdout before READY, and logs each event on stderr ("EVENT ...").
//
// Prints exactly one line "READY <issuer>" on stdout once it is listening.
// Exits cleanly on SIGTERM / SIGINT.

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as https from 'node:https';

import Provider from 'oidc-provider';

const configPath = process.argv[2];
if (!configPath) {
  console.error('usage: node op.mjs CONFIG.json');
  process.exit(2);
}
const config = JSON.parse(fs.readFileSync(configPath, 'utf8'));
const users = config.users ?? {};
const host = config.host ?? '127.0.0.1';
const events = [];

// ---------------------------------------------------------------- keys

function privateJwk(type, options, alg) {
  const { privateKey } = crypto.generateKeyPairSync(type, options);
  const jwk = privateKey.export({ format: 'jwk' });
  const pub = { kty: jwk.kty, crv: jwk.crv, n: jwk.n, e: jwk.e, x: jwk.x, y: jwk.y };
  for (const k of Object.keys(pub)) if (pub[k] === undefined) delete pub[k];
  const kid = crypto.createHash('sha256').update(JSON.stringify(pub)).digest('base64url').slice(0, 16);
  return { ...jwk, kid, alg, use: 'sig' };
}

// The first key is the default signing key (RS256); an ES256 key is published too.
const jwks = {
  keys: [
    privateJwk('rsa', { modulusLength: 2048 }, 'RS256'),
    privateJwk('ec', { namedCurve: 'P-256' }, 'ES256'),
  ],
};

// ---------------------------------------------------------------- HTML

function esc(value) {
  return String(value ?? '')
    .replace(/&/g, '&amp;')
    .replace(/</g, '&lt;')
    .replace(/>/g, '&gt;')
    .replace(/"/g, '&quot;')
    .replace(/'/g, '&#39;');
}

const STYLE = `
  body { font-family: system-ui, sans-serif; background: #f3f4f6; margin: 0; }
  main { max-width: 22rem; margin: 4rem auto; background: #fff; padding: 1.5rem 2rem 2rem;
         border-radius: 8px; box-shadow: 0 1px 4px rgba(0,0,0,.15); }
  h1 { font-size: 1.3rem; margin: 0 0 .25rem; }
  p.sub { color: #555; margin: 0 0 1.25rem; font-size: .9rem; }
  label { display: block; font-size: .9rem; margin: .75rem 0 .25rem; }
  input[type=text], input[type=password] { width: 100%; box-sizing: border-box; padding: .5rem;
         font-size: 1rem; border: 1px solid #bbb; border-radius: 4px; }
  button { margin-top: 1.25rem; width: 100%; padding: .6rem; font-size: 1rem; border: 0;
           border-radius: 4px; background: #2563eb; color: #fff; cursor: pointer; }
  .error { background: #fee2e2; color: #991b1b; padding: .5rem .75rem; border-radius: 4px;
           font-size: .9rem; }
  code { font-size: .85rem; }
`;

function page(title, body) {
  return `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>${esc(title)}</title>
<style>${STYLE}</style>
</head>
<body>
<main>
${body}
</main>
</body>
</html>
`;
}

function consentPage(uid, clientId, scope) {
  return page('Allow access – Test OpenID Provider', `
<h1>Allow access</h1>
<p class="sub"><code>${esc(clientId)}</code> asks for: <code id="scope">${esc(scope)}</code></p>
<form method="post" action="/interaction/${esc(uid)}/confirm">
  <input type="hidden" name="consent" value="yes">
  <button type="submit" id="submit">Allow</button>
</form>`);
}

// Whether the client asked for an explicit consent (prompt=consent).
function consentRequested(details) {
  return String(details.params.prompt ?? '').split(' ').includes('consent');
}

function loginPage(uid, clientId, { login = '', error = '' } = {}) {
  return page('Sign in – Test OpenID Provider', `
<h1>Sign in</h1>
<p class="sub">Test OpenID Provider &middot; for <code>${esc(clientId)}</code></p>
${error ? `<p class="error" id="error">${esc(error)}</p>` : ''}
<form method="post" action="/interaction/${esc(uid)}/login" autocomplete="off">
  <label for="login">Username</label>
  <input type="text" id="login" name="login" value="${esc(login)}" required${login ? '' : ' autofocus'}>
  <label for="password">Password</label>
  <input type="password" id="password" name="password" required${login ? ' autofocus' : ''}>
  <button type="submit" id="submit">Sign in</button>
</form>`);
}

// ---------------------------------------------------------------- provider

function accountFor(accountId) {
  const user = users[accountId];
  if (!user) return undefined;
  return {
    accountId,
    // oidc-provider filters these by the granted scopes/claims.
    async claims() {
      return { ...(user.claims ?? {}), sub: accountId };
    },
  };
}

const clients = (config.clients ?? []).map((c) => ({
  grant_types: ['authorization_code', 'refresh_token'],
  response_types: ['code'],
  token_endpoint_auth_method: 'client_secret_basic',
  ...c,
}));

function providerConfiguration() {
  return {
    clients,
    jwks,
    findAccount: async (_ctx, sub) => accountFor(sub),
    claims: {
      openid: ['sub'],
      email: ['email', 'email_verified'],
      groups: ['groups'],
      profile: ['name', 'given_name', 'family_name', 'preferred_username'],
    },
    // Scope claims go into the ID token too (not only userinfo), which is what
    // enforcer reads.
    conformIdTokenClaims: false,
    responseTypes: ['code'],
    pkce: { required: () => true },
    cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
    interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
    features: {
      devInteractions: { enabled: false },
      userinfo: { enabled: true },
      revocation: { enabled: true },
      introspection: { enabled: true },
      backchannelLogout: { enabled: true },
      rpInitiatedLogout: {
        enabled: true,
        async logoutSource(ctx, form) {
          // `form` is the library's form (with its xsrf field); add the
          // "logout=yes" answer and a plain submit button to it.
          const withButton = form.replace(
            '</form>',
            '<input type="hidden" name="logout" value="yes">'
              + '<button type="submit" id="submit">Sign out</button></form>',
          );
          ctx.body = page('Sign out – Test OpenID Provider', `
<h1>Sign out</h1>
<p class="sub">Sign out of the Test OpenID Provider?</p>
${withButton}`);
        },
        async postLogoutSuccessSource(ctx) {
          ctx.body = page('Signed out – Test OpenID Provider', `
<h1 id="signed-out">Signed out</h1>
<p class="sub">You have been signed out of the Test OpenID Provider.</p>`);
        },
      },
    },
    async renderError(ctx, out) {
      ctx.type = 'html';
      const rows = Object.entries(out)
        .map(([k, v]) => `<p><b>${esc(k)}</b>: <code>${esc(v)}</code></p>`)
        .join('\n');
      ctx.body = page('Error – Test OpenID Provider', `<h1>Error</h1>\n${rows}`);
    },
    ttl: {
      // Sensible, explicit lifetimes (silences the library's "use your own" notices).
      AccessToken: 3600,
      AuthorizationCode: 60,
      IdToken: 3600,
      Interaction: 3600,
      Session: 86400,
      Grant: 86400,
      RefreshToken: 86400,
      ...(config.ttl ?? {}),
    },
    // Default: rotate once 70 % of the refresh token's lifetime has passed; tests want every time.
    ...(config.rotate_refresh_tokens ? { rotateRefreshToken: true } : {}),
  };
}

// ---------------------------------------------------------------- events (for tests and the log)

function noteEvent(name, ctx, extra = {}) {
  const e = { event: name, time: Date.now() / 1000, ...extra };
  const params = ctx?.oidc?.params;
  if (params?.grant_type) e.grant_type = params.grant_type;
  if (params?.prompt) e.prompt = params.prompt;
  if (params?.scope && name.startsWith('authorization')) e.scope = params.scope;
  const account = ctx?.oidc?.entities?.Account?.accountId ?? ctx?.oidc?.session?.accountId;
  if (account) e.account = account;
  events.push(e);
  if (events.length > 10000) events.splice(0, events.length - 10000);
  const text = Object.entries(e).filter(([k]) => k !== 'event' && k !== 'time').map(([k, v]) => `${k}=${v}`);
  if (config.test_admin_port !== undefined) console.error(`EVENT ${name} ${text.join(' ')}`);
}

function watchEvents(p) {
  for (const name of ['authorization.accepted', 'authorization.success', 'grant.success', 'end_session.success']) {
    p.on(name, (ctx) => noteEvent(name, ctx));
  }
  for (const name of ['authorization.error', 'grant.error', 'revocation.error']) {
    p.on(name, (ctx, err) => noteEvent(name, ctx, { error: err?.error, detail: err?.error_detail ?? err?.error_description }));
  }
  p.on('grant.revoked', (ctx, grantId) => noteEvent('grant.revoked', ctx, { grant: grantId }));
  p.on('refresh_token.consumed', (token) => noteEvent('refresh_token.consumed', undefined,
    { account: token?.accountId, rotations: token?.rotations ?? 0 }));
  p.on('refresh_token.saved', (token) => noteEvent('refresh_token.saved', undefined,
    { account: token?.accountId, rotations: token?.rotations ?? 0, expires_in: token?.expiration }));
  p.on('refresh_token.destroyed', (token) => noteEvent('refresh_token.destroyed', undefined,
    { account: token?.accountId }));
}

// ---------------------------------------------------------------- interactions

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (c) => {
      size += c.length;
      if (size > 65536) {
        reject(new Error('request body too large'));
        req.destroy();
        return;
      }
      chunks.push(c);
    });
    req.on('end', () => resolve(new URLSearchParams(Buffer.concat(chunks).toString('utf8'))));
    req.on('error', reject);
  });
}

function sendHtml(res, status, html) {
  res.statusCode = status;
  res.setHeader('Content-Type', 'text/html; charset=utf-8');
  res.setHeader('Cache-Control', 'no-store');
  res.end(html);
}

// Create (or extend) the grant for everything the client asked for: this is a
// first-party test OP, consent is always given.
async function grantEverything(provider, details, accountId) {
  const { params, grantId } = details;
  let grant = grantId ? await provider.Grant.find(grantId) : undefined;
  if (!grant) grant = new provider.Grant({ accountId, clientId: params.client_id });
  grant.addOIDCScope(String(params.scope ?? 'openid'));
  const consentDetails = details.prompt?.details ?? {};
  if (consentDetails.missingOIDCScope) grant.addOIDCScope(consentDetails.missingOIDCScope.join(' '));
  if (consentDetails.missingOIDCClaims) grant.addOIDCClaims(consentDetails.missingOIDCClaims);
  for (const [indicator, scopes] of Object.entries(consentDetails.missingResourceScopes ?? {})) {
    grant.addResourceScope(indicator, scopes.join(' '));
  }
  if (params.claims) {
    try {
      const requested = JSON.parse(params.claims);
      const names = new Set([
        ...Object.keys(requested.id_token ?? {}),
        ...Object.keys(requested.userinfo ?? {}),
      ]);
      if (names.size) grant.addOIDCClaims([...names]);
    } catch {
      // the provider itself rejects malformed claims parameters
    }
  }
  return grant.save();
}

async function handleInteraction(provider, req, res, url) {
  const m = url.pathname.match(/^\/interaction\/([^/]+)(\/login|\/confirm)?$/);
  if (!m) {
    sendHtml(res, 404, page('Not found', '<h1>Not found</h1>'));
    return;
  }
  const details = await provider.interactionDetails(req, res);
  const clientId = details.params.client_id;

  if (req.method === 'GET' && !m[2]) {
    if (details.prompt.name === 'login') {
      sendHtml(res, 200, loginPage(details.uid, clientId));
      return;
    }
    if (consentRequested(details)) {
      sendHtml(res, 200, consentPage(details.uid, clientId, details.params.scope));
      return;
    }
    // Any other prompt (consent): grant it without asking.
    const grantId = await grantEverything(provider, details, details.session?.accountId);
    await provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
    return;
  }

  if (req.method === 'POST' && m[2] === '/confirm') {
    const form = await readBody(req);
    if (details.prompt.name !== 'consent' || form.get('consent') !== 'yes') {
      sendHtml(res, 400, page('Error – Test OpenID Provider', '<h1>Error</h1><p>No consent to confirm.</p>'));
      return;
    }
    const grantId = await grantEverything(provider, details, details.session?.accountId);
    await provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
    return;
  }

  if (req.method === 'POST' && m[2]) {
    const form = await readBody(req);
    const login = (form.get('login') ?? '').trim();
    const password = form.get('password') ?? '';
    const user = users[login];
    const ok = user !== undefined
      && typeof user.password === 'string'
      && user.password.length === password.length
      && crypto.timingSafeEqual(Buffer.from(user.password), Buffer.from(password));
    if (!ok) {
      sendHtml(res, 200, loginPage(details.uid, clientId, { login, error: 'Invalid username or password.' }));
      return;
    }
    if (consentRequested(details)) {
      // The client asked for consent: the provider sends the browser to the consent page next.
      await provider.interactionFinished(req, res, { login: { accountId: login } }, { mergeWithLastSubmission: false });
      return;
    }
    // Finish the login and the consent in one go, so the browser goes straight
    // back to the client's redirect_uri.
    const grantId = await grantEverything(provider, details, login);
    await provider.interactionFinished(
      req,
      res,
      { login: { accountId: login }, consent: { grantId } },
      { mergeWithLastSubmission: false },
    );
    return;
  }

  res.statusCode = 405;
  res.setHeader('Allow', m[2] ? 'POST' : 'GET');
  res.end();
}

// ---------------------------------------------------------------- test admin (loopback only)

function sendJson(res, status, value) {
  res.statusCode = status;
  res.setHeader('Content-Type', 'application/json');
  res.end(JSON.stringify(value));
}

async function handleAdmin(req, res) {
  const url = new URL(req.url, 'http://127.0.0.1');
  if (req.method === 'GET' && url.pathname === '/events') {
    sendJson(res, 200, events);
    return;
  }
  const m = url.pathname.match(/^\/users\/([^/]+)\/claims$/);
  if (req.method === 'POST' && m) {
    const user = users[decodeURIComponent(m[1])];
    if (!user) {
      sendJson(res, 404, { error: 'no such user' });
      return;
    }
    const chunks = [];
    for await (const c of req) chunks.push(c);
    user.claims = { ...(user.claims ?? {}), ...JSON.parse(Buffer.concat(chunks).toString('utf8')) };
    console.error(`ADMIN claims of ${m[1]} now ${JSON.stringify(user.claims)}`);
    sendJson(res, 200, user.claims);
    return;
  }
  sendJson(res, 404, { error: 'not found' });
}

function startAdmin() {
  return new Promise((resolve, reject) => {
    if (config.test_admin_port === undefined) {
      resolve();
      return;
    }
    const admin = http.createServer((req, res) => {
      handleAdmin(req, res).catch((err) => sendJson(res, 400, { error: String(err?.message ?? err) }));
    });
    admin.on('error', reject);
    admin.listen(config.test_admin_port, '127.0.0.1', () => {
      process.stdout.write(`ADMIN ${admin.address().port}\n`);
      admin.unref();
      resolve();
    });
  });
}

// ---------------------------------------------------------------- server

let provider;
let providerCallback;

const server = https.createServer(
  { cert: fs.readFileSync(config.cert), key: fs.readFileSync(config.key) },
  (req, res) => {
    const url = new URL(req.url, 'https://op.invalid');
    if (url.pathname.startsWith('/interaction/')) {
      handleInteraction(provider, req, res, url).catch((err) => {
        console.error(`interaction error: ${err?.stack ?? err}`);
        if (!res.headersSent) {
          sendHtml(res, 400, page('Error – Test OpenID Provider',
            `<h1>Error</h1><p><code>${esc(err?.message ?? err)}</code></p>`));
        } else {
          res.end();
        }
      });
      return;
    }
    providerCallback(req, res);
  },
);

server.on('tlsClientError', () => {});

server.listen(config.port ?? 0, host, () => {
  const { port } = server.address();
  const hostPart = host.includes(':') ? `[${host}]` : host;
  const issuer = config.issuer ?? `https://${hostPart}:${port}`;
  provider = new Provider(issuer, providerConfiguration());
  watchEvents(provider);
  provider.on('server_error', (_ctx, err) => console.error(`server_error: ${err?.stack ?? err}`));
  provider.on('backchannel.error', (_ctx, err, client) => console.error(`backchannel.error: ${client?.clientId}: ${err?.stack ?? err} (cause: ${err?.cause?.stack ?? err?.cause})`));
  providerCallback = provider.callback();
  // oidc-provider validates static clients lazily (at the first request); do it
  // now so a bad client (e.g. a non-ASCII client_secret) fails the start.
  Promise.all(clients.map(async (c) => {
    try {
      if (!(await provider.Client.find(c.client_id))) throw new Error('not found');
    } catch (err) {
      const why = err?.error_description ?? err?.message ?? String(err);
      throw new Error(`client ${JSON.stringify(c.client_id)}: ${why}`);
    }
  })).then(startAdmin).then(
    () => process.stdout.write(`READY ${issuer}\n`),
    (err) => {
      console.error(`invalid configuration: ${err.message}`);
      process.exit(1);
    },
  );
});

server.on('error', (err) => {
  console.error(`listen error: ${err?.message ?? err}`);
  process.exit(1);
});

function shutdown() {
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);

// With "exit_on_stdin_close", the parent keeps our stdin open: when it dies
// (even by SIGKILL) the pipe closes and we go too, so no OP is left behind.
if (config.exit_on_stdin_close) {
  process.stdin.on('end', shutdown);
  process.stdin.on('error', shutdown);
  process.stdin.resume();
}
