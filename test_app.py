"""app.py as a user meets it: `python app.py` on localhost with a tiny random checkpoint, driven by
gradio_client (streaming, bad parameters, an empty prompt) and by a real headless Chromium that types
a prompt, clicks Generate and sees text appear; and 32 clients at once (slow). Set APP_SCREENSHOT=path to
keep the browser's picture."""
import contextlib
import json
import math
import os
import random
import re
import shutil
import threading
import time
import urllib.request

import pytest

from conftest import TINY_CONFIG, app_server, children, free_port, write_run
from model import GPT

def test_streams_text_token_by_token_and_reproducibly(server):
    from gradio_client import Client
    from cpu_decode import prepare_for_generation
    from generation import generate, load_model
    url, ckpt, _ = server
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


@pytest.mark.slow  # two servers of their own, each compiling: the slow suite keeps the main one near 5 minutes
def test_compiled_app_serves_the_texts_of_compiled_inference(tmp_path):
    """python app.py --compile compiles before it listens (its log says so, and so does the Model line),
    and three clients at once, decoding in one batch through the compiled step, get the texts that
    inference.py's compiled model makes for each of them alone."""
    from gradio_client import Client
    from cpu_decode import prepare_for_generation
    from generation import generate, load_model
    with app_server(tmp_path, '--compile') as (url, ckpt, log):
        assert 'batching: compiled the decoding step in ' in log.read_text()
        model, _ = load_model(ckpt)
        prepare_for_generation(model, 'int8', compile=True)
        requests = [('ROMEO:', 30, 0.7, 50, 1), ('JULIET:', 12, 0.0, 0, 2), ('', 25, 1.0, 0, 3)]
        jobs = [Client(url, verbose=False).submit(*r, api_name='/generate') for r in requests]
        for job, (prompt, n, temperature, top_k, seed) in zip(jobs, requests):
            text, status = job.result(timeout=120)
            assert status.startswith(f'{n} tokens in ')
            assert text == prompt + ''.join(generate(model, prompt, n, temperature, top_k or None, seed=seed))
        assert 'CPU threads, compiled decoding' in urllib.request.urlopen(url, timeout=10).read().decode()
    # no working C++ compiler (and a fresh compiler cache): the log says so in a line, the page says
    # eager, and the server serves the same texts all the same
    (tmp_path / 'broken').mkdir()
    env = {'CXX': str(tmp_path / 'no-such-compiler'), 'TORCHINDUCTOR_CACHE_DIR': str(tmp_path / 'inductor')}
    with app_server(tmp_path / 'broken', '--compile', env=env) as (url, ckpt, log):
        assert 'batching: cannot compile the decoding step (' in log.read_text()
        assert 'Traceback' not in log.read_text()
        assert 'eager decoding (the compile failed' in urllib.request.urlopen(url, timeout=10).read().decode()
        prompt, n, temperature, top_k, seed = requests[0]
        text, _ = Client(url, verbose=False).predict(*requests[0], api_name='/generate')
        assert text == prompt + ''.join(generate(model, prompt, n, temperature, top_k or None, seed=seed))


def test_concurrent_requests_stream_their_own_text_and_a_gone_client_frees_its_row(server):
    """Four clients at once, each with its own settings, decode in one batch: each streams its own text,
    the text that inference.py makes for that request alone. A client that cancels mid-generation frees
    its row at the next step (the server's log says so) and the others go on."""
    from gradio_client import Client
    from cpu_decode import prepare_for_generation
    from generation import generate, load_model
    url, ckpt, log = server
    model, _ = load_model(ckpt)
    prepare_for_generation(model, 'int8')
    requests = [('ROMEO:', 30, 0.7, 50, 1), ('JULIET:', 12, 0.0, 0, 2), ('', 25, 1.0, 0, 3), ('KING:', 18, 0.5, 10, 4)]
    clients = [Client(url, verbose=False) for _ in requests]
    jobs = [c.submit(*r, api_name='/generate') for c, r in zip(clients, requests)]
    for job, (prompt, n, temperature, top_k, seed) in zip(jobs, requests):
        text, status = job.result(timeout=120)
        assert status.startswith(f'{n} tokens in ') and f'seed {seed}' in status
        assert text == prompt + ''.join(generate(model, prompt, n, temperature, top_k or None, seed=seed))
    before = log.read_text().count('row freed')
    job = clients[0].submit('ROMEO:', 500, 0.7, 50, 5, api_name='/generate')
    deadline = time.time() + 60
    while len(job.outputs()) < 3:  # a few tokens in
        assert time.time() < deadline and not job.done()
        time.sleep(0.05)
    job.cancel()
    while log.read_text().count('row freed') == before:
        assert time.time() < deadline, log.read_text()[-2000:]
        time.sleep(0.1)
    freed = re.findall(r'batching: client gone after (\d+) tokens, row freed', log.read_text())[-1]
    assert 3 <= int(freed) < 500
    assert predict(clients[1], 'JULIET:', 3, 0.7, 50, 3)[1].startswith('3 tokens')  # the server goes on


