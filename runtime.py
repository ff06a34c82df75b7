"""
Where a run runs, and what it costs there: the device (picked once for train.py, inference.py and
bench.py), autocast, the processes torchrun started, memory and time measured before a run on a CPU,
progress on long work, and the failures only a message can tell apart.
"""
import contextlib
import datetime
import os
import platform
import re
import sys
import time
from collections import namedtuple

import torch
import torch.distributed as dist


# ---- the device ----

def pick_device(name='auto'):
    """'auto' -> 'cuda' if there is a CUDA GPU, else 'mps' on an Apple GPU, else 'cpu'. Any other
    name is checked: ValueError (one line) when this torch cannot use that device."""
    if name == 'auto':
        if torch.cuda.is_available():
            return 'cuda'
        return 'mps' if torch.backends.mps.is_available() else 'cpu'
    kind = name.split(':')[0]
    if kind == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'--device {name}, but this torch sees no CUDA GPU')
    if kind == 'mps' and not torch.backends.mps.is_available():
        raise ValueError(f'--device {name}, but MPS is not available')
    if kind not in ('cpu', 'cuda', 'mps'):
        raise ValueError(f'--device {name}: not a device (auto, cpu, cuda, cuda:N or mps)')
    return name


def autocast(device, dtype='auto'):
    """(dtype name, the autocast context for it) on a device. auto: bfloat16 on a CUDA GPU that has
    it, float16 on an older one (a T4: train with a GradScaler), float32 (no autocast) elsewhere."""
    kind = device.split(':')[0]
    if dtype == 'auto' and kind == 'cuda':
        dtype = 'bfloat16' if torch.cuda.get_device_capability(device)[0] >= 8 else 'float16'
    elif dtype == 'auto':
        dtype = 'float32'
    if dtype == 'float32':
        return dtype, contextlib.nullcontext()
    return dtype, torch.autocast(kind, dtype=getattr(torch, dtype))


def device_name(device):
    """What a log says the run ran on: the GPU's name, or the CPU's and its core count."""
    kind = device.split(':')[0]
    if kind == 'cuda':
        return torch.cuda.get_device_name(device)
    if kind == 'mps':
        return 'Apple MPS'
    bf16 = cpu_bf16()
    return f'CPU {cpu_model()} ({os.cpu_count()} cores{", " + bf16 if bf16 else ""})'


def _cpuinfo(field):
    """A field of the first processor in /proc/cpuinfo (Linux), or ''."""
    with contextlib.suppress(OSError):
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.split(':')[0].strip() == field:
                    return line.split(':', 1)[1].strip()
    return ''


def cpu_model():
    """The CPU's model name, as lscpu shows it where Linux tells it."""
    return _cpuinfo('model name') or platform.processor() or platform.machine()


def cpu_flags():
    """The CPU's feature flags (Linux), e.g. {'avx512_bf16', 'amx_bf16', ...}; empty elsewhere."""
    return set(_cpuinfo('flags').split())


def cpu_bf16():
    """What the CPU has for bfloat16 math: 'AMX bf16' (matrix tiles), 'AVX512 bf16' (dot products
    only), or '' (emulated, or not known off Linux). Logged beside every CPU figure: it decides how
    fast bfloat16 trains."""
    flags = cpu_flags()
    if 'amx_bf16' in flags:
        return 'AMX bf16'
    return 'AVX512 bf16' if 'avx512_bf16' in flags else ''


# ---- what a run costs on this machine ----

def peak_memory(reset=False):
    """This process's peak resident memory in bytes (None where it cannot be read). reset: start a
    new peak from now (Linux; elsewhere the peak since the process started)."""
    if os.path.exists('/proc/self/clear_refs'):
        with contextlib.suppress(OSError, ValueError, StopIteration):
            if reset:
                with open('/proc/self/clear_refs', 'w') as f:
                    f.write('5')  # resets VmHWM, the peak resident set
            with open('/proc/self/status') as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM:'))
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == 'Darwin' else peak * 1024  # macOS counts bytes, Linux KiB


