// Helpers of the browser tests: headless Chromium through playwright-core,
// one browser context per user (its own localStorage, like its own
// device), and small steps on the client's page. Every wait is bounded.
import { mkdirSync } from 'node:fs';
import { createConnection, createServer } from 'node:net';
import { chromium } from 'playwright-core';

export const BASE = process.env.PARLEY_WEB_URL || 'http://127.0.0.1:18100';
export const WAIT_MS = 30000; // Kafka + FerretDB on a shared 2-core box can be slow
const SHOTS = process.env.PARLEY_BROWSER_SHOTS || 'build/browser-shots';
const RUN = Date.now().toString(36);
let shotNo = 0;

mkdirSync(SHOTS, { recursive: true });

export function launch() {
  return chromium.launch({
    executablePath: process.env.PARLEY_CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox'],
  });
}

// A user id unique to this run.
export function userId(name) {
  return `${name}_${RUN}`;
}

export async function shot(page, name) {
  shotNo += 1;
  await page.screenshot({ path: `${SHOTS}/${String(shotNo).padStart(2, '0')}-${name}.png` });
}

// Opens the client in a page, failing the test on any uncaught page error.
export async function openPage(context, base = BASE) {
  const page = await context.newPage();
  page.on('pageerror', (e) => {
    throw new Error(`page error in ${context.parleyUser}: ${e.message}`);
  });
  await page.goto(base);
  return page;
}

export async function online(page) {
  await page.locator('#conn-state[data-state="online"]').waitFor({ timeout: WAIT_MS });
}

export const DESKTOP = { viewport: { width: 1000, height: 620 } };
// A phone: its viewport, and the viewport meta tag honoured as on a phone.
export const PHONE = { viewport: { width: 390, height: 780 }, isMobile: true, hasTouch: true };

// A fresh "device" for user: new context, sign in with a dev token.
export async function signIn(browser, user, base = BASE, device = DESKTOP) {
  const context = await browser.newContext(device);
  context.parleyUser = user;
  const page = await openPage(context, base);
  await page.fill('#signin-user', user);
  await page.click('#signin-form button[type=submit]');
  await online(page);
  return { user, context, page };
}

export async function startChat(page, user) {
  await page.fill('#new-chat-user', user);
  await page.press('#new-chat-user', 'Enter');
  await page.locator('#chat-title', { hasText: user }).waitFor({ timeout: WAIT_MS });
}

export async function openConv(page, key) {
  const conv = page.locator(`.conv[data-key="${key}"]`);
  await conv.waitFor({ timeout: WAIT_MS });
  await conv.click();
}

export async function send(page, text) {
  await page.fill('#text', text);
  await page.press('#text', 'Enter');
}

export function mine(page, text) {
  return page.locator('.msg.mine', { hasText: text });
}

export function theirs(page, text) {
  return page.locator('.msg.theirs', { hasText: text });
}

// Waits until this user's own message with text shows the given tick.
export async function tick(page, text, status) {
  await mine(page, text).locator(`.ticks[data-status="${status}"]`).waitFor({ timeout: WAIT_MS });
}

export async function tickNow(page, text) {
  return mine(page, text).locator('.ticks').getAttribute('data-status');
}

export async function unreadBadge(page, key) {
  const badge = page.locator(`.conv[data-key="${key}"] .unread`);
  return (await badge.count()) === 0 ? null : badge.textContent();
}

export async function waitUnread(page, key, n) {
  await page.locator(`.conv[data-key="${key}"] .unread`, { hasText: new RegExp(`^${n}$`) })
    .waitFor({ timeout: WAIT_MS });
}

// True once the <img> inside loc has decoded real pixels.
export async function imageLoaded(loc) {
  const img = loc.locator('.media img');
  await img.waitFor({ timeout: WAIT_MS });
  await img.evaluate((el) => (el.complete ? null : new Promise((ok) => { el.onload = ok; el.onerror = ok; })));
  return img.evaluate((el) => el.naturalWidth > 0);
}

export async function devToken(user) {
  const res = await fetch(`${BASE}/v1/dev/token`, { method: 'POST', body: JSON.stringify({ user }) });
  if (!res.ok) throw new Error(`dev token: HTTP ${res.status}`);
  return (await res.json()).token;
}

// A 48x48 checkered PNG.
export const PNG = Buffer.from(
  'iVBORw0KGgoAAAANSUhEUgAAADAAAAAwCAIAAADYYG7QAAAAU0lEQVR42u3WsQ0AIAgEQGZwCqd0AgdzK10AS2PBJZQkXPV87NXTaXOk83o/gICAyoF+' +
  'Hb7tAwEB1QNJaiAgIH3I6wAC0ockNRAQkD7kdQABlQYdyY+yRFDAk/AAAAAASUVORK5CYII=',
  'base64',
);

// A TCP relay in front of the gateway whose network can be cut: cut()
// drops every relayed connection and refuses new ones (counting the
// attempts) until restore(). A real network failure, seen by the browser.
export async function startRelay() {
  const target = new URL(BASE);
  const pairs = new Set();
  let up = true;
  let refused = 0;
  const server = createServer((client) => {
    if (!up) {
      refused += 1;
      client.destroy();
      return;
    }
    const upstream = createConnection(Number(target.port), target.hostname);
    const pair = [client, upstream];
    const drop = () => {
      client.destroy();
      upstream.destroy();
      pairs.delete(pair);
    };
    pairs.add(pair);
    client.pipe(upstream).on('error', drop);
    upstream.pipe(client).on('error', drop);
    client.on('close', drop);
    upstream.on('close', drop);
  });
  await new Promise((ok) => server.listen(0, '127.0.0.1', ok));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    refused: () => refused,
    cut() {
      up = false;
      refused = 0;
      for (const [a, b] of pairs) {
        a.destroy();
        b.destroy();
      }
      pairs.clear();
    },
    restore() {
      up = true;
    },
    close: () => new Promise((ok) => {
      for (const [a, b] of pairs) {
        a.destroy();
        b.destroy();
      }
      server.close(ok);
    }),
  };
}

// What is wrong with the page's layout at its viewport: a page that
// scrolls sideways, and visible controls cut off at the edges or smaller
// than minTouch px (0: not checked). An empty list when all is well.
export function layoutProblems(page, minTouch = 0) {
  return page.evaluate((min) => {
    const out = [];
    const doc = document.documentElement;
    if (doc.scrollWidth > doc.clientWidth) out.push(`the page scrolls sideways: ${doc.scrollWidth} > ${doc.clientWidth} px`);
    const name = (el) => `${el.tagName.toLowerCase()}${el.id ? `#${el.id}` : ''}${el.className && typeof el.className === 'string' ? `.${el.className.split(' ')[0]}` : ''}`;
    for (const el of document.querySelectorAll('button, input:not([type=file]), textarea, .attach, .msg, .time')) {
      const r = el.getBoundingClientRect();
      if (r.width === 0 && r.height === 0) continue; // not shown
      if (r.left < 0 || r.right > doc.clientWidth) out.push(`${name(el)} cut off: ${Math.round(r.left)}..${Math.round(r.right)} px`);
      if (r.bottom > window.innerHeight && !el.closest('.msgs, .convs')) out.push(`${name(el)} below the screen: bottom ${Math.round(r.bottom)} px`);
      const control = el.matches('button, input, textarea, .attach');
      if (min && control && (r.width < min || r.height < min)) out.push(`${name(el)} is ${Math.round(r.width)}x${Math.round(r.height)} px, under ${min}`);
    }
    return out;
  }, minTouch);
}
