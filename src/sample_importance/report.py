"""The study's report: one self-contained HTML page (figures embedded, readable offline)."""
from __future__ import annotations

import base64
import html


def render_report(title: str, claims: list[dict], figures: dict[str, bytes], params: dict,
                  runs: dict[str, str], sections: dict[str, list[str]]) -> str:
    """HTML with the claims table (each claim with its measured figure and verdict), then every figure.

    Args:
        claims: Claim dicts (number, claim, measured, holds, figure, and `run`: the step that measured it).
        figures: "step/figure path" -> PNG bytes.
        params: the study's parameters. runs: step -> run id. sections: step -> its figure keys.
    """
    def img(key: str) -> str:
        data = base64.b64encode(figures[key]).decode()
        return f'<img src="data:image/png;base64,{data}" alt="{html.escape(key)}">'

    rows = []
    for c in sorted(claims, key=lambda c: c["number"]):
        verdict = '<td class="yes">holds</td>' if c["holds"] else '<td class="no">does not hold</td>'
        rows.append(f"<tr><td>{c['number']}</td><td>{html.escape(c['claim'])}</td>"
                    f"<td>{html.escape(c['measured'])}</td>{verdict}</tr>")
    held = sum(bool(c["holds"]) for c in claims)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}"
        ".yes{background:#e3f6e3}.no{background:#fbe3e3}img{max-width:100%;margin:0.5em 0}"
        "code{background:#f4f4f4}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<p>Reproduction of <i>Sample Importance in Training Deep Neural Networks</i> (Gao &amp; Jojic), "
        "sections 3.2&ndash;3.5. Every figure below was computed from the runs listed at the end.</p>",
        f"<h2>The paper's claims, as measured here ({held} of {len(claims)} hold)</h2>",
        "<table><tr><th>#</th><th>claim</th><th>measured</th><th>verdict</th></tr>", *rows, "</table>",
    ]
    for c in sorted(claims, key=lambda c: c["number"]):
        key = f"{c['run']}/{c['figure']}"
        if key in figures:
            parts += [f"<h3>Claim {c['number']}</h3><p>{html.escape(c['claim'])}</p>", img(key)]
    parts.append("<h2>All figures</h2>")
    for step, keys in sections.items():
        parts.append(f"<h3>{html.escape(step)} <small>(run <code>{html.escape(runs[step])}</code>)</small></h3>")
        parts += [img(k) for k in keys if k in figures]
    parts.append("<h2>Parameters</h2><table>")
    parts += [f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in params.items()]
    parts.append("</table><h2>Runs</h2><table>")
    parts += [f"<tr><td>{html.escape(k)}</td><td><code>{html.escape(v)}</code></td></tr>" for k, v in runs.items()]
    parts.append("</table></body></html>")
    return "\n".join(parts)
