"""bench_inference.py runs end to end and writes its table: both sides made the asked-for tokens (it
asserts that itself) and every row has a speed (the 124M figures in README come from the same code)."""
import subprocess
import sys


def test_bench_inference_writes_table(tmp_path):
    out = tmp_path / 'bench.md'
    cmd = [sys.executable, 'bench_inference.py', '--n-layer', '2', '--n-head', '2', '--n-embd', '64', '--threads', '2',
           '--prompt-lens', '4', '40', '--new-tokens', '5', '--repeats', '1', '--accuracy-prompts', '2', '--out', str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    table = out.read_text()
    rows = [line.split(' | ') for line in table.splitlines() if line.startswith('| transformers') or line.startswith('| inference.py')]
    assert [(r[0], int(r[1])) for r in rows] == [(side, n) for n in (4, 40) for side in (
        '| transformers GPT2LMHeadModel.generate (fp32)', '| inference.py (int8 weights, KV cache)',
        '| inference.py (float32 weights, KV cache)')]
    assert all(float(r[3]) > 0 for r in rows)
    assert 'the same likeliest token' in table and '2 torch threads' in table
