"""app.py as a user meets it: `python app.py` on localhost with a tiny random checkpoint, driven by
gradio_client (streaming, bad parameters, an empty prompt) and by a real headless Chromium that types
a prompt, clicks Generate and sees text appear. Set APP_SCREENSHOT=path to keep the browser's picture."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict

import pytest
import torch

from model import GPT, GPTConfig

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def write_run(run_dir, steps=30):
    """A train.py-like run directory: a tiny random ckpt.pt and its metrics.jsonl."""
    os.makedirs(run_dir, exist_ok=True)
    torch.manual_seed(0)
    torch.save({'model_args': asdict(TINY), 'model': GPT(TINY).state_dict(), 'step': steps - 1},
               os.path.join(run_dir, 'ckpt.pt'))
    with open(os.path.join(run_dir, 'metrics.jsonl'), 'w') as f:
        for step in range(steps):
            f.write(json.dumps({'step': step, 'loss': 11.0 - 0.3 * step, 'dt_ms': 50.0, 'tok_per_sec': 5000.0 + step,
                                'norm': 2.0 / (step + 1), 'lr': 6e-4 * min(1, (step + 1) / 10), 'tokens': 512 * step}) + '\n')
        f.write('{"step": 30, "loss"')  # a run killed mid-write: skipped, not a crash
    return os.path.join(run_dir, 'ckpt.pt')


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    """`python app.py` on 127.0.0.1 and a free port, pointed at a tiny checkpoint by the env var."""
    tmp = tmp_path_factory.mktemp('app')
    ckpt = write_run(str(tmp / 'run-test'))
    port = free_port()
    env = {**os.environ, 'GPT2_SHAKESPEARE_MODEL': ckpt, 'GRADIO_SERVER_NAME': '127.0.0.1',
           'GRADIO_SERVER_PORT': str(port), 'GRADIO_ANALYTICS_ENABLED': 'False'}
    log = open(tmp / 'app.log', 'w')
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, 'app.py')], env=env, cwd=tmp,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f'http://127.0.0.1:{port}/'
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f'app.py did not come up: {(tmp / "app.log").read_text()[-2000:]}')
            time.sleep(0.5)
    yield url, ckpt
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def test_streams_text_token_by_token_and_reproducibly(server):
    from gradio_client import Client
    from inference import generate, load_model, prepare_for_generation
    url, ckpt = server
    client = Client(url, verbose=False)
    updates = list(client.submit('ROMEO:', 20, 0.7, 50, 1, api_name='/generate'))
    texts = [text for text, _ in updates]
    assert len(updates) >= 10  # streamed: the page got the text piece by piece, not at the end
    assert all(a != b and b.startswith(a) for a, b in zip(texts, texts[1:-1]))
    assert texts[0].startswith('ROMEO:') and updates[-1][1].startswith('20 tokens in ')
    assert 'seed 1' in updates[-1][1]
    # the app's text is inference.py's text: same checkpoint, int8 weights, seed and settings
    model, _ = load_model(ckpt)
    prepare_for_generation(model, 'int8')
    assert texts[-1] == 'ROMEO:' + ''.join(generate(model, 'ROMEO:', 20, 0.7, 50, seed=1))
    assert client.predict('ROMEO:', 20, 0.7, 50, 1, api_name='/generate')[0] == texts[-1]


def predict(client, *args, timeout=60):
    """client.predict with a time limit: a request that the server's caps fail to bound fails the test in
    seconds instead of generating for ever."""
    return client.submit(*args, api_name='/generate').result(timeout=timeout)


def test_bad_parameters_get_a_clear_message(server):
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    client = Client(server[0], verbose=False)
    with pytest.raises(AppError, match='less than minimum value 1'):
        predict(client, 'ROMEO:', -5, 0.7, 50, 1)
    with pytest.raises(AppError, match='greater than maximum value 500'):  # the page's own limit
        predict(client, 'ROMEO:', 10 ** 6, 0.7, 50, 1)
    with pytest.raises(AppError, match='greater than maximum value 1'):
        predict(client, 'ROMEO:', 10, 1.5, 50, 1)
    # an empty prompt starts from <|endoftext|>; empty top N and seed: all tokens, a random seed (-1 too)
    text, status = predict(client, '', 10, 0.0, None, None)
    assert text and status.startswith('10 tokens in ')
    seeds = {re.search(r'seed (\d+)', predict(client, 'ROMEO:', 1, 0.7, 50, -1)[1]).group(1) for _ in range(3)}
    assert len(seeds) == 3
    # a huge prompt is cropped, not fed whole to the tokenizer; negative top N means all tokens
    text, status = predict(client, 'To be. ' * 5000, 5, 1.0, -3, 2)
    assert 'seed text cropped to its last 4000 characters' in status and len(text) < 4500
    # the server is still up after all that
    assert predict(client, 'JULIET:', 3, 0.7, 50, 3)[1].startswith('3 tokens')


@pytest.mark.timeout(120)
def test_the_handler_caps_what_the_page_does_not_check(tmp_path):
    """The page's limits are checked by Gradio only for requests that go through it; the generate
    function itself caps max tokens and the seed text, and refuses a temperature out of range, for any
    caller."""
    import gradio as gr
    import app
    model, _, about = app.load(write_run(str(tmp_path / 'run')))
    generate_text = app.make_generate_fn(model, about)
    *_, (text, status) = generate_text('ROMEO:', 10 ** 6, 0.7, 50, 1)
    assert status.startswith(f'{app.MAX_NEW_TOKENS} tokens in ') and f'max tokens capped at {app.MAX_NEW_TOKENS}' in status
    *_, (text, status) = generate_text('x' * 10 * app.MAX_PROMPT_CHARS, 2, 0.7, 50, 1)
    assert text.startswith('x' * app.MAX_PROMPT_CHARS) and not text.startswith('x' * (app.MAX_PROMPT_CHARS + 1))
    assert f'seed text cropped to its last {app.MAX_PROMPT_CHARS} characters' in status
    for bad, message in ((5.0, 'Temperature must be from 0'), (float('nan'), 'Temperature must be from 0')):
        with pytest.raises(gr.Error, match=message):
            next(generate_text('ROMEO:', 5, bad, 50, 1))
    with pytest.raises(gr.Error, match='Max tokens must be a number from 1'):
        next(generate_text('ROMEO:', -1, 0.7, 50, 1))


@pytest.mark.timeout(180)
def test_the_queue_is_bounded(tmp_path, monkeypatch):
    """With one generation running and QUEUE_SIZE requests waiting, the next ones are refused at once
    ("Queue is full"), not stored: a crowd cannot pile up work or memory on a 2-core Space. Generation is
    held at a gate until every request has been sent, so the count does not depend on timing."""
    import threading
    from gradio_client import Client
    from gradio_client.utils import QueueError
    import app
    gate, real = threading.Event(), app.generate_ids

    def held(*args, **kwargs):
        assert gate.wait(timeout=120)
        yield from real(*args, **kwargs)
    monkeypatch.setattr(app, 'generate_ids', held)
    demo = app.build_demo(write_run(str(tmp_path / 'run')))
    try:
        _, url, _ = demo.launch(server_name='127.0.0.1', server_port=free_port(), prevent_thread_lock=True, quiet=True)
        client = Client(url, verbose=False)
        extra = 3
        jobs = []
        for _ in range(app.CONCURRENCY + app.QUEUE_SIZE + extra):
            jobs.append(client.submit('ROMEO:', 2, 0.7, 50, 1, api_name='/generate'))
            time.sleep(0.05)  # in order: the first ones take the worker and the queue's places
        time.sleep(2)
        gate.set()
        outcomes = []
        for job in jobs:
            try:
                outcomes.append(job.result(timeout=60)[1].split(' in ')[0])
            except QueueError as e:
                outcomes.append(str(e))
    finally:
        demo.close()
    assert outcomes.count('2 tokens') == app.CONCURRENCY + app.QUEUE_SIZE, outcomes
    assert outcomes.count('Queue is full! Please try again.') == extra, outcomes


def test_training_tab_plots_the_run(server):
    config = json.load(urllib.request.urlopen(server[0] + 'config', timeout=10))
    plots = [c for c in config['components'] if c.get('type') == 'nativeplot']  # gr.LinePlot
    assert sorted(p['props']['y'] for p in plots) == ['loss', 'lr', 'norm', 'tok_per_sec']
    loss = next(p for p in plots if p['props']['y'] == 'loss')['props']['value']
    assert len(loss['data']) == 30  # every step, and the half-written last line skipped
    markdown = ' '.join(str(c['props'].get('value')) for c in config['components'] if c.get('type') == 'markdown')
    assert '30 steps, last loss 2.3000 at step 29' in markdown and 'trained 29 steps' in markdown
    assert f'{GPT(TINY).num_params() / 1e6:.1f}M parameters, int8 weights' in markdown  # counted before int8


def test_no_checkpoint_gives_a_message_not_a_crash(tmp_path, monkeypatch):
    import gradio as gr
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    import app
    monkeypatch.chdir(tmp_path)  # no logs/ here
    monkeypatch.delenv('GPT2_SHAKESPEARE_MODEL', raising=False)
    demo = app.build_demo()
    try:
        _, url, _ = demo.launch(server_name='127.0.0.1', server_port=free_port(), prevent_thread_lock=True, quiet=True)
        config = json.load(urllib.request.urlopen(url + 'config', timeout=10))
        page = ' '.join(str(c['props'].get('value')) for c in config['components'] if c.get('type') == 'markdown')
        assert 'No model loaded' in page and 'python train.py' in page and 'GPT2_SHAKESPEARE_MODEL' in page
        with pytest.raises(AppError, match='no checkpoint found'):
            Client(url, verbose=False).predict('ROMEO:', 10, 0.7, 50, 1, api_name='/generate')
    finally:
        demo.close()
    with pytest.raises(gr.Error, match='Max tokens must be a number from 1 to 500'):
        app.check_request('x', float('nan'), 0.7, None, None)


def test_chromium_types_a_prompt_and_sees_text_appear(server, tmp_path):
    chromium, driver = shutil.which('chromium'), shutil.which('chromedriver')
    if not (chromium and driver):
        message = 'Debian\'s chromium and chromium-driver are not installed (.ci/run installs them)'
        if os.environ.get('REQUIRE_BROWSER'):  # set by .ci/run: there a missing browser is a failure
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ('--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync',
                 '--disable-dev-shm-usage', f'--user-data-dir={tmp_path / "profile"}', '--window-size=1280,900'):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    try:
        browser.get(server[0])
        wait = WebDriverWait(browser, 60)
        prompt = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, '#prompt textarea'))
        prompt.send_keys('ROMEO:')
        browser.find_element(By.CSS_SELECTOR, '#generate').click()
        output = browser.find_element(By.CSS_SELECTOR, '#output textarea')
        wait.until(lambda b: len(output.get_attribute('value')) > len('ROMEO:') + 20)
        assert output.get_attribute('value').startswith('ROMEO:')
        status = browser.find_element(By.CSS_SELECTOR, '#status')

        def seed_of_finished_request(other_than=None):  # the status line of a finished request ends with its seed
            return lambda b: (m := re.search(r'tokens in .* seed (\d+)', status.text)) and m.group(1) != other_than \
                and m.group(1)
        first = wait.until(seed_of_finished_request())
        browser.save_screenshot(os.environ.get('APP_SCREENSHOT') or str(tmp_path / 'app.png'))
        # the page's default seed is a new random one each time: a second click writes another text
        browser.find_element(By.CSS_SELECTOR, '#generate').click()
        wait.until(seed_of_finished_request(other_than=first), message='a second click used the same seed')
    finally:
        browser.quit()