def predict(client, *args, timeout=60):
    """client.predict with a time limit: a request that the server's caps fail to bound fails the test in
    seconds instead of generating for ever."""
    return client.submit(*args, api_name='/generate').result(timeout=timeout)


@pytest.mark.parametrize('args, message', [
    (('ROMEO:', -5, 0.7, 50, 1), "Max tokens must be a whole number of at least 1, got -5."),
    (('ROMEO:', 'many', 0.7, 50, 1), "Max tokens must be a whole number of at least 1, got 'many'."),
    (('ROMEO:', 2.5, 0.7, 50, 1), "Max tokens must be a whole number of at least 1, got 2.5."),
    (('ROMEO:', 10, 1.5, 50, 1), "Temperature must be from 0 (always the likeliest token) to 1, got 1.5."),
    (('ROMEO:', 10, 'hot', 50, 1), "Temperature must be from 0 (always the likeliest token) to 1, got 'hot'."),
    (('ROMEO:', 10, 0.7, -3, 1), "Top N must be a whole number of at least 0, got -3."),
    (('ROMEO:', 10, 0.7, 50, 1.5), 'Random seed must be a whole number from -1 to 9223372036854775807, got 1.5.'),
    (('ROMEO:', 10, 0.7, 50, 2 ** 70),
     'Random seed must be a whole number from -1 to 9223372036854775807, got 1180591620717411303424.'),
])
def test_every_bad_value_gets_its_own_message_and_one_log_line(server, args, message):
    """Over the API, any value for any parameter: the client gets the parameter's own message, the
    server's log one line saying so, never a traceback."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    url, _, log = server
    with pytest.raises(AppError) as refused:
        predict(Client(url, verbose=False), *args)
    assert str(refused.value) == message
    deadline = time.time() + 10
    while f'refused: {message}' not in log.read_text():
        assert time.time() < deadline, log.read_text()[-2000:]
        time.sleep(0.1)
    assert 'Traceback' not in log.read_text()


def test_the_api_is_named_and_typed(server):
    """What README documents: /generate_shakespeare takes (prompt, max_new_tokens, temperature, top_k,
    seed) with integers where integers are meant and returns the text; the page's stream, /generate,
    is callable (the tests above call it) but not documented, so it is no second MCP tool."""
    from gradio_client import Client
    client = Client(server[0], verbose=False)
    api = client.view_api(return_format='dict', print_info=False)
    assert list(api['named_endpoints']) == ['/generate_shakespeare']
    endpoint = api['named_endpoints']['/generate_shakespeare']
    assert [(p['parameter_name'], p['python_type']['type']) for p in endpoint['parameters']] == [
        ('prompt', 'str'), ('max_new_tokens', 'int'), ('temperature', 'float'), ('top_k', 'int'), ('seed', 'int')]
    text = client.predict('ROMEO:', 5, 0.0, 50, 1, api_name='/generate_shakespeare')
    assert text == predict(client, 'ROMEO:', 5, 0.0, 50, 1)[0]  # the page's text, as one string


def mcp_session(url, calls):
    """Runs calls(session) against the app's MCP server with the official client over streamable
    HTTP, as an agent's host would connect to a Space; returns what calls returns."""
    import asyncio

    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async def run():
        async with streamable_http_client(url + 'gradio_api/mcp/') as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                return await calls(session)
    return asyncio.run(run())


