// Omni-Attribute frontend extension: shows what the Save node wrote and what the Encode node will do.
import { app } from "../../../scripts/app.js"; // served at /extensions/<plugin>/js/

const SUMMARY = "omni_attribute_summary";
const SUGGEST = "suggest attribute";
const SUGGEST_PROMPT = "+ add a common attribute…";
// Attribute texts in the paper's style (a subject and what of it): picked from the list, appended as a new line.
export const COMMON_ATTRIBUTES = [
  "person identity", "person hairstyle", "facial expression", "makeup", "clothing", "pose",
  "image lighting", "object material", "surface texture", "artistic style", "background", "camera angle",
  "object color", "object shape", "animal species", "image composition",
];

function readOnlyText(node, name) {
  let widget = node.widgets?.find((w) => w.name === name);
  if (!widget) {
    widget = node.addWidget("text", name, "", () => {}, { multiline: true });
    widget.serialize = false; // display only: never part of the saved workflow
  }
  return widget;
}

// The same rule the Python side applies (omni_attribute/prompt.py): one line = one embedding,
// commas or semicolons combine attributes in one instruction.
export function attributePlan(text) {
  return String(text ?? "")
    .split(/\r?\n/)
    .map((line) => line.split(/[,;]/).map((a) => a.trim().replace(/^(and|&)\s+/i, "")).filter(Boolean))
    .filter((names) => names.length > 0);
}

// Appends `attribute` as a new line of the text (one line = one embedding), unless it is already a line.
export function withAttribute(text, attribute) {
  const current = String(text ?? "");
  const lines = current.split(/\r?\n/).map((l) => l.trim());
  if (lines.includes(attribute)) return current;
  return current.trim() ? `${current.replace(/\s+$/, "")}\n${attribute}` : attribute;
}

function addSuggestions(node, textWidget, onChange) {
  if (node.widgets?.some((w) => w.name === SUGGEST)) return;
  const suggest = node.addWidget("combo", SUGGEST, SUGGEST_PROMPT, (value) => {
    if (value && value !== SUGGEST_PROMPT) {
      textWidget.value = withAttribute(textWidget.value, value);
      onChange();
    }
    suggest.value = SUGGEST_PROMPT;
  }, { values: [SUGGEST_PROMPT, ...COMMON_ATTRIBUTES] });
  suggest.serialize = false; // a helper for typing, never part of the saved workflow
}

app.registerExtension({
  name: "OmniAttribute.Frontend",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === "OmniAttributeSaveEmbeds") {
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        onExecuted?.apply(this, arguments);
        const text = (message?.text ?? []).join("\n");
        readOnlyText(this, SUMMARY).value = text;
        this.setDirtyCanvas?.(true, true);
      };
    }
    if (nodeData.name === "OmniAttributeEncode") {
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        onNodeCreated?.apply(this, arguments);
        const attributes = this.widgets?.find((w) => w.name === "attributes");
        if (!attributes) return;
        const update = () => {
          const plan = attributePlan(attributes.value);
          this.title = plan.length
            ? `Omni-Attribute Encode (${plan.length} embedding${plan.length > 1 ? "s" : ""} per image)`
            : "Omni-Attribute Encode (no attribute yet)";
          this.setDirtyCanvas?.(true, true);
        };
        const callback = attributes.callback;
        attributes.callback = function () {
          const result = callback?.apply(this, arguments);
          update();
          return result;
        };
        addSuggestions(this, attributes, () => attributes.callback(attributes.value));
        update();
      };
    }
  },
});