def free_memory():
    """Bytes of memory this process may still take: Linux's MemAvailable (within a container's
    cgroup limit and the process's data limit), else half the physical memory; None if unknown."""
    free = None
    with contextlib.suppress(OSError, ValueError):
        with open('/proc/meminfo') as f:
            free = next(int(line.split()[1]) * 1024 for line in f
                        if line.startswith('MemAvailable:'))
    with contextlib.suppress(OSError, ValueError):
        with open('/sys/fs/cgroup/memory.max') as f:
            limit = f.read().strip()
        with open('/sys/fs/cgroup/memory.current') as f:
            used = int(f.read())
        if limit != 'max' and (free is None or int(limit) - used < free):
            free = int(limit) - used
    if free is None:
        with contextlib.suppress(ValueError, OSError, AttributeError):
            free = os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') // 2
    with contextlib.suppress(ImportError, OSError, ValueError, StopIteration):  # ulimit -d
        import resource
        limit = resource.getrlimit(resource.RLIMIT_DATA)[0]
        with open('/proc/self/status') as f:
            used = next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmData:'))
        if limit != resource.RLIM_INFINITY and (free is None or limit - used < free):
            free = limit - used
    return free


def measure_micro_step(model, x, y, ctx):
    """(seconds, bytes) that one forward and backward of the batch x, y took: time, and the growth
    of the peak resident memory (the gradients, allocated once, and the batch's activations). The
    gradients are cleared and the random state restored afterwards, so training goes on as if this
    had not run."""
    rng = torch.get_rng_state()
    before = peak_memory(reset=True)
    t0 = time.perf_counter()
    with ctx:
        _, loss = model(x, y)
    loss.backward()
    seconds = time.perf_counter() - t0
    grown = None if before is None else peak_memory() - before
    model.zero_grad(set_to_none=True)
    torch.set_rng_state(rng)
    return seconds, grown


def keep_freed_memory():
    """On Linux with glibc: freed memory stays in the process for the next allocation instead of
    going back to the system. A CPU training step allocates and frees GBs of activations; by
    default glibc maps each big block anew and the kernel zeroes every page of it on first touch,
    which took a third of a step's time (logs/cpu_training.md). True if the setting took."""
    if sys.platform != 'linux':
        return False
    import ctypes
    try:
        libc = ctypes.CDLL(None)
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt's parameters in glibc's malloc.h
        # no block served by its own mmap, and no trimming of the heap's free top back to the system
        return bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


# ---- the processes ----

Runtime = namedtuple('Runtime', 'ddp rank local_rank world device device_type dtype autocast '
                                 'compile master')


def setup_runtime(args):
    """How this process runs (a Runtime): its rank among all processes and on its machine, the
    device and dtype; joins the other processes when torchrun started this one."""
    ddp = 'RANK' in os.environ  # set by torchrun
    rank, local_rank, world = 0, 0, 1
    if ddp:
        rank, local_rank, world = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    device = pick_device(args.device)  # ValueError: a device this torch cannot use
    kind = device.split(':')[0]
    if kind == 'cuda':
        if ddp:
            device = f'cuda:{local_rank}'
        elif ':' not in device:
            device = 'cuda:0'  # torch.cuda.set_device wants an index
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision('high')  # TF32 matmuls for whatever runs in float32
    if ddp:
        # torch._dynamo, imported later by DDP or torch.compile, takes references to a process group
        # that exists at its import and keeps it for good: destroy_process_group would then leave
        # Gloo's threads and sockets running into the interpreter's exit, the likely cause of a rank's
        # rare abort after a finished run ('terminate called without an active exception'). Imported
        # first, it holds none, and the group closes when train.main destroys it.
        import torch._dynamo as _dynamo  # noqa: F401  (bound apart: a bare import would make torch local here)
        # the timeout bounds every collective: a process that hangs fails the run, not stalls it
        dist.init_process_group('nccl' if kind == 'cuda' else 'gloo',
                                device_id=torch.device(device) if kind == 'cuda' else None,
                                timeout=datetime.timedelta(seconds=args.ddp_timeout))
    dtype, ctx = autocast(device, args.dtype)
    use_compile = kind == 'cuda' if args.compile is None else args.compile
    return Runtime(ddp, rank, local_rank, world, device, kind, dtype, ctx, use_compile,
                   rank == 0)


