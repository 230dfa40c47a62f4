// Screenshots UI workflows as the live ComfyUI frontend draws them, in Debian's Chromium (Playwright,
// executablePath). Run by devtools/workflow_thumbnails.py, which starts the server and converts the PNGs:
// usage: NODE_MODULES=... node workflow_thumbnails.mjs SERVER_URL OUT_DIR WORKFLOW.json... → one JSON line.
// playwright-core is installed by scripts/setup.sh into the cache (NODE_MODULES points at it).
import { readFileSync } from "node:fs";
import { basename, join } from "node:path";
import { createRequire } from "node:module";

const require = createRequire(`${process.env.NODE_MODULES}/`);
const { chromium } = require("playwright-core");

const [url, outDir, ...workflows] = process.argv.slice(2);
const [width, height] = [1600, 1200]; // the canvas area shot; 4:3, like the thumbnails
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
const result = { shots: [], consoleErrors: [] };
try {
  const page = await browser.newPage({ viewport: { width, height } });
  page.on("console", (m) => { if (m.type() === "error") result.consoleErrors.push(m.text()); });
  await page.goto(url, { waitUntil: "domcontentloaded", timeout: 60000 });
  await page.waitForFunction(() => window.app?.graph && window.LiteGraph, null, { timeout: 90000 });
  await page.evaluate(async () => {
    // no minimap, no first-run templates dialog, no missing-model dialog (the model files are the user's)
    for (const [key, value] of [["Comfy.Minimap.Visible", false], ["Comfy.TutorialCompleted", true],
                                ["Comfy.Workflow.ShowMissingModelsWarning", false], ["Comfy.Graph.CanvasInfo", false],
                                ["Comfy.NodeBadge.NodeSourceBadgeMode", "None"],
                                ["LiteGraph.Canvas.MinFontSizeForLOD", 1]]) {
      await window.app.extensionManager.setting.set(key, value).catch(() => {});
    }
  });
  await page.keyboard.press("Escape");
  // everything drawn over the canvas (menus, side bars, canvas buttons) is hidden: the shot is the graph
  await page.addStyleTag({ content: "body * { visibility: hidden !important; } " +
    "#graph-canvas, .dom-widget, .dom-widget * { visibility: visible !important; }" });
  for (const file of workflows) {
    const name = basename(file, ".json");
    const graph = JSON.parse(readFileSync(file, "utf8"));
    await page.evaluate(({ graph, name }) => window.app.loadGraphData(graph, true, true, name), { graph, name });
    await page.waitForTimeout(500); // the frontend fits a loaded graph to the window itself; after that, ours:
    const nodes = await page.evaluate(() => {
      const canvas = window.app.canvas;
      const rects = window.app.graph.nodes.map((n) => n.boundingRect);
      const x0 = Math.min(...rects.map((r) => r[0])), y0 = Math.min(...rects.map((r) => r[1]));
      const x1 = Math.max(...rects.map((r) => r[0] + r[2])), y1 = Math.max(...rects.map((r) => r[1] + r[3]));
      canvas.ds.fitToBounds([x0, y0, x1 - x0, y1 - y0], { zoom: 0.96 });
      canvas.setDirty(true, true);
      return rects.length;
    });
    await page.waitForTimeout(300);
    const box = await page.locator("#graph-canvas").boundingBox();
    const path = join(outDir, `${name}.png`);
    await page.screenshot({ path, clip: { x: box.x, y: box.y, width: Math.min(box.width, width),
                                          height: Math.min(box.height, height) } });
    result.shots.push({ workflow: file, png: path, nodes });
  }
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
