"""
The Gradio app: type the start of a scene and watch GPT-2, trained on Tiny Shakespeare, write on,
token by token. A second tab plots the training run behind the model (loss, learning rate, grad
norm, tok/s against step). Ready for a Hugging Face Space (see README).

    python app.py                                      # the newest logs/**/ckpt.pt, http://127.0.0.1:7860
    GPT2_SHAKESPEARE_MODEL=user/repo python app.py     # weights from a Hub model repo (what a Space sets)
    python app.py --checkpoint logs/run-x/ckpt.pt --port 7861

The model is whatever inference.py finds; without one the page says how to get one instead of
crashing. Generation is batching.py's server over inference.py's model (int8 weights and a KV cache
on a CPU): the requests of up to BATCH_ROWS visitors decode together, one batch per step, each
streaming its own text; this file only builds the page. Limits hold on the server whatever the page
sends: at most MAX_NEW_TOKENS new tokens and MAX_PROMPT_CHARS of seed text per request, and a queue
of QUEUE_SIZE waiting requests, so that a 2-vCPU Space stays up under load.
"""
import argparse
import html
import json
import math
import os
import time

import gradio as gr
import numpy as np
import pandas as pd
import torch

from batching import Server
from checkpoint import TARGET_LOSS  # what train.py trains for: the loss plot draws it
from cpu_decode import prepare_for_generation
from generation import MODEL_ENV_VAR, CheckpointError, default_precision, load_model, stream_text
from data import gpt2_tokenizer

MAX_NEW_TOKENS = 500     # one request holds the CPU for at most ~10 s on 2 cores
MAX_PROMPT_CHARS = 4000  # longer seed text keeps its end (the model sees the last 1024 tokens anyway)
BATCH_ROWS = 8           # requests decoding together (logs/bench_app_cpu.md): one step reads the weights once for all
CACHE_IDLE_S = 60        # the KV cache (604 MB for 8 rows of the 124M) is given back after this long with no request
QUEUE_SIZE = 20          # requests waiting beyond those; the next one is told the queue is full, at once
EXAMPLES = [  # openings from the play (input.txt): seed text, max tokens, temperature, top N, seed
    ['ROMEO:', 100, 0.7, 50, 1],
    ['JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?', 100, 0.7, 50, 2],
    ['GLOUCESTER:\nNow is the winter of our discontent', 100, 0.7, 50, 3],
    ['First Citizen:\nBefore we proceed any further, hear me speak.', 100, 0.5, 0, 4],
]
PLOTS = [('loss', 'Training loss'), ('lr', 'Learning rate'), ('norm', 'Gradient norm (before clipping)'),
         ('tok_per_sec', 'Training tokens/s')]

# ---- the model and its training run ----

def load(source=None, compile=False):
    """(model ready for generation or None, the path it came from or None, one line for the page:
    what was loaded, or why nothing was). compile: decode through cpu_decode's compiled step."""
    try:
        model, info = load_model(source)
    except CheckpointError as e:
        return None, None, str(e)
    precision = default_precision(next(model.parameters()).device)
    prepare_for_generation(model, precision, compile=compile)
    step = f', trained {info["step"]} steps' if info['step'] is not None else ''
    about = (f'{info["path"]}{step}, {info["params"] / 1e6:.1f}M parameters, {precision} weights, '
             f'{torch.get_num_threads()} CPU threads')
    return model, info['path'], about


def find_metrics(source, path):
    """The metrics.jsonl of the run behind the model: beside the checkpoint (train.py writes it
    there), or in the Hub repo the model came from. None if there is none."""
    if path:
        local = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), 'metrics.jsonl')
        if os.path.exists(local):
            return local
    if source and not os.path.exists(source) and '/' in source:  # a Hub repo id
        try:
            from huggingface_hub import hf_hub_download
            return hf_hub_download(source, 'metrics.jsonl')
        except Exception:  # no metrics.jsonl in the repo, or no network: the tab says so
            return None
    return None