def collective_failure(error):
    """Why another process died or hung in a collective, if `error` says so; else None. NCCL raises
    DistError, Gloo a RuntimeError whose message starts '[.../gloo/...cc:537]': only the message
    tells, so test_train.py checks this on a real Gloo failure."""
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    location = re.match(r'\[[^\]]*/gloo/[^\]]*\]\s*', first)
    if not (isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and location)):
        return None
    return first[location.end() if location else 0:].split('. ')[0]


def out_of_memory(error):
    """What a failed CPU allocation says, or None for any other error. torch raises a plain
    RuntimeError there: only its message tells, and test_train.py checks it on a real one."""
    found = re.search(r"DefaultCPUAllocator: can't allocate memory[^.]*", str(error))
    return found.group(0) if isinstance(error, RuntimeError) and found else None


# ---- the CPU's precision ----

# a compile on a CPU takes about a minute: it pays when the run is much longer than that
CPU_COMPILE_MIN_RUN_SECONDS = 30 * 60


def cpp_compiler():
    """The C++ compiler torch.compile's CPU backend would call, or None."""
    import shutil
    return os.environ.get('CXX') or next(filter(None, map(shutil.which, ('g++', 'clang++', 'cl'))),
                                         None)


def pick_cpu_precision(args, rt, model, windows):
    """On a CPU: (the Runtime with --dtype auto and an unset --compile decided, a line for the log).
    One sequence's forward and backward is timed in float32 and in bfloat16 autocast (each the
    second of two tries: the first pays for one-off setup); the faster dtype trains. bfloat16 is
    some 3 times as fast where the CPU multiplies bfloat16 matrices natively (AMX) and slower where
    it emulates them. Compiling pays for a run of CPU_COMPILE_MIN_RUN_SECONDS or more at the eager
    speed. Processes of one run add up their times, so they all decide the same."""
    x, y = windows.get(0, 1)
    dtypes = ['float32', 'bfloat16'] if args.dtype == 'auto' else [args.dtype]
    seconds = []
    for name in dtypes:
        ctx = autocast(rt.device, name)[1]
        measure_micro_step(model, x, y, ctx)
        seconds.append(measure_micro_step(model, x, y, ctx)[0])
    seconds = torch.tensor(seconds)
    if rt.ddp:
        dist.all_reduce(seconds)
        seconds /= rt.world
    best = int(seconds.argmin())
    dtype, per_sequence = dtypes[best], seconds[best].item()
    figures = ', '.join(f'{n} {t:.2f} s' for n, t in zip(dtypes, seconds.tolist()))
    line = f'CPU precision: {dtype} (one sequence forward and backward: {figures})'
    use_compile = rt.compile
    if args.compile is None:
        run_s = per_sequence * args.total_batch_tokens / args.block_size / rt.world * args.max_steps
        use_compile = run_s >= CPU_COMPILE_MIN_RUN_SECONDS and cpp_compiler() is not None
        span = f'{run_s / 3600:.1f} h' if run_s >= 5400 else f'{run_s / 60:.0f} min' if run_s >= 90 else f'{run_s:.0f} s'
        why = f'{args.max_steps} step{"s" * (args.max_steps != 1)}: about {span} at this speed'
        if run_s >= CPU_COMPILE_MIN_RUN_SECONDS and not use_compile:
            why += ', but no C++ compiler was found'
        line += f'; compile: {"on" if use_compile else "off"} ({why})'
    args.dtype, args.compile = dtype, use_compile  # saved: a resumed run keeps them
    return rt._replace(dtype=dtype, autocast=autocast(rt.device, dtype)[1], compile=use_compile), line


