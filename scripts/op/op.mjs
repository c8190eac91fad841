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
//     "users": { "alice": { "password": "...", "claims": { "email": "...", "groups": [...] } } }
//   }
//
// Prints exactly one line "READY <issuer>" on stdout once it is listening.
// Exits cleanly on SIGTERM / SIGINT.

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
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
    },
  };
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
  const m = url.pathname.match(/^\/interaction\/([^/]+)(\/login)?$/);
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
    // Any other prompt (consent): grant it without asking.
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
  })).then(
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
