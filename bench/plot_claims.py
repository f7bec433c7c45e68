"""
The figures of bench/paper_claims.py, written as hand-made SVG files.

Why SVG by hand: matplotlib is not a dependency of this project, and an SVG is a few kB of text that GitHub
renders inline in a README and that diffs like code. A line chart and a grid of coloured cells are all we need,
which is ~150 lines of string formatting below. (A PNG would need a rasteriser with font rendering; not worth
it.)

    python bench/plot_claims.py out-claims/gpu/results.json    # (re)writes the .svg files next to the JSON

Figures (each skipped when its part is absent from the JSON):
    lm_loss.svg    validation loss vs training tokens, one line per variant
    mqar_acc.svg   MQAR accuracy vs sequence length, one panel per number of key-value pairs
    passkey.svg    passkey found / not found, one panel per variant: rows = needle depth, columns = context length
"""
import json
import math
import os
import sys

COLORS = {"hybrid": "#1f77b4", "softmax": "#d95f02", "lightning": "#1b9e77"}  # colour-blind safe trio
FONT = 'font-family="Helvetica,Arial,sans-serif"'


def _fmt(v):
    """Tick label: short and exact enough ('0.5', '1.2e+06' -> '1.2M', '4096')."""
    if v != 0 and abs(v) >= 1e6:
        return f"{v / 1e6:g}M"
    if v != 0 and abs(v) >= 1e4:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


