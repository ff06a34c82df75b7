"""plot_loss.py: a run's metrics.jsonl as an SVG loss curve, and a clear line for a bad path."""
import json
import re
import subprocess
import sys

from conftest import ROOT


def test_the_picture_has_every_step_the_whole_text_losses_and_the_target(tmp_path):
    rows = [{'step': s, 'loss': 10 * 0.9 ** s} for s in range(30)]
    rows[9]['whole_loss'], rows[29]['whole_loss'] = 3.5, 0.05
    lines = [json.dumps(r) for r in rows] + ['{"step": 30, "lo']  # a line cut by a kill
    (tmp_path / 'metrics.jsonl').write_text('\n'.join(lines))
    r = subprocess.run([sys.executable, 'plot_loss.py', str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == f'wrote {tmp_path / "loss.svg"} (30 steps)\n'
    picture = (tmp_path / 'loss.svg').read_text()
    points = re.search(r'<polyline points="([^"]+)"', picture).group(1).split()
    assert len(points) == 30
    ys = [float(p.split(',')[1]) for p in points]
    assert ys == sorted(ys)  # a falling loss goes down the picture
    assert picture.count('<circle ') == 2 and 'target 0.099999' in picture


def test_a_missing_run_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, 'plot_loss.py', str(tmp_path / 'nothing')], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f'error: {tmp_path / "nothing" / "metrics.jsonl"}: no such file (train.py writes metrics.jsonl in its --out-dir)']