def read_metrics(path, max_points=2000):
    """metrics.jsonl -> DataFrame with columns step, loss, lr, norm, tok_per_sec, one row per step,
    thinned to at most max_points rows so that the page stays light. Lines that are not JSON objects
    with a step (a run killed mid-write) are skipped."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and 'step' in row:
                rows.append(row)
    columns = ['step', 'whole_loss'] + [y for y, _ in PLOTS]
    df = pd.DataFrame(rows, columns=columns).apply(pd.to_numeric, errors='coerce')
    if len(df) > max_points:
        df = df.iloc[::math.ceil(len(df) / max_points)]
    return df

def final_loss(df):
    """', whole-text loss 0.0948 after step 235' from the metrics' last whole-text evaluation, or
    the last batch's loss when the run never made one."""
    whole = df.dropna(subset=['whole_loss'])
    if len(whole):
        return f', whole-text loss {whole.whole_loss.iloc[-1]:.4f} after step {int(whole.step.iloc[-1])}'
    if len(df):
        return f', last batch loss {df.loss.iloc[-1]:.4f} at step {int(df.step.iloc[-1])}'
    return ''


def loss_curves(df):
    """The loss plot's data, long-form: log10 of the batch loss at every step, of the whole-text
    loss where it was measured, and the target."""
    parts = [pd.DataFrame({'step': df.step, 'log10 loss': np.log10(df[column].clip(lower=1e-6)), 'curve': name})
             for column, name in (('loss', 'batch loss'), ('whole_loss', 'whole-text loss'))]
    if len(df):
        parts.append(pd.DataFrame({'step': [df.step.min(), df.step.max()],
                                   'log10 loss': [np.log10(TARGET_LOSS)] * 2, 'curve': 'target'}))
    return pd.concat(parts).dropna()


# ---- one request ----

def refuse(message):
    """A message for the page and the API client; the server logs one line, not a traceback."""
    print(f'refused: {message}', flush=True)
    return gr.Error(message, print_exception=False)


def whole_number(value, name, low, high=None):
    """value as an int from low to high (None: no upper bound), or the error naming the parameter."""
    try:
        number = float(value)
        whole = number == int(number)  # int() raises on NaN and infinity
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole or number < low or (high is not None and number > high):
        limits = f'from {low} to {high}' if high is not None else f'of at least {low}'
        raise refuse(f'{name} must be a whole number {limits}, got {value!r}.')
    return int(number)


def check_request(prompt, max_new_tokens, temperature, top_k, seed):
    """The request's parameters made safe, or gr.Error saying what is wrong. Returns (prompt,
    max_new_tokens, temperature, top_k, seed, notes on what was capped)."""
    notes = []
    prompt = prompt or ''  # empty: inference.py starts from <|endoftext|>
    if not isinstance(prompt, str):
        raise refuse(f'Prompt must be text, got {prompt!r}.')
    if len(prompt) > MAX_PROMPT_CHARS:
        prompt = prompt[-MAX_PROMPT_CHARS:]
        notes.append(f'prompt cropped to its last {MAX_PROMPT_CHARS} characters')
    max_new_tokens = whole_number(max_new_tokens, 'Max tokens', 1)
    if max_new_tokens > MAX_NEW_TOKENS:
        notes.append(f'max tokens capped at {MAX_NEW_TOKENS}')
        max_new_tokens = MAX_NEW_TOKENS
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        value = float('nan')
    if not 0 <= value <= 1:  # also refuses NaN
        raise refuse(f'Temperature must be from 0 (always the likeliest token) to 1, got {temperature!r}.')
    temperature = value
    top_k = whole_number(0 if top_k is None else top_k, 'Top N', 0) or None  # empty or 0: all tokens
    seed = whole_number(-1 if seed is None else seed, 'Random seed', -1, 2 ** 63 - 1)
    if seed == -1:  # a fresh random seed each time; the status line says which
        seed = int.from_bytes(os.urandom(4), 'little')
    return prompt, max_new_tokens, temperature, top_k, seed, notes


def tokens(n):
    return f'{n} token' if n == 1 else f'{n} tokens'


