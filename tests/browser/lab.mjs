// Drive JupyterLab in headless Chromium (Debian's) with playwright-core: open a notebook
// on the sm kernel, run its one cell, check what it shows, take a screenshot.
//
//   node tests/browser/lab.mjs SCENARIO BASE_URL TOKEN SCREENSHOT
//
// SCENARIO is "arithmetic" (print(6*7) prints 42) or "balloon" (%sm balloon shows the
// panel; moving its slider changes the balloon's figure). Exits 0 when the page showed
// what it should, 1 with one "lab.mjs: ..." line otherwise (and a screenshot either way).
import { chromium } from 'playwright-core';

const KERNEL_DISPLAY_NAME = 'Python (sm microVM)';
// Starting the kernel boots a microVM; in the emulated test bed that takes minutes.
const KERNEL_TIMEOUT = 600_000;
const OUTPUT_TIMEOUT = 300_000;

const [scenario, baseUrl, token, screenshot] = process.argv.slice(2);
const scenarios = { arithmetic, balloon };
if (!scenarios[scenario] || !screenshot) {
  console.error('usage: node lab.mjs arithmetic|balloon BASE_URL TOKEN SCREENSHOT');
  process.exit(2);
}

function say(message) {
  console.log(`lab.mjs: ${message}`);
}

// Open the notebook and wait until its sm kernel is idle.
async function openNotebook(page, name) {
  // A workspace of its own (reset): no notebook left open by another scenario.
  await page.goto(`${baseUrl}/lab/workspaces/${scenario}/tree/${name}?reset&token=${token}`);
  const panel = page.locator('.jp-NotebookPanel');
  await panel.waitFor();
  await page.getByRole('button', { name: KERNEL_DISPLAY_NAME }).first().waitFor();
  // The status bar says Idle only once the kernel answered (the toolbar's indicator starts
  // out idle before there is a kernel at all).
  await page.locator('.jp-StatusBar-TextItem', { hasText: `${KERNEL_DISPLAY_NAME} | Idle` })
    .waitFor({ timeout: KERNEL_TIMEOUT });
  say(`${name} open, kernel "${KERNEL_DISPLAY_NAME}" idle`);
  return panel;
}

// Run the first cell as a user does: click into it, Shift+Enter. Returns its output area.
async function runFirstCell(panel) {
  const cell = panel.locator('.jp-Cell').first();
  await cell.locator('.jp-InputArea-editor').click();
  await cell.page().keyboard.press('Shift+Enter');
  return cell.locator('.jp-OutputArea');
}

// Wait for `wanted` inside the output area; an error shown there instead ends the wait.
async function waitForOutput(output, wanted) {
  const error = output.locator('[data-mime-type="application/vnd.jupyter.error"]');
  await wanted.or(error).first().waitFor({ timeout: OUTPUT_TIMEOUT });
  if (await error.count()) {
    throw new Error(`the cell failed: ${(await error.first().innerText()).trim()}`);
  }
}

async function arithmetic(page) {
  const panel = await openNotebook(page, 'arithmetic.ipynb');
  const output = await runFirstCell(panel);
  await waitForOutput(output, output.locator('.jp-OutputArea-output', { hasText: /^\s*42\s*$/ }));
  say(`print(6*7) printed ${(await output.innerText()).trim()}`);
}

// The balloon's figure on the panel: "N MiB (target T MiB)" (ipywidgets 8 does not show
// a Label's description, so the figure is found by its form).
async function balloonFigure(output) {
  const match = /([\d,]+) MiB \(target ([\d,]+) MiB\)/.exec(await output.innerText());
  const mib = (text) => Number(text.replace(/,/g, ''));
  return match && { actual: mib(match[1]), target: mib(match[2]) };
}

async function balloon(page) {
  const panel = await openNotebook(page, 'balloon.ipynb');
  const output = await runFirstCell(panel);
  const slider = output.locator('.jupyter-widgets.widget-slider');
  await waitForOutput(output, slider);
  let before = null;
  await expectWithin(OUTPUT_TIMEOUT, 'the panel shows the balloon figure', async () => {
    before = await balloonFigure(output);
    return before !== null;
  });
  say(`panel open, balloon ${before.actual} MiB (target ${before.target} MiB)`);

  // Drag the handle a quarter of the way along the track: give back a quarter of the RAM.
  const track = await slider.locator('.noUi-target').boundingBox();
  const handle = await slider.locator('.noUi-handle').boundingBox();
  await page.mouse.move(handle.x + handle.width / 2, handle.y + handle.height / 2);
  await page.mouse.down();
  await page.mouse.move(track.x + track.width / 4, handle.y + handle.height / 2, { steps: 10 });
  await page.mouse.up();
  const wanted = Number((await slider.locator('.widget-readout').innerText()).replace(/,/g, ''));
  if (!(wanted > before.target)) throw new Error(`the slider reads ${wanted} after the drag`);
  say(`slider moved to ${wanted} MiB`);

  let after = null;
  await expectWithin(OUTPUT_TIMEOUT, `the balloon grows toward ${wanted} MiB`, async () => {
    after = await balloonFigure(output);
    return after !== null && after.target === wanted && after.actual > before.actual;
  });
  say(`balloon grew to ${after.actual} MiB (target ${after.target} MiB)`);
}

async function expectWithin(timeout, what, check) {
  const deadline = Date.now() + timeout;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`not seen within ${timeout / 1000} s: ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  // Chromium's sandbox refuses to run as root (the CI user); the page is our own server.
  args: process.getuid() === 0 ? ['--no-sandbox'] : [],
});
let status = 0;
const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
// JupyterLab's server runs emulated in the test bed: its pages load slowly.
page.setDefaultTimeout(180_000);
try {
  await scenarios[scenario](page);
} catch (error) {
  say(`${scenario} failed: ${error.message.split('\n')[0]}`);
  status = 1;
} finally {
  await page.screenshot({ path: screenshot });
  say(`screenshot ${screenshot}`);
  await browser.close();
}
process.exit(status);