def test_an_agent_lists_the_tool_and_calls_it_over_mcp(server):
    """`python app.py` is an MCP server: one tool, generate_shakespeare, whose description says what it
    writes and whose every argument is described; a call answers plain text that starts from the
    prompt, the same text the page makes; a bad argument is an error result with the page's one-line
    reason, and the server answers the next call."""
    from gradio_client import Client

    async def calls(session):
        tools = (await session.list_tools()).tools
        args = dict(prompt='ROMEO:', max_new_tokens=8, temperature=0.0, top_k=50, seed=1)
        good = await session.call_tool('generate_shakespeare', args)
        bad = await session.call_tool('generate_shakespeare', {**args, 'temperature': 5})
        again = await session.call_tool('generate_shakespeare', {**args, 'prompt': 'JULIET:'})
        return tools, good, bad, again
    tools, good, bad, again = mcp_session(server[0], calls)
    assert [t.name for t in tools] == ['generate_shakespeare']
    tool = tools[0]
    assert 'Shakespeare' in tool.description and 'GPT-2' in tool.description
    properties = tool.inputSchema['properties']
    assert list(properties) == ['prompt', 'max_new_tokens', 'temperature', 'top_k', 'seed']
    assert all(len(p.get('description', '')) > 20 for p in properties.values()), properties
    assert properties['max_new_tokens']['type'] == 'integer' and properties['temperature']['type'] == 'number'
    page_text = predict(Client(server[0], verbose=False), 'ROMEO:', 8, 0.0, 50, 1)[0]
    assert not good.isError and [c.text for c in good.content] == [page_text]
    assert bad.isError and len(bad.content) == 1
    assert 'Temperature must be from 0 (always the likeliest token) to 1, got 5' in bad.content[0].text
    assert not again.isError and again.content[0].text.startswith('JULIET:')


def test_bad_parameters_get_a_clear_message(server):
    from gradio_client import Client
    client = Client(server[0], verbose=False)
    text, status = predict(client, 'ROMEO:', 1, 0.7, 50, 1)
    assert status.startswith('1 token in ')  # not "1 tokens"
    # an empty prompt starts from <|endoftext|>; empty top N and seed: all tokens, a random seed (-1 too)
    text, status = predict(client, '', 10, 0.0, None, None)
    assert text and status.startswith('10 tokens in ')
    seeds = {re.search(r'seed (\d+)', predict(client, 'ROMEO:', 1, 0.7, 50, -1)[1]).group(1) for _ in range(3)}
    assert len(seeds) == 3
    # a huge prompt is cropped, not fed whole to the tokenizer; negative top N means all tokens
    text, status = predict(client, 'To be. ' * 5000, 5, 1.0, 0, 2)
    assert 'prompt cropped to its last 4000 characters' in status and len(text) < 4500
    # the server is still up after all that
    assert predict(client, 'JULIET:', 3, 0.7, 50, 3)[1].startswith('3 tokens')


@pytest.mark.timeout(120)
def test_the_handler_caps_what_the_page_does_not_check(tmp_path):
    """The page's limits are checked by Gradio only for requests that go through it; the generate
    function itself caps max tokens and the prompt, and refuses a temperature out of range, for any
    caller."""
    import gradio as gr
    import app
    from batching import Server
    model, _, about = app.load(write_run(str(tmp_path / 'run')))
    generate_text = app.make_generate_fn(model, about, Server(model, 1))
    *_, (text, status) = generate_text('ROMEO:', 10 ** 6, 0.7, 50, 1)
    assert status.startswith(f'{app.MAX_NEW_TOKENS} tokens in ') and f'max tokens capped at {app.MAX_NEW_TOKENS}' in status
    *_, (text, status) = generate_text('x' * 10 * app.MAX_PROMPT_CHARS, 2, 0.7, 50, 1)
    assert text.startswith('x' * app.MAX_PROMPT_CHARS) and not text.startswith('x' * (app.MAX_PROMPT_CHARS + 1))
    assert f'prompt cropped to its last {app.MAX_PROMPT_CHARS} characters' in status
    for bad, message in ((5.0, 'Temperature must be from 0'), (float('nan'), 'Temperature must be from 0')):
        with pytest.raises(gr.Error, match=message):
            next(generate_text('ROMEO:', 5, bad, 50, 1))
    with pytest.raises(gr.Error, match='Max tokens must be a whole number of at least 1'):
        next(generate_text('ROMEO:', -1, 0.7, 50, 1))


