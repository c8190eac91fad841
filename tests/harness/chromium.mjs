// Drive Debian's headless Chromium (/usr/bin/chromium) through an OpenID Connect
// login with playwright-core (installed in scripts/op/node_modules; no browser
// download ever).
//
//   node tests/harness/chromium.mjs '<json>'
//
// JSON input:
//   url            first URL to open (a protected page, or the OP directly)
//   username, password   typed into #login / #password, then #submit is clicked
//   expect_text    optional: wait until the final page's text contains it
//   screenshot     optional: PNG path (full page) taken at the end (also on failure)
//   host_rules     optional: e.g. "MAP app.test 127.0.0.1, MAP op.test 127.0.0.1"
//   spki           optional: list of base64 sha256 SPKI hashes whose certificates
//                  Chromium accepts (--ignore-certificate-errors-spki-list)
//   then           optional: list of URLs to visit after the login (same browser)
//   timeout_ms     optional: per step (default 20000)
//   executable     optional: default /usr/bin/chromium
//
// Prints one JSON line on stdout:
//   {ok, final_url, status, title, body_text, cookies: [names], cookie_details,
//    login_form_seen, consent_given (the OP asked prompt=consent and it was allowed),
//    visited: [...], then: [...], elapsed_ms, error?}
// Exit status 0 when ok, 1 otherwise.

import { createRequire } from 'node:module';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

const require = createRequire(new URL('../../scripts/op/package.json', import.meta.url));
const { chromium } = require('playwright-core');

const input = JSON.parse(process.argv[2] ?? '{}');
const timeout = input.timeout_ms ?? 20000;
const started = Date.now();

const args = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--disable-dev-shm-usage',
  // Never use a proxy from the environment: all test traffic is loopback.
  '--no-proxy-server',
];
if (input.host_rules) args.push(`--host-resolver-rules=${input.host_rules}`);
if (input.spki?.length) args.push(`--ignore-certificate-errors-spki-list=${input.spki.join(',')}`);

const result = {
  ok: false,
  final_url: null,
  status: null,
  title: null,
  body_text: null,
  cookies: [],
  cookie_details: [],
  login_form_seen: false,
  consent_given: false,
  visited: [],
  then: [],
  elapsed_ms: 0,
};

let browser;
let page;
const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'enforcer-chromium-'));
try {
  // A persistent context gives Chromium an explicit --user-data-dir, which it
  // needs before it honours --ignore-certificate-errors-spki-list.
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: input.executable ?? '/usr/bin/chromium',
    headless: true,
    args,
    ignoreHTTPSErrors: false,
    timeout,
    env: { ...process.env, HOME: userDataDir },
  });
  browser = context;
  context.setDefaultTimeout(timeout);
  context.setDefaultNavigationTimeout(timeout);
  page = context.pages()[0] ?? (await context.newPage());

  let lastStatus = null;
  page.on('response', (response) => {
    const request = response.request();
    if (request.isNavigationRequest() && request.frame() === page.mainFrame()) {
      lastStatus = response.status();
      result.visited.push({ url: response.url(), status: response.status() });
    }
  });

  await page.goto(input.url, { waitUntil: 'load' });

  const loginField = page.locator('#login');
  if (input.username !== undefined && (await loginField.count()) > 0) {
    result.login_form_seen = true;
    await loginField.fill(input.username);
    await page.locator('#password').fill(input.password ?? '');
    const loginUrl = page.url();
    await page.locator('#submit').click();
    // Either we leave the OP's interaction pages, or the form comes back with an error, or the
    // OP asks for consent (prompt=consent, sent with offline_access): allow it as a user would.
    const consent = page.locator('input[name="consent"]');
    await Promise.race([
      page.waitForURL((u) => !u.pathname.startsWith('/interaction/'), { waitUntil: 'load' }),
      page.locator('#error').waitFor({ state: 'visible' }),
      consent.waitFor({ state: 'attached' }),
    ]);
    if ((await consent.count()) > 0) {
      result.consent_given = true;
      await page.locator('#submit').click();
      await page.waitForURL((u) => !u.pathname.startsWith('/interaction/'), { waitUntil: 'load' });
    }
    if (page.url() === loginUrl || new URL(page.url()).pathname.startsWith('/interaction/')) {
      const err = await page.locator('#error').textContent().catch(() => null);
      if (err) throw new Error(`login rejected: ${err.trim()}`);
    }
  }

  if (input.expect_text) {
    await page.waitForFunction(
      (text) => document.body && document.body.innerText.includes(text),
      input.expect_text,
    );
  } else {
    await page.waitForLoadState('load');
  }

  for (const url of input.then ?? []) {
    const response = await page.goto(url, { waitUntil: 'load' });
    result.then.push({
      url,
      final_url: page.url(),
      status: response ? response.status() : null,
      body_text: await page.evaluate(() => document.body?.innerText ?? ''),
    });
  }

  result.final_url = page.url();
  result.status = lastStatus;
  result.title = await page.title();
  result.body_text = await page.evaluate(() => document.body?.innerText ?? '');
  const cookies = await context.cookies();
  result.cookies = [...new Set(cookies.map((c) => c.name))].sort();
  result.cookie_details = cookies.map((c) => ({
    name: c.name,
    domain: c.domain,
    path: c.path,
    secure: c.secure,
    httpOnly: c.httpOnly,
    sameSite: c.sameSite,
  }));
  result.ok = true;
} catch (err) {
  result.error = String(err?.message ?? err).split('\n').slice(0, 6).join('\n');
  if (page) {
    result.final_url = page.url();
    result.body_text = await page
      .evaluate(() => document.body?.innerText ?? '')
      .catch(() => null);
  }
} finally {
  if (page && input.screenshot) {
    await page.screenshot({ path: input.screenshot, fullPage: true }).catch(() => {});
  }
  if (browser) await browser.close().catch(() => {});
  fs.rmSync(userDataDir, { recursive: true, force: true });
  result.elapsed_ms = Date.now() - started;
  process.stdout.write(`${JSON.stringify(result)}\n`);
}
process.exit(result.ok ? 0 : 1);
