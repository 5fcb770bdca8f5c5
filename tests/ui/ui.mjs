// Drives hookd's operator web page in a real headless Chromium: log in, see the event, open
// its failed delivery, press Retry, see the new attempt, and save a screenshot.
// Run by tests/e2e/ui.rs with UI_URL, ADMIN_TOKEN, EVENT_ID, DELIVERY_ID and SCREENSHOT set.
import { chromium } from 'playwright-core';

const { UI_URL, ADMIN_TOKEN, EVENT_ID, DELIVERY_ID, SCREENSHOT } = process.env;
const fail = (message) => { console.error(`FAILED: ${message}`); process.exit(1); };

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
try {
  const page = await browser.newPage();
  page.setDefaultTimeout(20000);
  await page.goto(UI_URL);
  // Not logged in: the login form.
  await page.waitForSelector('input[name=token]');
  await page.fill('input[name=token]', 'not the token');
  await page.click('button');
  if (!(await page.content()).includes('not the admin token')) fail('a wrong token was not refused');
  await page.fill('input[name=token]', ADMIN_TOKEN);
  await page.click('button');
  // The events page shows the event.
  await page.waitForSelector(`a[href="/events/${EVENT_ID}"]`);
  await page.click(`a[href="/events/${EVENT_ID}"]`);
  await page.waitForSelector(`a[href="/deliveries/${DELIVERY_ID}"]`);
  if (!(await page.content()).includes('failed')) fail('the failed delivery is not shown as failed');
  await page.click(`a[href="/deliveries/${DELIVERY_ID}"]`);
  await page.waitForSelector('table tr td');
  const rows = async () => (await page.$$('table tr')).length - 1;
  const before = await rows();
  // Press Retry, then look again (a bounded number of times) until the new attempt is there.
  await page.click('text=Retry now');
  let after = before;
  for (let i = 0; i < 100 && after <= before; i++) {
    await page.goto(`${UI_URL}/deliveries/${DELIVERY_ID}`);
    after = await rows();
    if (after <= before) await page.waitForTimeout(100);
  }
  if (after !== before + 1) fail(`expected ${before + 1} attempts after the retry, saw ${after}`);
  if (!(await page.content()).includes('manual')) fail('the new attempt is not shown as manual');
  await page.screenshot({ path: SCREENSHOT, fullPage: true });
  // The listeners page shows its health.
  await page.goto(`${UI_URL}/listeners`);
  await page.waitForSelector('text=Listener');
  console.log(`ok: ${before} attempts, then ${after}; screenshot at ${SCREENSHOT}`);
} finally {
  await browser.close();
}