@pytest.mark.timeout(180)
def test_the_queue_is_bounded(tmp_path, monkeypatch):
    """With BATCH_ROWS generations running and QUEUE_SIZE requests waiting, the next ones are refused at
    once ("Queue is full"), not stored: a crowd cannot pile up work or memory on a 2-core Space. The
    batch's steps are held at a gate until every request has been sent, so the count does not depend on
    timing."""
    from gradio_client import Client
    from gradio_client.utils import QueueError
    import app
    import batching
    gate, real = threading.Event(), batching.Batch.step

    def held(self):
        assert gate.wait(timeout=120)
        return real(self)
    monkeypatch.setattr(batching.Batch, 'step', held)
    demo = app.build_demo(write_run(str(tmp_path / 'run')))
    try:
        _, url, _ = demo.launch(server_name='127.0.0.1', server_port=free_port(), prevent_thread_lock=True, quiet=True)
        client = Client(url, verbose=False)
        extra = 3
        jobs = []
        for _ in range(app.BATCH_ROWS + app.QUEUE_SIZE + extra):
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
    assert outcomes.count('2 tokens') == app.BATCH_ROWS + app.QUEUE_SIZE, outcomes
    assert outcomes.count('Queue is full! Please try again.') == extra, outcomes


def test_training_tab_plots_the_run(server):
    config = json.load(urllib.request.urlopen(server[0] + 'config', timeout=10))
    plots = [c for c in config['components'] if c.get('type') == 'nativeplot']  # gr.LinePlot
    assert sorted(p['props']['y'] for p in plots) == ['log10 loss', 'lr', 'norm', 'tok_per_sec']
    loss = next(p for p in plots if p['props']['y'] == 'log10 loss')['props']
    columns = loss['value']['columns']
    rows = [dict(zip(columns, row)) for row in loss['value']['data']]
    # every step's batch loss (the half-written last line skipped), the two whole-text evaluations, the target
    assert [sum(r['curve'] == c for r in rows) for c in ('batch loss', 'whole-text loss', 'target')] == [30, 2, 2]
    assert {round(r['log10 loss'], 6) for r in rows if r['curve'] == 'target'} == {round(math.log10(0.099999), 6)}
    assert loss['color'] == 'curve' and 'log' in loss['title']
    markdown = ' '.join(str(c['props'].get('value')) for c in config['components'] if c.get('type') == 'markdown')
    assert '30 steps, whole-text loss 2.2500 after step 29' in markdown and 'trained 30 steps' in markdown
    assert f'{GPT(TINY_CONFIG).num_params() / 1e6:.1f}M parameters, int8 weights' in markdown  # counted before int8


@pytest.mark.slow  # a second app of its own, with an MCP server: about a minute
def test_a_failed_step_costs_only_its_own_requests(tmp_path, monkeypatch):
    """When a decoding step raises (out of memory, a bug), the requests in that step get the error and
    the server goes on: the next request on the page and the next over MCP are answered as usual."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    import app
    import batching
    real_step, armed = batching.Batch.step, threading.Event()

    def step(self):  # the first step after armed.set() fails as a real one might
        if armed.is_set():
            armed.clear()
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory (injected)")
        return real_step(self)
    monkeypatch.setattr(batching.Batch, 'step', step)
    demo = app.build_demo(write_run(str(tmp_path / 'run')))
    try:
        _, url, _ = demo.launch(server_name='127.0.0.1', server_port=free_port(), prevent_thread_lock=True,
                                quiet=True, mcp_server=True)
        client = Client(url, verbose=False)
        armed.set()
        with pytest.raises(AppError):
            predict(client, 'ROMEO:', 5, 0.7, 50, 1)
        assert not armed.is_set()  # the failure was the one injected
        text, status = predict(client, 'ROMEO:', 5, 0.7, 50, 1)
        assert text.startswith('ROMEO:') and status.startswith('5 tokens in ')

        async def calls(session):
            return await session.call_tool('generate_shakespeare', dict(prompt='JULIET:', max_new_tokens=5))
        answer = mcp_session(url, calls)
        assert not answer.isError and answer.content[0].text.startswith('JULIET:')
    finally:
        demo.close()


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
    assert 'logs/&lt;run&gt;/ckpt.pt' in page  # escaped: shown as text, not taken for a tag
    with pytest.raises(gr.Error, match='Max tokens must be a whole number of at least 1, got nan'):
        app.check_request('x', float('nan'), 0.7, None, None)


@contextlib.contextmanager
def chromium(tmp_path):
    """Headless Chromium driven by selenium (Debian's chromium and chromium-driver; .ci/run installs
    them and sets REQUIRE_BROWSER, so that there a missing browser fails instead of skipping)."""
    chromium, driver = shutil.which('chromium'), shutil.which('chromedriver')
    if not (chromium and driver):
        message = 'Debian\'s chromium and chromium-driver are not installed (.ci/run installs them)'
        if os.environ.get('REQUIRE_BROWSER'):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ('--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync',
                 '--disable-dev-shm-usage', f'--user-data-dir={tmp_path / "profile"}', '--window-size=1280,900'):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    try:
        yield browser
    finally:
        browser.quit()


@pytest.mark.timeout(180)
def test_chromium_shows_the_whole_no_model_message(tmp_path, monkeypatch):
    """Without a model the page says how to get one, all of it: logs/<run>/ckpt.pt is text, not a tag
    that swallows the rest of the line."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    import app
    monkeypatch.chdir(tmp_path)  # no logs/ here
    monkeypatch.delenv('GPT2_SHAKESPEARE_MODEL', raising=False)
    demo = app.build_demo()
    try:
        _, url, _ = demo.launch(server_name='127.0.0.1', server_port=free_port(), prevent_thread_lock=True, quiet=True)
        with chromium(tmp_path) as browser:
            browser.get(url)
            shown = WebDriverWait(browser, 60).until(lambda b: b.find_element(By.CSS_SELECTOR, '#no-model').text)
    finally:
        demo.close()
    assert 'No model loaded.' in shown and 'logs/<run>/ckpt.pt' in shown
    assert shown.rstrip().endswith('GPT2_SHAKESPEARE_MODEL=user/repo (Hugging Face Hub)'), shown


