"""bench.py runs end to end on the CPU and writes its table (the GPU figures come from the same code)."""
import subprocess
import sys


def test_bench_writes_table(tmp_path):
    out = tmp_path / 'bench.md'
    cmd = [sys.executable, 'bench.py', '--device', 'cpu', '--dtype', 'float32', '--n-layer', '1', '--n-head', '2',
           '--n-embd', '32', '--block-size', '32', '--batch-sizes', '1', '2', '--steps', '2', '--warmup', '1',
           '--compile', 'none', '--out', str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [line.split('|') for line in out.read_text().splitlines() if line.startswith('| float32 |')]
    assert [(r[2].strip(), r[3].strip()) for r in rows] == [('none', '1'), ('none', '2')]
    for r in rows:
        assert float(r[5].replace(',', '')) > 0  # tok/s