def make_generate_fn(model, about, server=None):
    def generate_text(prompt, max_new_tokens, temperature, top_k, seed):
        """Yields (seed text + new text so far, status line) as tokens come: a generator, so the page
        shows every piece at once. The tokens come from the server's batch, shared with the other
        requests of the moment."""
        if model is None:
            raise refuse(about)
        prompt, max_new_tokens, temperature, top_k, seed, notes = check_request(
            prompt, max_new_tokens, temperature, top_k, seed)
        n = 0  # tokens made so far, for the status line

        def counted(tokens):
            nonlocal n
            for token in tokens:
                n += 1
                yield token

        ids = gpt2_tokenizer().encode(prompt, allowed_special='all')
        text, t0 = prompt, time.perf_counter()
        stream = server.submit(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                               seed=seed)
        try:
            for piece in stream_text(counted(stream)):
                text += piece
                yield text, f'{tokens(n)}...'
        finally:  # also when the client went away mid-generation: its row is freed at the next step
            stream.close()
        dt = time.perf_counter() - t0
        yield text, '; '.join([f'{tokens(n)} in {dt:.1f} s ({n / max(dt, 1e-9):.1f} tokens/s), seed {seed}'] + notes)
    return generate_text

def make_tool_fn(generate_text):
    """The tool an agent calls (over MCP, or gradio_client's /generate_shakespeare): the page's
    generation, answered as plain text once done. Its name, docstring and type hints are what an MCP
    client sees; its checks and limits are the page's, and it decodes in the same batch."""
    def generate_shakespeare(prompt: str, max_new_tokens: int = 100, temperature: float = 0.7,
                             top_k: int = 50, seed: int = -1) -> str:
        """Continue a text in the manner of Shakespeare's plays, with GPT-2 (124M parameters) trained
        from scratch on Tiny Shakespeare (40,000 lines of the plays). Give it the start of a scene, such
        as a character's name and a colon ("ROMEO:"), and it writes on: speeches, names of speakers,
        stage lines. It knows only this text; it is no assistant and answers no questions.

        Args:
            prompt: the text to continue, e.g. "ROMEO:" or a few lines of a scene; at most 4,000 characters (a longer one keeps its end). Empty: the model starts a fresh document.
            max_new_tokens: how many tokens to add, 1 to 500 (more is capped at 500); a token is about three quarters of a word.
            temperature: from 0 to 1. 0 always takes the likeliest token (the same text every time); 1 samples from the model as trained; 0.7 is a good default.
            top_k: sample among the top_k likeliest tokens only; 0 for all of them.
            seed: the random seed, from -1 to 2**63 - 1: the same seed and settings give the same text; -1 for a new one each call.

        Returns:
            The prompt followed by the text the model wrote.
        """
        text = prompt
        for text, _ in generate_text(prompt, max_new_tokens, temperature, top_k, seed):
            pass
        return text
    return generate_shakespeare


# ---- the page ----

