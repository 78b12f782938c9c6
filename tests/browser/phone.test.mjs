// The web client on a phone-sized screen (390 x 780, the viewport meta tag
// honoured): one pane at a time, a back control, the composer within
// reach, nothing sideways, touch-sized controls, keyboard use. pia is on
// the phone, quinn at a desktop-sized window.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import {
  PHONE, PNG, WAIT_MS, BASE, imageLoaded, launch, layoutProblems, mine, send, shot, signIn, startChat, theirs,
  tick, tickNow, userId, waitUnread,
} from './lib.mjs';

const P = userId('pia');
const Q = userId('quinn');
const MIN_TOUCH = 44;
let browser;

before(async () => {
  browser = await launch();
});

after(async () => {
  await browser?.close();
});

async function assertLayout(page, step) {
  assert.deepEqual(await layoutProblems(page, MIN_TOUCH), [], `layout at "${step}"`);
}

// Which pane shows: the list, the chat, or both (a desktop window).
async function panes(page) {
  const list = await page.locator('.side').isVisible();
  const chat = await page.locator('#chat').isVisible();
  return list && chat ? 'both' : list ? 'list' : 'chat';
}

test('on a phone: list, chat with back, unread badge, media preview, all within the screen', async () => {
  const pia = await signIn(browser, P, BASE, PHONE);
  const quinn = await signIn(browser, Q);
  const { page } = pia;
  assert.equal(await panes(page), 'list');
  await assertLayout(page, 'signed in');
  await shot(page, 'phone-list-empty');

  await startChat(page, Q);
  assert.equal(await panes(page), 'chat');
  assert.equal(await page.evaluate(() => document.activeElement.id), 'chat-title', 'focus follows into the chat');
  // A long unbroken word wraps inside its bubble instead of widening the page.
  const long = `a-long-word-${'x'.repeat(120)}`;
  await send(page, 'hello from a phone');
  await send(page, long);
  await tick(page, 'hello from a phone', 'delivered');
  await tick(page, long, 'delivered');
  assert.equal(await mine(page, 'hello from a phone').locator('.ticks').textContent(), '✓✓Delivered',
    'the tick is announced as text');
  await assertLayout(page, 'chat open');
  const box = await page.locator('#send').boundingBox();
  const { width, height } = PHONE.viewport;
  assert.ok(box.x >= 0 && box.x + box.width <= width && box.y + box.height <= height, `send at ${JSON.stringify(box)}`);
  await shot(page, 'phone-chat');

  // quinn, at a desktop window, sees both panes and no back control.
  assert.equal(await panes(quinn.page), 'both');
  assert.equal(await quinn.page.locator('#back').isVisible(), false);
  assert.deepEqual(await layoutProblems(quinn.page), [], 'layout of the desktop window');

  // Back to the list; with no chat open, quinn's reply stays unread.
  await page.tap('#back');
  assert.equal(await panes(page), 'list');
  const focused = await page.evaluate(() => document.activeElement.closest('.conv')?.dataset.key);
  assert.equal(focused, `u:${Q}`, 'focus returns to the conversation left');
  await quinn.page.locator(`.conv[data-key="u:${P}"]`).click();
  await send(quinn.page, 'a reply to the phone');
  await waitUnread(page, `u:${Q}`, 1);
  assert.match(await page.locator(`.conv[data-key="u:${Q}"] .conv-open`).textContent(), /1 unread/);
  await tick(quinn.page, 'a reply to the phone', 'delivered');
  assert.equal(await tickNow(quinn.page, 'a reply to the phone'), 'delivered');
  await assertLayout(page, 'list with an unread badge');
  await shot(page, 'phone-unread');

  // Opened from the keyboard: the conversation still has focus.
  await page.keyboard.press('Enter');
  await page.locator('#chat-open').waitFor({ timeout: WAIT_MS });
  assert.equal(await panes(page), 'chat');
  await theirs(page, 'a reply to the phone').waitFor({ timeout: WAIT_MS });
  await tick(quinn.page, 'a reply to the phone', 'read');

  await page.setInputFiles('#file', { name: 'checks.png', mimeType: 'image/png', buffer: PNG });
  await page.locator('#preview img').waitFor({ timeout: WAIT_MS });
  await page.fill('#preview-caption', 'a picture from a phone');
  await assertLayout(page, 'media preview');
  await shot(page, 'phone-preview');
  await page.tap('#preview-send');
  await tick(page, 'a picture from a phone', 'read'); // quinn has the chat open
  assert.equal(await imageLoaded(mine(page, 'a picture from a phone')), true);
  await assertLayout(page, 'image sent');
  await shot(page, 'phone-image');

  // A message arriving redraws the chat; keyboard focus stays where it was.
  await mine(page, 'hello from a phone').locator('.fwd').focus();
  await send(quinn.page, 'one more');
  await theirs(page, 'one more').waitFor({ timeout: WAIT_MS });
  assert.equal(await page.evaluate(() => document.activeElement.closest('.msg')?.textContent ?? null)
    .then((t) => t?.startsWith('hello from a phone')), true, 'focus kept on the Forward button');

  // Escape, as well as the back button, returns to the list.
  await page.focus('#text');
  await page.keyboard.press('Escape');
  assert.equal(await panes(page), 'list');

  // The new-group dialog fits the screen too.
  await page.tap('#new-group');
  await page.locator('#group-dlg').waitFor({ timeout: WAIT_MS });
  await assertLayout(page, 'new-group dialog');
  await shot(page, 'phone-new-group');
  await page.tap('#group-dlg button[value=cancel]');
  await page.locator('#group-dlg').waitFor({ state: 'hidden', timeout: WAIT_MS });

  await pia.context.close();
  await quinn.context.close();
});
