/*
 * A small markdown renderer for model output.
 *
 * Model text is untrusted, so it is NEVER parsed as HTML: every piece of it reaches the page
 * through document.createTextNode / textContent, and the only elements that exist are the ones
 * this file creates (p, pre/code, ul/ol/li, table, strong, em, del, code, h3-h6, blockquote, hr,
 * and <a> for http(s) links only). A model writing `<img src=x onerror=...>` therefore shows
 * exactly those characters. Covers fenced code blocks, lists (nested by indentation), tables,
 * headings, block quotes, rules, bold / italic / strike-through and inline code. Unfinished
 * constructs (a code fence still streaming) render sensibly.
 */
(function () {
  "use strict";

  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
  const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
  const QUOTE = /^ {0,3}>\s?(.*)$/;
  const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const TABLE_SEP = /^\s*\|?\s*:?-{1,}:?\s*(\|\s*:?-{1,}:?\s*)*\|?\s*$/;
  const INLINE = new RegExp(
    [
      "(`+)([\\s\\S]*?[^`])\\1(?!`)",          // 1,2 inline code
      "\\*\\*(?=\\S)([\\s\\S]*?\\S)\\*\\*",      // 3 bold
      "__(?=\\S)([\\s\\S]*?\\S)__",             // 4 bold
      "~~(?=\\S)([\\s\\S]*?\\S)~~",             // 5 strike
      "\\*(?=[^\\s*])([\\s\\S]*?[^\\s*])\\*",   // 6 italic
      "(?<![\\w])_(?=\\S)([\\s\\S]*?\\S)_(?![\\w])", // 7 italic
      "\\[([^\\]\\n]+)\\]\\((https?:\\/\\/[^\\s)]+)\\)", // 8,9 link
    ].join("|"),
  );

  function el(tag, className) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    return node;
  }

  /** Inline markup of `text` appended to `parent` (text nodes only for the model's words). */
  function inline(parent, text) {
    let rest = text;
    while (rest.length) {
      const m = INLINE.exec(rest);
      if (!m) {
        parent.appendChild(document.createTextNode(rest));
        return;
      }
      if (m.index > 0) parent.appendChild(document.createTextNode(rest.slice(0, m.index)));
      let node;
      if (m[2] !== undefined) {
        node = el("code");
        node.textContent = m[2].replace(/^ (.*) $/, "$1");
      } else if (m[3] !== undefined || m[4] !== undefined) {
        node = el("strong");
        inline(node, m[3] !== undefined ? m[3] : m[4]);
      } else if (m[5] !== undefined) {
        node = el("del");
        inline(node, m[5]);
      } else if (m[6] !== undefined || m[7] !== undefined) {
        node = el("em");
        inline(node, m[6] !== undefined ? m[6] : m[7]);
      } else {
        node = el("a");
        node.href = m[9]; // only http(s) matches the pattern
        node.target = "_blank";
        node.rel = "noopener noreferrer nofollow";
        inline(node, m[8]);
      }
      parent.appendChild(node);
      rest = rest.slice(m.index + m[0].length);
    }
  }

  /** Lines of a paragraph, joined by <br>. */
  function paragraph(lines) {
    const p = el("p");
    lines.forEach((line, i) => {
      if (i) p.appendChild(el("br"));
      inline(p, line.trim());
    });
    return p;
  }

  function splitRow(line) {
    let s = line.trim();
    if (s.startsWith("|")) s = s.slice(1);
    if (s.endsWith("|") && !s.endsWith("\\|")) s = s.slice(0, -1);
    return s.split(/(?<!\\)\|/).map((c) => c.trim().replace(/\\\|/g, "|"));
  }

  function table(header, aligns, rows) {
    const wrap = el("div", "table-wrap");
    const t = el("table");
    const thead = el("thead");
    const tr = el("tr");
    header.forEach((cell, i) => {
      const th = el("th");
      if (aligns[i]) th.style.textAlign = aligns[i];
      inline(th, cell);
      tr.appendChild(th);
    });
    thead.appendChild(tr);
    t.appendChild(thead);
    const tbody = el("tbody");
    rows.forEach((cells) => {
      const row = el("tr");
      header.forEach((_, i) => {
        const td = el("td");
        if (aligns[i]) td.style.textAlign = aligns[i];
        inline(td, cells[i] || "");
        row.appendChild(td);
      });
      tbody.appendChild(row);
    });
    t.appendChild(tbody);
    wrap.appendChild(t);
    return wrap;
  }

  function startsBlock(line, next) {
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) ||
      ITEM.test(line) || (line.includes("|") && next !== undefined && TABLE_SEP.test(next) &&
        next.includes("-"));
  }

  /** Render `lines` into `parent` as blocks. */
  function blocks(parent, lines) {
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      if (!line.trim()) { i++; continue; }
      let m;
      if ((m = FENCE.exec(line))) {
        const fence = m[1];
        const body = [];
        i++;
        while (i < lines.length && !(lines[i].trim().startsWith(fence[0].repeat(fence.length)) &&
          !lines[i].trim().replace(new RegExp("^\\" + fence[0] + "+"), "").trim())) {
          body.push(lines[i]);
          i++;
        }
        i++; // the closing fence (or past the end while still streaming)
        const pre = el("pre");
        const code = el("code", m[2] ? "lang-" + m[2].replace(/[^\w+#-]/g, "") : "");
        code.textContent = body.join("\n");
        if (m[2]) pre.dataset.lang = m[2];
        pre.appendChild(code);
        parent.appendChild(pre);
        continue;
      }
      if ((m = HEADING.exec(line))) {
        const h = el("h" + Math.min(6, m[1].length + 2));
        inline(h, m[2]);
        parent.appendChild(h);
        i++;
        continue;
      }
      if (RULE.test(line)) { parent.appendChild(el("hr")); i++; continue; }
      if (QUOTE.test(line)) {
        const inner = [];
        while (i < lines.length && (m = QUOTE.exec(lines[i]))) { inner.push(m[1]); i++; }
        const q = el("blockquote");
        blocks(q, inner);
        parent.appendChild(q);
        continue;
      }
      if (line.includes("|") && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1]) &&
        lines[i + 1].includes("-")) {
        const header = splitRow(line);
        const aligns = splitRow(lines[i + 1]).map((c) =>
          c.startsWith(":") && c.endsWith(":") ? "center" : c.endsWith(":") ? "right" :
            c.startsWith(":") ? "left" : "");
        const rows = [];
        i += 2;
        while (i < lines.length && lines[i].includes("|") && lines[i].trim()) {
          rows.push(splitRow(lines[i]));
          i++;
        }
        parent.appendChild(table(header, aligns, rows));
        continue;
      }
      if ((m = ITEM.exec(line))) {
        i = list(parent, lines, i);
        continue;
      }
      const para = [];
      while (i < lines.length && lines[i].trim() &&
        (para.length === 0 || !startsBlock(lines[i], lines[i + 1]))) {
        para.push(lines[i]);
        i++;
      }
      parent.appendChild(paragraph(para));
    }
  }

  /** A list starting at lines[start]; returns the index after it. */
  function list(parent, lines, start) {
    const first = ITEM.exec(lines[start]);
    const indent = first[1].length;
    const ordered = /\d/.test(first[2]);
    const node = el(ordered ? "ol" : "ul");
    if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
    let i = start;
    let item = null;
    while (i < lines.length) {
      const line = lines[i];
      const m = ITEM.exec(line);
      if (m && m[1].length <= indent + 1 && /\d/.test(m[2]) === ordered) {
        item = { lines: [m[3]], pad: m[1].length + m[2].length + 1 };
        node.appendChild(el("li"))._md = item;
        i++;
        continue;
      }
      if (m && m[1].length <= indent + 1) break; // a different kind of list at this level
      if (!line.trim()) {
        const next = lines[i + 1];
        if (next !== undefined && next.trim() &&
          (next.length - next.trimStart().length > indent || ITEM.test(next))) {
          item.lines.push("");
          i++;
          continue;
        }
        break;
      }
      const lead = line.length - line.trimStart().length;
      if (lead > indent) {
        item.lines.push(line.slice(Math.min(lead, item.pad)));
      } else if (!startsBlock(line, lines[i + 1])) {
        item.lines.push(line.trim()); // lazy continuation of the item's paragraph
      } else {
        break;
      }
      i++;
    }
    node.childNodes.forEach((li) => {
      const md = li._md;
      delete li._md;
      const simple = md.lines.length === 1 || !md.lines.slice(1).some((l) => startsBlock(l) || !l.trim());
      if (simple) {
        md.lines.forEach((l, k) => {
          if (k) li.appendChild(el("br"));
          inline(li, l.trim());
        });
      } else {
        blocks(li, md.lines);
        // a tight item's first paragraph reads better without its margins
        if (li.firstChild && li.firstChild.tagName === "P") li.firstChild.className = "tight";
      }
    });
    parent.appendChild(node);
    return i;
  }

  /** Render markdown `text` into a fresh DocumentFragment. */
  function render(text) {
    const frag = document.createDocumentFragment();
    blocks(frag, String(text).replace(/\r\n?/g, "\n").split("\n"));
    return frag;
  }

  window.ParallaxMarkdown = { render };
})();