def build_demo(source=None, announce=False, batch_rows=BATCH_ROWS, compile=False, cache_idle_s=CACHE_IDLE_S):
    model, path, about = load(source, compile)
    server = Server(model, batch_rows, idle_release_s=cache_idle_s) if model is not None else None
    if server is not None and compile:  # the server compiled it, or said in the log why it could not
        about += ', compiled decoding' if server.compiled else ', eager decoding (the compile failed: see the log)'
    metrics = find_metrics(source or os.environ.get(MODEL_ENV_VAR), path)
    if announce:  # the server's log says what it serves
        print(f'model: {about if model is not None else "none: " + about}', flush=True)
        print(f'training metrics: {metrics or "none"}', flush=True)

    with gr.Blocks(title='GPT-2 Shakespeare', analytics_enabled=False) as demo:
        gr.Markdown('# GPT-2 Shakespeare\nGPT-2 trained from scratch on Tiny Shakespeare (its size is on the '
                    'Model line). Type the start of a scene; the model writes on, token by token.')
        if model is None:  # escaped: the message's logs/<run>/ckpt.pt is no HTML tag
            gr.Markdown(f'**No model loaded.** {html.escape(about, quote=False)}', elem_id='no-model')
        else:
            gr.Markdown(f'Model: `{about}`', elem_id='model-info')

        with gr.Tab('Generate'):
            with gr.Row():
                with gr.Column(scale=1):
                    prompt = gr.Textbox(label='Prompt', lines=4, max_length=MAX_PROMPT_CHARS, elem_id='prompt',
                                        placeholder='ROMEO:',
                                        info='Empty: the model starts a fresh document from <|endoftext|>.')
                    max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=100, step=1, precision=0,
                                               label='Max tokens to generate')
                    temperature = gr.Slider(0, 1, value=0.7, step=0.05, label='Temperature',
                                            info='0: always the likeliest token; 1: sample from the model as it is')
                    top_k = gr.Number(value=50, precision=0, label='Top N tokens per step',
                                      info='Sample among the N likeliest tokens only; empty or 0: all tokens')
                    seed = gr.Number(value=-1, precision=0, label='Random seed',
                                     info='The same seed and settings give the same text; -1: a new random seed '
                                          'each time (the status line says which, to make the text again)')
                    button = gr.Button('Generate', variant='primary', elem_id='generate')
                with gr.Column(scale=2):
                    output = gr.Textbox(label='Text', lines=20, elem_id='output', buttons=['copy'])
                    status = gr.Markdown(label='Status', elem_id='status')
            inputs = [prompt, max_new_tokens, temperature, top_k, seed]
            gr.Examples(EXAMPLES, inputs=inputs, label='Openings from the play')
            # preprocess=False: every value reaches check_request as sent, which answers any bad one
            # (text for a number, 1.5 for a seed) with its own message instead of a server traceback
            # the page's stream of (text, status) stays callable as /generate; the API's documented
            # endpoint, and the MCP tool, is generate_shakespeare below
            generate_text = make_generate_fn(model, about, server)
            button.click(generate_text, inputs, [output, status], api_name='generate', preprocess=False,
                         api_visibility='undocumented', concurrency_id='decode')
        gr.api(make_tool_fn(generate_text), api_name='generate_shakespeare', concurrency_id='decode')

        with gr.Tab('Training run'):
            if metrics is None:
                gr.Markdown('No training metrics found: train.py writes `metrics.jsonl` beside `ckpt.pt`; '
                            'upload it to the Hub repo beside the model to see the run here.')
            else:
                df = read_metrics(metrics)
                gr.Markdown(f'`{metrics}`: {len(df)} steps{final_loss(df)}')
                gr.LinePlot(loss_curves(df), x='step', y='log10 loss', color='curve', height=300,
                            title=f'Loss (log scale; the target is {TARGET_LOSS})')
                with gr.Row():
                    for y, title in PLOTS[1:]:
                        gr.LinePlot(df, x='step', y=y, title=title, height=260)

    # a bounded queue: waiting requests beyond QUEUE_SIZE are refused at once instead of piling up;
    # batch_rows handlers at a time, each fed by its row of the batch
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=batch_rows)
    return demo


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--checkpoint', default=None,
                        help=f'checkpoint path, run directory, Hugging Face directory or Hub repo id '
                             f'(default: ${MODEL_ENV_VAR}, else the newest logs/**/ckpt.pt)')
    parser.add_argument('--host', default=None,
                        help="address to listen on (default: $GRADIO_SERVER_NAME, else 127.0.0.1; a Space sets 0.0.0.0)")
    parser.add_argument('--port', type=int, default=None, help='port (default: $GRADIO_SERVER_PORT, else 7860)')
    parser.add_argument('--batch-rows', type=int, default=BATCH_ROWS,
                        help=f'requests that decode together (default: {BATCH_ROWS}; 1: one at a time)')
    parser.add_argument('--compile', action='store_true',
                        help='decode through one torch.compile graph (cpu_decode.py): faster per token; the '
                             'server compiles it before it listens (about a minute the first time for GPT-2 '
                             '124M, seconds once torch has it on disk)')
    parser.add_argument('--cache-idle-s', type=float, default=CACHE_IDLE_S,
                        help=f'seconds with no request after which the server gives its KV cache back (default: '
                             f'{CACHE_IDLE_S}); the next request takes it again')
    args = parser.parse_args()
    if args.batch_rows < 1:
        parser.error('--batch-rows must be at least 1')
    if not args.cache_idle_s > 0:
        parser.error('--cache-idle-s must be above 0')
    demo = build_demo(args.checkpoint, announce=True, batch_rows=args.batch_rows, compile=args.compile,
                      cache_idle_s=args.cache_idle_s)
    # the page, gradio_client's API, and an MCP server at /gradio_api/mcp/ for agents
    demo.launch(server_name=args.host, server_port=args.port, mcp_server=True)
