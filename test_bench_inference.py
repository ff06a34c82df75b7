"""bench_inference.py runs end to end and writes its tables: every side made the asked-for tokens (it
asserts that itself), every row has a speed and a fraction of the bandwidth bound, the time of a
decode token is split into its parts, and the quality of each precision is judged on a checkpoint
(the 124M figures in README come from the same code)."""
import subprocess
import sys

from conftest import tiny_checkpoint


def table_rows(text, first_cell):
    return [[cell.strip() for cell in line.strip('|').split('|')] for line in text.splitlines()
            if line.startswith(f'| {first_cell}')]


def test_bench_inference_writes_its_tables(tmp_path):
    tiny_checkpoint(tmp_path / 'ckpt.pt')
    out = tmp_path / 'bench.md'
    cmd = [sys.executable, 'bench_inference.py', '--n-layer', '2', '--n-head', '2', '--n-embd', '64', '--threads', '2',
           '--prompt-lens', '4', '40', '--new-tokens', '5', '--repeats', '1', '--quality-checkpoint',
           str(tmp_path / 'ckpt.pt'), '--quality-tokens', '200', '--out', str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert '2 torch threads' in text and 'read bandwidth: **' in text
    speed = table_rows(text, 'transformers') + table_rows(text, 'inference.py')
    assert sorted((row[0], int(row[1])) for row in speed) == sorted(
        (side, n) for n in (4, 40) for side in ('transformers GPT2LMHeadModel.generate (float32)',
                                                'inference.py (int8 weights)', 'inference.py (int4 weights)',
                                                'inference.py (float32 weights)'))
    for name, _, first_ms, rate, mb, bound, of_bound, of_int8 in speed:
        assert float(first_ms) > 0 and float(rate) > 0 and float(bound) > 0 and of_bound.endswith('%')
        assert float(mb) > 0 and of_int8.endswith('%') and ('int8' not in name or of_int8 == of_bound)
    mb = {row[0]: float(row[4]) for row in speed if row[1] == '4'}
    assert mb['inference.py (int4 weights)'] < mb['inference.py (int8 weights)'] < mb['inference.py (float32 weights)']
    parts = [row for p in ('int8', 'int4', 'float32') for row in table_rows(text, p) if len(row) == 9]
    assert [(row[0], int(row[1])) for row in parts] == [(p, n) for p in ('int8', 'int4', 'float32')
                                                                  for n in (4, 40)]
    quality = {row[0]: row for p in ('int8', 'int4', 'float32') for row in table_rows(text, p) if len(row) == 4}
    # and int4 with groups of 64 (128 would not divide this model's 64-wide rows)
    assert set(quality) == {'int8', 'int4', 'float32', 'int4, groups of 64'}
    assert quality['float32'][2] == '100.00%' and float(quality['float32'][3]) == 0
    assert 0 < float(quality['int8'][3]) < float(quality['int4'][3])  # int4 is further from float32
