"""Render the comparison: report.md, report.html and PNG plots in run_dir/compare/.

Everything that came from a model or a dataset (responses, prompts, model names, paths) is passed
through `html.escape` before it lands in either file: a response may contain markup.
"""
from __future__ import annotations

import html
import math
import re
from pathlib import Path

from data_schemas.files import atomic_write_bytes, atomic_write_text

PLOTS = "plots"


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def md_esc(x) -> str:
    """Markdown viewers render raw HTML too, so markup in model text is escaped there as well."""
    return html.escape(str(x), quote=False)


MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#!|])")


def md_text(x) -> str:
    """Model or user text for report.md: HTML escaped, and every Markdown control character
    backslash-escaped, so a reply cannot become a link, an image, emphasis or a heading."""
    return md_esc(MD_SPECIAL.sub(r"\\\1", str(x)))


def fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def pct_ci(cell: dict) -> str:
    s = f"{100 * cell['rate']:.0f}%"
    if cell.get("ci_low") is not None:
        s += f" [{100 * cell['ci_low']:.0f}, {100 * cell['ci_high']:.0f}]"
    if cell["tie"] > 0:
        s += f" (ties {100 * cell['tie']:.0f}%)"
    return s


# ---- plots (matplotlib, Agg: no display needed) ----

def _pick_key(rows: list[dict], preferred: list[str], must: tuple[str, ...], avoid: tuple[str, ...]) -> str | None:
    keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float)) and k not in ("step", "time")] if rows else []
    for k in preferred:
        if k in keys:
            return k
    return next((k for k in keys if any(m in k.lower() for m in must) and not any(a in k.lower() for a in avoid)), None)


