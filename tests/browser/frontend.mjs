// Drives the live ComfyUI frontend in Debian's Chromium (Playwright, executablePath) to check the
// plugin's extension: usage: NODE_MODULES=... node frontend.mjs SERVER_URL SCREENSHOT.png → one JSON line.
// playwright-core is installed by scripts/setup.sh into the cache (NODE_MODULES points at it).
import { createRequire } from "node:module";

const require = createRequire(`${process.env.NODE_MODULES}/`);
const { chromium } = require("playwright-core");

const [url, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
const result = { consoleErrors: [] };
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  page.on("console", (m) => { if (m.type() === "error") result.consoleErrors.push(m.text()); });
  await page.goto(url, { waitUntil: "domcontentloaded", timeout: 60000 });
  await page.waitForFunction(() => window.app?.graph && window.LiteGraph, null, { timeout: 90000 });
  result.extensionLoaded = await page.evaluate(() =>
    window.app.extensions.some((e) => e.name === "OmniAttribute.Frontend"));
  result.titles = await page.evaluate(() => {
    const node = window.LiteGraph.createNode("OmniAttributeEncode");
    window.app.graph.add(node);
    node.pos = [200, 200];
    const widget = node.widgets.find((w) => w.name === "attributes");
    const titles = [node.title];
    widget.value = "object color\nman identity, man hairstyle\n\nimage lighting";
    widget.callback?.(widget.value);
    titles.push(node.title);
    widget.value = "   ";
    widget.callback?.(widget.value);
    titles.push(node.title);
    widget.value = "object color";
    widget.callback?.(widget.value);
    return titles;
  });
  result.suggestions = await page.evaluate(() => {
    const node = window.LiteGraph.createNode("OmniAttributeEncode");
    window.app.graph.add(node);
    const text = node.widgets.find((w) => w.name === "attributes");
    const suggest = node.widgets.find((w) => w.name === "suggest attribute");
    text.value = "object color";
    text.callback?.(text.value);
    suggest.callback("person hairstyle");
    suggest.callback("person hairstyle"); // already a line: not added twice
    const serialized = window.app.graph.serialize().nodes.find((n) => n.id === node.id).widgets_values;
    return { options: suggest.options.values, text: text.value, reset: suggest.value, title: node.title, serialized };
  });
  result.summary = await page.evaluate(() => {
    const node = window.LiteGraph.createNode("OmniAttributeSaveEmbeds");
    window.app.graph.add(node);
    node.onExecuted({ text: ["2 embedding(s): tokens [2, 4, 64]"] });
    const widget = node.widgets.find((w) => w.name === "omni_attribute_summary");
    const serialized = window.app.graph.serialize().nodes.find((n) => n.id === node.id).widgets_values;
    return { value: widget?.value, serialized };
  });
  await page.keyboard.press("Escape"); // the first-run templates dialog
  await page.evaluate(() => window.app.canvas.setDirty(true, true));
  await page.screenshot({ path: screenshot });
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