@pytest.mark.timeout(300)
def test_chromium_types_a_prompt_and_sees_text_appear(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    with chromium(tmp_path) as browser:
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


# ---- the app under load ----

def vm_rss(pid):
    """Resident memory of a process in bytes (VmRSS in /proc/<pid>/status)."""
    line = next(s for s in open(f'/proc/{pid}/status').read().splitlines() if s.startswith('VmRSS:'))
    return int(line.split()[1]) * 1024


def load_requests(rng, max_new_tokens, max_prompt_chars):
    """One request as a browser or a script might send it: (kind, its arguments, the refusal it earns or
    None). Good ones are short, so that a full queue drains in seconds even on a busy 2-core machine."""
    kind = rng.choice(['good'] * 5 + ['huge prompt', 'negative tokens', 'huge max tokens', 'temperature 5'])
    n, seed = rng.randint(1, 12), rng.randint(0, 1000)
    if kind == 'huge prompt':  # 100,000 characters; the server keeps the last max_prompt_chars
        tail = ('To be, or not to be: that is the question. ' * 100)[:max_prompt_chars]
        return kind, ('x' * (100_000 - len(tail)) + tail, n, 0.7, 50, seed), None
    if kind == 'negative tokens':
        return kind, ('ROMEO:', -5, 0.7, 50, seed), 'Max tokens must be a whole number of at least 1, got -5.'
    if kind == 'huge max tokens':
        return kind, ('ROMEO:', 10 ** 6, 0.7, 50, seed), None  # capped at max_new_tokens
    if kind == 'temperature 5':
        return kind, ('ROMEO:', n, 5.0, 50, seed), 'Temperature must be from 0 (always the likeliest token) to 1, got 5.0.'
    return kind, (rng.choice(['ROMEO:', 'JULIET:\nO Romeo', '', 'First Citizen:']), n, 0.7, 50, seed), None


@pytest.mark.slow
def test_app_under_load_answers_or_refuses_every_request(server, monkeypatch):
    """32 clients send requests for 40 s, a third of them bad (negative or 10**6 max tokens, temperature
    5) or huge (a 100,000-character prompt), to `python app.py` (BATCH_ROWS requests decoding together, a
    queue of QUEUE_SIZE). Every request is answered, or refused at once because the queue is full, or refused
    with the parameter's own message: none waits past REQUEST_LIMIT. The caps hold (10**6 max tokens is
    refused or capped, the prompt is cropped), the server's memory does not grow, and afterwards a fresh request
    is answered in seconds: no worker is stuck. LOAD_REPORT=path keeps the summary line."""
    monkeypatch.setenv('GRADIO_ANALYTICS_ENABLED', 'False')  # 33 clients, none of them calling home
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    from gradio_client.utils import QueueError
    import app
    CLIENTS, LOAD_SECONDS, REQUEST_LIMIT = 32, 40, 120
    url, _, _ = server
    port = url.rstrip('/').rsplit(':', 1)[1]
    pid = next(pid for pid, env in children(os.getpid()).items() if env.get('GRADIO_SERVER_PORT') == port)
    seed = int(os.environ.get('FAULT_SEED', time.time_ns() % 100_000))
    rng = random.Random(seed)

    # warm-up: 20 requests of all kinds, one after the other; the memory after them is the baseline
    warm_client = Client(url, verbose=False)
    for _ in range(20):
        with contextlib.suppress(AppError):
            warm_client.predict(*load_requests(rng, app.MAX_NEW_TOKENS, app.MAX_PROMPT_CHARS)[1], api_name='/generate')
    warm = vm_rss(pid)

    clients = [Client(url, verbose=False) for _ in range(CLIENTS)]
    outcomes = []  # (kind, outcome, seconds, detail)
    until = time.time() + LOAD_SECONDS

    def send(client, rng):
        while time.time() < until:
            kind, args, refusal = load_requests(rng, app.MAX_NEW_TOKENS, app.MAX_PROMPT_CHARS)
            t0 = time.time()
            try:
                text, status = client.submit(*args, api_name='/generate').result(timeout=REQUEST_LIMIT)
            except QueueError as e:
                outcomes.append((kind, 'refused-full', time.time() - t0, str(e)))
                time.sleep(rng.uniform(0.1, 0.5))  # a polite client waits a little before it tries again
                continue
            except AppError as e:
                ok = refusal is not None and str(e) == refusal
                outcomes.append((kind, 'refused-invalid' if ok else 'wrong', time.time() - t0, str(e)))
                continue
            except Exception as e:  # a timeout, a dropped connection: each one a failure
                outcomes.append((kind, 'failed', time.time() - t0, f'{type(e).__name__}: {e}'))
                continue
            # answered: the server's caps held (10**6 max tokens may be capped instead of refused)
            n, note = min(args[1], app.MAX_NEW_TOKENS), {
                'huge prompt': f'prompt cropped to its last {app.MAX_PROMPT_CHARS} characters',
                'huge max tokens': f'max tokens capped at {app.MAX_NEW_TOKENS}'}.get(kind, '')
            ok = (refusal is None or kind == 'huge max tokens') and text.startswith(args[0][-app.MAX_PROMPT_CHARS:]) \
                and status.startswith(f'{app.tokens(n)} in ') and note in status
            outcomes.append((kind, 'answered' if ok else 'wrong', time.time() - t0, f'{status} | {text[:80]!r}'))

    threads = [threading.Thread(target=send, args=(c, random.Random(rng.random())), daemon=True) for c in clients]
    for t in threads:
        t.start()
    peak = warm
    while any(t.is_alive() for t in threads) and time.time() < until + REQUEST_LIMIT + 10:
        peak = max(peak, vm_rss(pid))
        time.sleep(0.5)
    stuck = sum(t.is_alive() for t in threads)
    after = vm_rss(pid)
    t0 = time.time()
    text, status = Client(url, verbose=False).predict('ROMEO:', 5, 0.7, 50, 1, api_name='/generate')
    fresh = time.time() - t0

    count = {k: sum(o[1] == k for o in outcomes) for k in ('answered', 'refused-full', 'refused-invalid', 'wrong', 'failed')}
    summary = (f'app under load: {len(outcomes)} requests from {CLIENTS} clients in {LOAD_SECONDS} s (seed {seed}): '
               f'{count["answered"]} answered, {count["refused-full"]} refused (queue full), {count["refused-invalid"]} '
               f'refused (invalid parameters), {count["wrong"] + count["failed"]} other; longest request '
               f'{max(o[2] for o in outcomes):.1f} s; a fresh request after the load: {fresh:.1f} s; server RSS '
               f'{warm / 2**20:.0f} MiB after warm-up, {peak / 2**20:.0f} MiB peak, {after / 2**20:.0f} MiB after')
    print(summary)
    if os.environ.get('LOAD_REPORT'):
        with open(os.environ['LOAD_REPORT'], 'a') as f:
            f.write(summary + '\n')
    assert not stuck, f'{stuck} clients still wait {REQUEST_LIMIT} s after the load'
    assert not count['wrong'] + count['failed'], [o for o in outcomes if o[1] in ('wrong', 'failed')][:5]
    assert count['answered'] and count['refused-full'] and count['refused-invalid']  # the load filled the queue
    assert {o[3] for o in outcomes if o[1] == 'refused-full'} == {'Queue is full! Please try again.'}
    assert len({o[0] for o in outcomes if o[1] != 'refused-full'}) == 5  # each kind got past the queue and was judged
    assert status.startswith('5 tokens in ') and fresh < 15
    assert after < min(1.5 * warm, warm + (300 << 20)), summary