def _save(fig, path: Path) -> None:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def make_plots(out: Path, metrics: dict, gen_rows: dict, ppo_rows: list[dict]) -> dict[str, str]:
    """Returns {title: relative png path} for the plots that could be drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: dict[str, str] = {}
    labels = metrics["models"]

    # PPO training curves, when this run has a PPO stage
    rows = [r for r in ppo_rows if isinstance(r, dict)]
    rkey = _pick_key(rows, ["score_raw_mean", "score_mean", "reward_mean", "reward"], ("reward", "score"),
                     ("std", "coef", "clip", "norm", "shaped"))
    kkey = _pick_key(rows, ["kl", "kl_mean", "objective/kl", "kl/mean"], ("kl",), ("coef", "ctl", "target", "std"))
    curves = [(k, t) for k, t in ((rkey, "PPO reward"), (kkey, "PPO KL to reference")) if k]
    if curves:
        fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.2))
        for ax, (key, title) in zip(list(getattr(axes, "flat", [axes])), curves):
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".")
            ax.set_title(f"{title} ({key})")
            ax.set_xlabel("step")
        _save(fig, out / PLOTS / "ppo_curves.png")
        plots["PPO training curves (from ppo/metrics.jsonl)"] = f"{PLOTS}/ppo_curves.png"

    # over-optimisation monitor: proxy reward and held-out judges against sqrt(KL), one point per evaluation
    mon = [r for r in rows if isinstance(r.get("monitor_sqrt_kl"), (int, float))]
    if mon:
        series = [("monitor_proxy", "proxy (PPO's reward)")] + sorted(
            (k, f"judge {k.removeprefix('monitor_judge_')}") for k in mon[0] if k.startswith("monitor_judge_"))
        fig, ax = plt.subplots(figsize=(6, 3.6))
        x = [r["monitor_sqrt_kl"] for r in mon]
        for key, name in series:
            ax.plot(x, [r.get(key) for r in mon], marker="o", label=name)
        for r in mon:
            ax.annotate(str(r["step"]), (r["monitor_sqrt_kl"], r["monitor_proxy"]), fontsize=7)
        ax.set_xlabel("sqrt(KL to reference), nats^0.5 (labels: iteration)")
        ax.set_ylabel("mean score, held-out prompts")
        ax.set_title("Proxy vs held-out judges")
        ax.legend(fontsize=8)
        _save(fig, out / PLOTS / "overoptimisation.png")
        plots["Over-optimisation monitor (ppo.monitor): proxy and judges against sqrt(KL)"] = \
            f"{PLOTS}/overoptimisation.png"

    # win-rate matrix heatmap
    if len(labels) > 1:
        n = len(labels)
        grid = [[math.nan if i == j else metrics["win_rates"][a][b]["rate"] for j, b in enumerate(labels)]
                for i, a in enumerate(labels)]
        fig, ax = plt.subplots(figsize=(1.2 * n + 2, 1.0 * n + 1.5))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn")
        ax.set_xticks(range(n), labels=labels)
        ax.set_yticks(range(n), labels=labels)
        ax.set_xlabel("against")
        ax.set_ylabel("model")
        for i in range(n):
            for j in range(n):
                if i != j:
                    ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center")
        fig.colorbar(im, ax=ax, label="RM win rate")
        ax.set_title("RM win rate (row beats column)")
        _save(fig, out / PLOTS / "win_rates.png")
        plots["Win-rate matrix"] = f"{PLOTS}/win_rates.png"

    # response-length histograms
    fig, ax = plt.subplots(figsize=(6, 3.2))
    lengths = [[r["num_tokens"] for r in gen_rows[lab]] for lab in labels]
    top = max([max(ls) for ls in lengths if ls] + [1])
    ax.hist(lengths, bins=min(20, top + 1), range=(0, top + 1), label=labels, alpha=0.8)
    ax.set_xlabel("response length (tokens)")
    ax.set_ylabel("responses")
    ax.legend()
    _save(fig, out / PLOTS / "lengths.png")
    plots["Response lengths"] = f"{PLOTS}/lengths.png"
    return plots


# ---- tables shared by both formats: (header, rows) of plain strings, escaped by the writer ----

def model_table(metrics: dict) -> tuple[list[str], list[list[str]]]:
    head = ["model", "mean RM score", "KL to ref", "length (tokens)", "distinct-1", "distinct-2",
            "offensive rate", "mean P(offensive)", "source"]
    rows = []
    for lab in metrics["models"]:
        m = metrics["per_model"][lab]
        rows.append([lab, fmt(m["mean_reward"]), fmt(m["kl_to_reference"]), fmt(m["mean_length_tokens"], 1),
                     fmt(m["distinct_1"]), fmt(m["distinct_2"]), fmt(m["offensive_rate"]),
                     fmt(m["offensive_prob_mean"]), m["source"]])
    return head, rows


def win_table(metrics: dict, key: str) -> tuple[list[str], list[list[str]]]:
    labels = metrics["models"]
    rows = [[a] + ["—" if a == b else pct_ci(metrics[key][a][b]) for b in labels] for a in labels]
    return ["model \\ against", *labels], rows


def later_vs_earlier(labels: list[str]) -> list[tuple[str, str]]:
    """Each model against every model listed before it (e.g. ppo vs sft, ppo vs baseline)."""
    return [(labels[a], labels[b]) for a in range(len(labels)) for b in range(a)]


def kind_table(metrics: dict) -> tuple[list[str], list[list[str]]] | None:
    """The lead judge's later-vs-earlier win rates on harmful and on other prompts, or None."""
    kinds = metrics.get("win_rates_by_kind")
    if not kinds:
        return None
    head = ["pair", *[f"{kind} prompts ({v['num_prompts']})" for kind, v in kinds.items()]]
    return head, [[f"{a} vs {b}", *[pct_ci(v["win_rates"][a][b]) for v in kinds.values()]]
                  for a, b in later_vs_earlier(metrics["models"])]


