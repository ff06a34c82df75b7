"""
A run's loss curve as an SVG picture, from its metrics.jsonl: the batch loss of every step and the
whole-text loss where it was measured, on a log scale, with the target. No plotting package: the
picture is a few hundred lines of SVG that GitHub, the Hub and any browser show.

    python plot_loss.py logs/cpu-124m-shakespeare-2     # writes logs/cpu-124m-shakespeare-2/loss.svg
"""
import argparse
import json
import math
import os
import sys

from checkpoint import TARGET_LOSS

W, H, LEFT, RIGHT, TOP, BOTTOM = 720, 360, 60, 20, 30, 40  # the picture and its margins, in pixels


def read_rows(path):
    """The rows of metrics.jsonl that are steps (a line cut by a kill is skipped)."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and 'step' in row and 'loss' in row:
                rows.append(row)
    return rows


def svg(rows, title, target=TARGET_LOSS):
    """The picture's SVG text: log10 loss against step."""
    steps = [r['step'] for r in rows]
    losses = [r['loss'] for r in rows]
    whole = [(r['step'], r['whole_loss']) for r in rows if r.get('whole_loss') is not None]
    last = max(steps[-1], 1)
    low = math.floor(math.log10(min([target, *losses, *(w for _, w in whole)])))
    high = math.ceil(math.log10(max(losses)))

    def x(step):
        return LEFT + (W - LEFT - RIGHT) * step / last

    def y(loss):
        return TOP + (H - TOP - BOTTOM) * (high - math.log10(max(loss, 1e-9))) / (high - low)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
           f'font-size="12"><rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{LEFT}" y="18" font-size="14">{title}</text>']
    for p in range(low, high + 1):  # a grid line and a label at each power of ten
        out.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y(10 ** p):.1f}" y2="{y(10 ** p):.1f}" stroke="#ddd"/>'
                   f'<text x="{LEFT - 6}" y="{y(10 ** p) + 4:.1f}" text-anchor="end">{10 ** p:g}</text>')
    tick = next(t for t in (m * 10 ** e for e in range(9) for m in (1, 2, 5)) if last / t <= 8)
    for s in range(0, last + 1, tick):
        out.append(f'<text x="{x(s):.1f}" y="{H - BOTTOM + 16}" text-anchor="middle">{s}</text>')
    out.append(f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 6}" text-anchor="middle">step</text>')
    points = ' '.join(f'{x(s):.1f},{y(v):.1f}' for s, v in zip(steps, losses))
    out.append(f'<polyline points="{points}" fill="none" stroke="#4c72b0" stroke-width="1"/>')
    out += [f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="3.5" fill="#dd8452"/>' for s, v in whole]
    out.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y(target):.1f}" y2="{y(target):.1f}" stroke="#c44e52" '
               f'stroke-dasharray="5,4"/>')
    legend = [('#4c72b0', 'batch loss'), ('#dd8452', 'whole-text loss'), ('#c44e52', f'target {target}')]
    for i, (color, name) in enumerate(legend):
        out.append(f'<rect x="{W - RIGHT - 150}" y="{TOP + 8 + 18 * i}" width="12" height="12" fill="{color}"/>'
                   f'<text x="{W - RIGHT - 132}" y="{TOP + 18 + 18 * i}">{name}</text>')
    return '\n'.join(out + ['</svg>']) + '\n'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('run', help="a train.py run folder (or its metrics.jsonl)")
    parser.add_argument('--out', help='the SVG file (default: loss.svg in the run folder)')
    parser.add_argument('--title', help='the title (default: the folder and its steps)')
    args = parser.parse_args(argv)
    path = args.run if args.run.endswith('.jsonl') else os.path.join(args.run, 'metrics.jsonl')
    if not os.path.isfile(path):
        sys.exit(f'error: {path}: no such file (train.py writes metrics.jsonl in its --out-dir)')
    rows = read_rows(path)
    if not rows:
        sys.exit(f'error: {path} has no step rows')
    out = args.out or os.path.join(os.path.dirname(path), 'loss.svg')
    title = args.title or f'{os.path.basename(os.path.dirname(os.path.abspath(path)))}: {len(rows)} steps'
    with open(out, 'w') as f:
        f.write(svg(rows, title))
    print(f'wrote {out} ({len(rows)} steps)')


if __name__ == '__main__':
    main()