def _ticks(lo, hi, n=5):
    """About n 'nice' ticks (steps of 1, 2 or 5 times a power of ten) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if step * m >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _text(x, y, s, size=12, anchor="middle", extra=""):
    s = str(s).replace("&", "&amp;").replace("<", "&lt;")
    return f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" {FONT} {extra}>{s}</text>'


def line_panel(x0, y0, w, h, series, title, xlabel, ylabel, logx=False, ylim=None, xticks=None):
    """SVG elements of one line chart in the box (x0, y0, w, h). series: list of (name, xs, ys); None ys are
    gaps. logx puts x on a log2 axis (sequence lengths). Returns a list of SVG element strings."""
    L, R, T, B = 55, 20, 24, 40  # margins for tick labels, title and axis label
    px, py, pw, ph = x0 + L, y0 + T, w - L - R, h - T - B  # the plotting area
    fx = (lambda v: math.log2(v)) if logx else (lambda v: v)
    xs_all = [fx(x) for _, xs, _ in series for x in xs]
    ys_all = [y for _, _, ys in series for y in ys if y is not None]
    xlo, xhi = min(xs_all), max(xs_all)
    if xhi == xlo:
        xlo, xhi = xlo - 1, xhi + 1
    ylo, yhi = ylim if ylim else (min(ys_all), max(ys_all))
    if not ylim:  # pad the data range by 5 % so the lines do not sit on the frame
        pad = 0.05 * (yhi - ylo or 1.0)
        ylo, yhi = ylo - pad, yhi + pad
    sx = lambda v: px + (fx(v) - xlo) / (xhi - xlo) * pw  # noqa: E731  data -> pixel
    sy = lambda v: py + ph - (v - ylo) / (yhi - ylo) * ph  # noqa: E731
    out = [f'<rect x="{px}" y="{py}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>',
           _text(x0 + w / 2, y0 + 15, title, 13, extra='font-weight="bold"'),
           _text(px + pw / 2, y0 + h - 6, xlabel, 11),
           _text(x0 + 13, py + ph / 2, ylabel, 11, extra=f'transform="rotate(-90 {x0 + 13} {py + ph / 2})"')]
    for t in _ticks(ylo, yhi):  # horizontal grid lines with y tick labels
        if ylo <= t <= yhi:
            out.append(f'<line x1="{px}" x2="{px + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#ddd"/>')
            out.append(_text(px - 4, sy(t) + 4, _fmt(t), 10, "end"))
    if xticks is None:
        xticks = sorted(set(x for _, xs, _ in series for x in xs)) if logx else _ticks(xlo, xhi)
    for t in xticks:
        if xlo <= fx(t) <= xhi:
            out.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{py + ph}" y2="{py + ph + 4}" stroke="#444"/>')
            out.append(_text(sx(t), py + ph + 16, _fmt(t), 10))
    for name, xs, ys in series:
        color = COLORS.get(name, "#555")
        pts = [(sx(x), sy(y)) for x, y in zip(xs, ys) if y is not None]
        if len(pts) > 1:
            d = " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)
            out.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="2"/>')
        if len(pts) <= 12:  # few points (accuracy per length): mark each one
            out += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{color}"/>' for a, b in pts]
    return out


def legend(x, y, names):
    """A horizontal legend starting at (x, y)."""
    out = []
    for name in names:
        out.append(f'<line x1="{x}" x2="{x + 20}" y1="{y - 4}" y2="{y - 4}" stroke="{COLORS.get(name, "#555")}" '
                   f'stroke-width="3"/>')
        out.append(_text(x + 25, y, name, 12, "start"))
        x += 40 + 8 * len(name)
    return out


def svg(width, height, body, path):
    with open(path, "w") as f:
        f.write(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
                f'viewBox="0 0 {width} {height}">\n<rect width="100%" height="100%" fill="white"/>\n')
        f.write("\n".join(body) + "\n</svg>\n")
    return path


# -----------------------------------------------------------------------------
# the three figures


def plot_lm(lm, path):
    """Val loss against training tokens (the x axis is the same for all variants: same batch, same steps)."""
    names = list(lm["variants"])
    series = [(n, [c["tokens"] for c in lm["variants"][n]["curve"]], [c["val_loss"] for c in lm["variants"][n]["curve"]])
              for n in names]
    # skip the step-0 point (loss ~ ln V for everyone) so the interesting end of the curves is readable
    series = [(n, xs[1:], ys[1:]) if len(xs) > 2 else (n, xs, ys) for n, xs, ys in series]
    body = line_panel(0, 0, 560, 330, series, "Language modelling: validation loss", "training tokens",
                      "val loss (nats/token)")
    return svg(560, 360, body + legend(70, 352, names), path)


def plot_mqar(mqar, path):
    """Accuracy against sequence length, one panel per number of pairs."""
    names = list(mqar["variants"])
    pairs = sorted({r["num_pairs"] for n in names for r in mqar["variants"][n]["eval"]})
    lengths = sorted({r["seq_len"] for n in names for r in mqar["variants"][n]["eval"]})
    pw, ph = 300, 260
    body = []
    for i, p in enumerate(pairs):
        series = []
        for n in names:
            acc = {r["seq_len"]: r["acc"] for r in mqar["variants"][n]["eval"] if r["num_pairs"] == p}
            series.append((n, lengths, [acc.get(t) for t in lengths]))  # None: length too short for p pairs
        body += line_panel(i * pw, 0, pw, ph, series, f"MQAR, {p} key-value pairs", "sequence length",
                           "accuracy", logx=True, ylim=(0.0, 1.0))
    return svg(pw * len(pairs), ph + 30, body + legend(60, ph + 22, names), path)


def plot_passkey(pk, path):
    """One grid per variant: a cell per (depth, length), green when every trial found the passkey, red when none
    did, amber in between, with the fraction found written in the cell."""
    names = list(pk["variants"])
    lengths, depths = pk["lengths"], pk["depths"]
    cw, ch, left, top = 46, 24, 48, 40
    gw = left + cw * len(lengths) + 20
    body = []
    for i, n in enumerate(names):
        x0 = i * gw
        body.append(_text(x0 + left + cw * len(lengths) / 2, 16, f"passkey: {n}", 13, extra='font-weight="bold"'))
        for j, t in enumerate(lengths):
            body.append(_text(x0 + left + cw * j + cw / 2, top - 6, _fmt(t), 10))
        for k, d in enumerate(depths):
            body.append(_text(x0 + left - 4, top + ch * k + ch / 2 + 4, f"{d:.0%}", 10, "end"))
            for j in range(len(lengths)):
                f = pk["variants"][n]["found"][j][k]  # fraction of trials found at (length j, depth k)
                color = "#4daf4a" if f == 1 else "#e41a1c" if f == 0 else "#ffb000"
                body.append(f'<rect x="{x0 + left + cw * j}" y="{top + ch * k}" width="{cw - 2}" height="{ch - 2}" '
                            f'fill="{color}"/>')
                body.append(_text(x0 + left + cw * j + cw / 2 - 1, top + ch * k + ch / 2 + 3, f"{f:.0%}", 9))
    h = top + ch * len(depths)
    body.append(_text(gw * len(names) / 2, h + 18, "columns: context length (tokens); rows: needle depth; "
                      "cell: fraction of trials where greedy decoding gives the passkey", 11))
    return svg(gw * len(names), h + 28, body, path)


def plot_all(results, out_dir):
    """Write every figure whose part is in `results`; returns the paths written."""
    paths = []
    if results.get("lm"):
        paths.append(plot_lm(results["lm"], os.path.join(out_dir, "lm_loss.svg")))
    if results.get("mqar"):
        paths.append(plot_mqar(results["mqar"], os.path.join(out_dir, "mqar_acc.svg")))
    if results.get("passkey"):
        paths.append(plot_passkey(results["passkey"], os.path.join(out_dir, "passkey.svg")))
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/plot_claims.py out-claims/<budget>/results.json")
    with open(sys.argv[1]) as f:
        res = json.load(f)
    for p in plot_all(res, os.path.dirname(os.path.abspath(sys.argv[1]))):
        print("wrote", p)