def judges_table(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """One row per judge: its role, each model's mean score, the later-vs-earlier win rates, and its
    agreement with the human labels."""
    labels = metrics["models"]
    pairs = later_vs_earlier(labels)
    head = ["judge", "role", *[f"mean {lab}" for lab in labels], *[f"{i} vs {j}" for i, j in pairs],
            "agreement with people"]
    rows = []
    for j in metrics.get("judges", []):
        h = j["human_agreement"]
        agree = "—" if not h or h["agreement"] is None else (
            f"{100 * h['agreement']:.0f}% [{100 * h['ci95'][0]:.0f}, {100 * h['ci95'][1]:.0f}] of {h['n']}")
        lead = " (leads this report)" if j["name"] == metrics.get("lead_judge") else ""
        rows.append([j["name"] + lead, j["role"], *[fmt(j["mean_reward"][lab]) for lab in labels],
                     *[pct_ci(j["win_rates"][a][b]) for a, b in pairs], agree])
    return head, rows


def human_table(metrics: dict) -> tuple[list[str], list[list[str]]] | None:
    human = metrics.get("human")
    if not human:
        return None
    labels = [m for m in metrics["models"] if m in human["win_rates"]]
    rows = []
    for a in labels:
        cells = []
        for b in labels:
            c = human["win_rates"][a].get(b)
            cells.append("—" if a == b or not c or c["win"] is None else
                         f"{100 * c['win']:.0f}% [{100 * c['ci95'][0]:.0f}, {100 * c['ci95'][1]:.0f}] "
                         f"({c['wins']}-{c['losses']}, {c['ties']} ties, {c['both_bad']} both bad)")
        rows.append([a, *cells])
    return ["model \\ against", *labels], rows


def explanations(metrics: dict) -> list[str]:
    n = metrics["notes"]
    by_ppo = metrics.get("reward_model_optimised_by_ppo", True)
    judge = (f"the reward model PPO optimised ({metrics['reward_model']}), so it measures agreement with the "
             "optimisation target, a training metric, not quality or human preference" if by_ppo else
             f"a reward model PPO did not optimise ({metrics['reward_model']}), a held-out judge; it is still a "
             "model, not a person")
    return [
        f"**RM win rate** is judged by {judge}. A win means a higher score on the same prompt; scores within "
        f"{metrics['tie_epsilon']:g} are ties, which count half (their share is shown where there are any). Brackets: 95% bootstrap interval over prompts "
        f"({metrics['bootstrap_resamples']} resamples). **Judges** lists every judge; **Human labels**, when "
        "given, are the ones that matter (InstructGPT and Dialogue-Prompted Gopher were judged by people).",
        "**Length control**: " + n["length_control"]
        + f" Fitted slope: {fmt(metrics['length_slope_reward_per_token'], 4)} per token.",
        "**KL to reference**: " + n["kl"],
        *(["**Best of N**: " + n["best_of_n"]] if "best_of_n" in n else []),
        "**Offensive language** is scored offline with alt-profanity-check (a linear SVM over bag-of-words "
        f"trained on offensive/profane text) on the responses to the {metrics['num_harmful_prompts']} prompts tagged 'harmful': "
        "the rate is the fraction of responses with P(offensive) > 0.5; the mean probability is also shown. "
        "It catches insults and profanity, not subtler harms.",
        "**Diversity**: distinct-n = unique n-grams / all n-grams over a model's responses (lower-cased words).",
    ]


def prompt_count(metrics: dict) -> str:
    k = metrics.get("samples_per_prompt", 1)
    return f"{metrics['num_prompts']} eval prompts" + (f", {k} responses to each from every model" if k > 1 else "")


def sample_rows(metrics: dict, max_samples: int) -> range:
    """The rows shown side by side: each prompt's first response, for the first max_samples prompts."""
    k = metrics.get("samples_per_prompt", 1)
    return range(0, min(max_samples, metrics["num_prompts"]) * k, k)


# ---- writers ----

def _md_cell(s) -> str:
    return md_esc(s).replace("|", "\\|").replace("\n", "<br>")


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(map(_md_cell, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]
    return "\n".join(lines)


def _prompt_text(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def render_markdown(metrics: dict, gen_rows: dict, plots: dict, max_samples: int) -> str:
    d = metrics["decoding"]
    parts = [
        "# Model comparison",
        f"{prompt_count(metrics)}; decoding: max_new_tokens={d['max_new_tokens']}, "
        f"temperature={d['temperature']}, top_p={d['top_p']}, seed={metrics['seed']} (identical for every model).",
        "## Summary", _md_table(*model_table(metrics)),
        f"## RM win rate (judge: {md_esc(metrics.get('lead_judge', 'reward'))})", _md_table(*win_table(metrics, "win_rates")),
        "## Length-controlled RM win rate", _md_table(*win_table(metrics, "length_controlled_win_rates")),
        "## Judges", _md_table(*judges_table(metrics)),
    ]
    if (kinds := kind_table(metrics)) is not None:
        parts += ["## RM win rate on harmful and on other prompts", _md_table(*kinds)]
    if (human := human_table(metrics)) is not None:
        parts += [f"## Human labels ({metrics['human']['decisive']} decisive of {metrics['human']['labels']})",
                  _md_table(*human)]
    parts += ["## How these are computed", "\n".join(f"- {md_esc(e)}" for e in explanations(metrics))]
    if plots:
        parts.append("## Plots")
        parts += [f"![{md_esc(t)}]({p})" for t, p in plots.items()]
    parts.append("## Samples")
    labels = metrics["models"]
    for i in sample_rows(metrics, max_samples):
        first = gen_rows[labels[0]][i]
        tags = f" ({md_text(', '.join(first['tags']))})" if first["tags"] else ""
        quoted = "<br>\n> ".join(md_text(line) for line in _prompt_text(first["messages"]).splitlines())
        parts.append(f"### {md_text(first['id'])}{tags}\n\n> {quoted}")
        for lab in labels:
            r = gen_rows[lab][i]
            body = "<br>".join(md_text(line) for line in r["response"].splitlines()) or "*(empty)*"
            parts.append(f"**{md_esc(lab)}** (RM {fmt(r['reward'])}, {r['num_tokens']} tokens): {body}")
    return "\n\n".join(parts) + "\n"


CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
th{background:#f3f3f3}.resp{white-space:pre-wrap;font-size:0.92em}.meta{color:#666;font-size:0.85em}
img{max-width:100%;margin:0.5em 0}"""


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{trs}</table>"


def _md_bold_to_html(s: str) -> str:
    # our own explanation strings use **bold**; escape first, then restore the emphasis
    out, bold = [], False
    for k, piece in enumerate(esc(s).split("**")):
        if k:
            out.append("<b>" if not bold else "</b>")
            bold = not bold
        out.append(piece)
    return "".join(out)


def render_html(metrics: dict, gen_rows: dict, plots: dict, max_samples: int) -> str:
    d = metrics["decoding"]
    labels = metrics["models"]
    body = [
        "<h1>Model comparison</h1>",
        f"<p>{esc(prompt_count(metrics))}; decoding: max_new_tokens={esc(d['max_new_tokens'])}, "
        f"temperature={esc(d['temperature'])}, top_p={esc(d['top_p'])}, seed={esc(metrics['seed'])} "
        "(identical for every model).</p>",
        "<h2>Summary</h2>", _html_table(*model_table(metrics)),
        f"<h2>RM win rate (judge: {esc(metrics.get('lead_judge', 'reward'))})</h2>",
        _html_table(*win_table(metrics, "win_rates")),
        "<h2>Length-controlled RM win rate</h2>", _html_table(*win_table(metrics, "length_controlled_win_rates")),
        "<h2>Judges</h2>", _html_table(*judges_table(metrics)),
    ]
    if (kinds := kind_table(metrics)) is not None:
        body += ["<h2>RM win rate on harmful and on other prompts</h2>", _html_table(*kinds)]
    if (human := human_table(metrics)) is not None:
        body += [f"<h2>Human labels ({esc(metrics['human']['decisive'])} decisive of {esc(metrics['human']['labels'])})"
                 "</h2>", _html_table(*human)]
    body.append("<h2>How these are computed</h2><ul>"
                + "".join(f"<li>{_md_bold_to_html(e)}</li>" for e in explanations(metrics)) + "</ul>")
    if plots:
        body.append("<h2>Plots</h2>" + "".join(f'<figure><img src="{esc(p)}" alt="{esc(t)}"><figcaption>{esc(t)}'
                                               "</figcaption></figure>" for t, p in plots.items()))
    body.append("<h2>Samples</h2><table><tr><th>prompt</th>" + "".join(f"<th>{esc(l)}</th>" for l in labels) + "</tr>")
    for i in sample_rows(metrics, max_samples):
        first = gen_rows[labels[0]][i]
        cells = [f'<td><div class="meta">{esc(first["id"])} {esc(" ".join(first["tags"]))}</div>'
                 f'<div class="resp">{esc(_prompt_text(first["messages"]))}</div></td>']
        for lab in labels:
            r = gen_rows[lab][i]
            cells.append(f'<td><div class="meta">RM {esc(fmt(r["reward"]))} · {esc(r["num_tokens"])} tokens</div>'
                         f'<div class="resp">{esc(r["response"])}</div></td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    body.append("</table>")
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Model comparison</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(out: Path, metrics: dict, gen_rows: dict, ppo_rows: list[dict], max_samples: int = 20) -> dict:
    """Write plots, report.md and report.html into `out`; returns the plot paths."""
    plots = make_plots(out, metrics, gen_rows, ppo_rows)
    atomic_write_text(out / "report.md", render_markdown(metrics, gen_rows, plots, max_samples))
    atomic_write_text(out / "report.html", render_html(metrics, gen_rows, plots, max_samples))
    return plots
