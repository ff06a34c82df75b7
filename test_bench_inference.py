"""bench_inference.py runs end to end and writes its tables: every side made the asked-for tokens (it
asserts that itself), every row has a speed and a fraction of the bandwidth bound, the time of a
decode token is split into its parts, llama.cpp runs beside ours, eager and compiled, with the ratios
computed from its rows, and the quality of each precision is judged on a checkpoint (the 124M figures
in README come from the same code)."""
import re
import subprocess
import sys

import pytest

from conftest import tiny_checkpoint

llama_cpp = pytest.importorskip('llama_cpp')  # the peer beside ours (requirements-dev.txt)


def table_rows(text, first_cell):
    return [[cell.strip() for cell in line.strip('|').split('|')] for line in text.splitlines()
            if line.startswith(f'| {first_cell}')]


@pytest.mark.slow  # every side, llama.cpp's included, twice: the slow suite
def test_bench_inference_writes_its_tables(tmp_path):
    tiny_checkpoint(tmp_path / 'ckpt.pt')
    out = tmp_path / 'bench.md'
    cmd = [sys.executable, 'bench_inference.py', '--n-layer', '2', '--n-head', '2', '--n-embd', '64', '--threads', '2',
           '--prompt-lens', '4', '40', '--new-tokens', '5', '--repeats', '1', '--quality-checkpoint',
           str(tmp_path / 'ckpt.pt'), '--quality-tokens', '200', '--out', str(out),
           '--no-llama-cpp-extra-buffers']  # llama.cpp's AMX kernels segfault on a model this narrow (test_gguf.py)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert '2 torch threads' in text and 'read bandwidth: **' in text
    speed = table_rows(text, 'transformers') + table_rows(text, 'inference.py') + table_rows(text, 'llama.cpp')
    llama = [f'llama.cpp {kind} (llama-cpp-python {llama_cpp.__version__})' for kind in ('Q8_0', 'Q4_0')]
    assert sorted((row[0], int(row[1])) for row in speed) == sorted(
        (side, n) for n in (4, 40) for side in ('transformers GPT2LMHeadModel.generate (float32)',
                                                'inference.py (int8 weights)', 'inference.py (int4 weights)',
                                                'inference.py (float32 weights)', 'inference.py (int8 weights, compiled)',
                                                'inference.py (int4 weights, compiled)', *llama))
    # the ratios the README quotes, each our decode speed over llama.cpp's in the same run
    rate = {(row[0], row[1]): float(row[3]) for row in speed}
    for ours, kind in (('int8', 'Q8_0'), ('int4', 'Q4_0'), ('int8, compiled', 'Q8_0'), ('int4, compiled', 'Q4_0')):
        for n in (4, 40):
            ratio = float(re.search(rf'{ours} / {kind} at a {n}-token prompt: \*\*(\S+)\*\*', text).group(1))
            theirs = rate[f'llama.cpp {kind} (llama-cpp-python {llama_cpp.__version__})', str(n)]
            weights, _, compiled = ours.partition(', ')
            side = f'inference.py ({weights} weights{", compiled" if compiled else ""})'
            assert ratio == pytest.approx(rate[side, str(n)] / theirs, abs=0.006)
    # every row's fraction of the eager int8 row's bound: that row's own fraction, and for the compiled
    # int8 row (a float16 cache: fewer bytes, a higher bound of its own) its rate over that same bound
    int8_bound = {row[1]: float(row[5]) for row in speed if row[0] == 'inference.py (int8 weights)'}
    for name, n, first_ms, rate, mb, bound, of_bound, of_int8 in speed:
        assert float(first_ms) > 0 and float(rate) > 0 and float(bound) > 0 and of_bound.endswith('%')
        assert float(mb) > 0 and of_int8.endswith('%')
        assert float(of_int8[:-1]) == pytest.approx(100 * float(rate) / int8_bound[n], abs=0.6)
        if name == 'inference.py (int8 weights)':
            assert of_int8 == of_bound
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