# ---- a slow machine ----

# a 7.2M-parameter model on the play's first 1,025 tokens: the whole pipeline in minutes on a CPU
# (AdamW and float32 pinned: the same run on every CPU, whatever the cpu preset and --dtype auto pick)
WALKTHROUGH = ('python train.py --n-layer 4 --n-head 4 --n-embd 128 --block-size 128 '
               '--batch-size 8 --total-batch-tokens 1024 --data-tokens 1025 --lr 1e-2 '
               '--warmup-steps 10 --max-steps 400 --optimizer adamw --weight-decay 0.1 --dtype float32 '
               '--device cpu')


# on a CPU, the longest a micro-step may take: a signal is answered between two of them, and a CPU
# trains as many tokens/s one sequence at a time as eight at a time (logs/bench_cpu.md)
CPU_MICRO_STEP_SECONDS = 10


def fit_micro_batch(args, rt, model, windows, B):
    """On a CPU or Apple GPU: (micro-batch, a notice for the log or None). One sequence's forward
    and backward is measured; the micro-batch halves until what training still has to allocate fits
    in the free memory and, on a CPU, until a micro-step takes at most CPU_MICRO_STEP_SECONDS
    (gradient accumulation keeps the step's tokens); a slow run says so."""
    seconds, grown = measure_micro_step(model, *windows.get(0, 1), rt.autocast)
    free, weights = free_memory(), model.num_params() * 4
    # the first backward also allocated the gradients
    per_sequence = max(grown - weights, 1) if grown else None

    def need(B):  # bytes to allocate yet: gradients, AdamW's two moments, B sequences' activations
        return 3 * weights + B * per_sequence if per_sequence and free else None

    def too_big(B):
        if need(B) and need(B) > 0.6 * free:  # 0.6: allocators keep more than a step holds
            return True
        return rt.device_type == 'cpu' and B * seconds > CPU_MICRO_STEP_SECONDS
    wanted = B
    while B % 2 == 0 and too_big(B):
        B //= 2
    step_s = seconds * args.total_batch_tokens / args.block_size / rt.world
    if B == wanted and step_s < 30:
        return B, None
    memory = ''
    if need(B) is not None:
        memory = f' (about {need(B) / 1e9:.1f} GB of the {free / 1e9:.1f} GB free)'
    pass_min = seconds * windows.n / rt.world / 60
    return B, (f'notice: on this {rt.device_type.upper()} one sequence takes {seconds:.1f} s '
               f'forward and backward: a step about {step_s / 60:.1f} min, a pass over the text '
               f'{pass_min:.0f} min; micro-batch {B}{memory}, so Ctrl-C is answered within '
               f'about {B * seconds:.0f} s. A GPU trains GPT-2 124M in minutes; to see the whole '
               f'pipeline here first, run the walk-through: {WALKTHROUGH}')


class Progress:
    """Where work that takes long is: after 10 s, a line on stderr with the part done and the time
    left, rewritten in place on a terminal (a new line every 30 s elsewhere); never in train.log."""

    def __init__(self, what, total, active=True):
        self.what, self.total, self.active = what, total, active
        self.t0, self.shown = time.time(), None

    def update(self, done):
        elapsed, every = time.time() - self.t0, 1 if sys.stderr.isatty() else 30
        if not self.active or elapsed < 10 or done >= self.total:
            return
        if self.shown is not None and elapsed - self.shown < every:
            return
        self.shown = elapsed
        left = elapsed / done * (self.total - done)
        line = f'{self.what} {done}/{self.total}, {elapsed:.0f} s, about {left:.0f} s left'
        sys.stderr.write(f'\r{line}\033[K' if every == 1 else f'{line}\n')
        sys.stderr.flush()

    def close(self):
        if self.shown is not None and sys.stderr.isatty():
            sys.stderr.write('\r\033[K')  # the step line takes its place
