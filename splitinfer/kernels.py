"""The TEE's fused kernels: chains of element-wise ops that inductor (PyTorch's compiler, its C++/OpenMP backend)
turns into one or two passes over memory, where eager PyTorch makes a pass, and a round of thread
wake-ups, per op.

A kernel is a plain function of tensors marked `@tee_kernel`. It runs as written (eager) unless
`select(True)` switched compiled kernels on for the process, so the same code is both paths. Compiling
needs a C++ compiler; where there is none, `select` says so once and the kernels stay eager. Shapes are
static: each new shape compiles once (about a second), which `SplitLlama.warm_kernels` does during
set-up, so that the timed inference compiles nothing. Set-up also times each compiled kernel against its
eager form at each shape (`choosing`) and keeps the faster there: which is faster depends on the CPU and
the size (on the H100 machine, at 128 tokens, ours' matmul masks ran slower compiled in two rounds, and
every step faster at 512).
"""
from __future__ import annotations

import functools
import inspect
import os
import statistics
import sys
import time
import types
import weakref
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

import torch
from torch.fx.experimental.proxy_tensor import make_fx

COMPILED = "compiled (inductor C++)"
EAGER = "eager"
# eager kernels, and `native`'s hand-written C++ kernels as forms of their steps, picked per shape in set-up: no
# inductor, so no compile in set-up beyond the C++ kernels' one build per machine
CPP = "cpp (eager kernels and splitinfer.native's C++ kernels, picked per shape)"
_state = {"on": False, "cpp": False, "mode": EAGER, "threads": None, "failure": None, "start_ms": 0.0,
          "choosing": False, "chosen": True, "builds": 0}
failed: dict[str, str] = {}  # kernel -> why it could not be compiled (it runs eager), for the JSON
# (kernel, its first argument's shape, its strides) -> {"eager_ms", "compiled_ms", "eager_one_thread_ms"} as
# set-up timed them (`choosing`); the kernel runs in the fastest form at that layout (`_form_at`, where that is
# not compiled). Strides too: a compiled kernel is built for them, and otp's kᵀ and v have one shape where n is
# the head size.
Layout = tuple[str, tuple[int, ...], tuple[int, ...]]
choices: dict[Layout, dict[str, float]] = {}
ONE_THREAD = "eager, one thread"  # the eager form with torch's other threads left waiting (`on_one_thread`)
_form_at: dict[Layout, str] = {}  # EAGER or ONE_THREAD, where set-up timed that faster than compiled
# (step, its first operand's shape, its dtype) -> {"<form>_ms" for each form, "runs": the form kept}: a step
# with more than one form, each computing its result by other means (not a kernel against its eager form),
# timed in set-up where compiled kernels are chosen per shape (`pick`)
Pick = tuple[str, tuple[int, ...], torch.dtype]
picks: dict[Pick, dict[str, float | str]] = {}
WAIT_S = 2e-4  # the busy-wait before each timed call: the TEE's threads idle, as while it waits on the GPU


def tee_kernel(fn: Callable | None = None, *, exact: bool = False, eager: Callable | None = None,
               unused: tuple[str, ...] = ()) -> Callable:
    """`fn` as a TEE kernel: compiled on first use once compiled kernels are on, else called as it is; eager
    at a shape where set-up measured eager faster (`choosing`). A kernel that fails to compile (an op this
    torch's compiler does not take, say) runs eager from then on, with one warning, and is listed in
    `failed`; an error that eager raises too still surfaces. The first argument is a tensor. `eager`, where
    given, is the eager form instead of `fn`: the same result in the ops eager PyTorch runs fastest, where the
    form that compiles best (one expression, a fresh result) makes eager extra passes.

    Compiled, a half-precision op's result stays in float32 for the next op unless `exact`: then it is
    rounded where eager rounds it (inductor's `emulate_precision_casts`), for a kernel whose callers rely on
    the very values it returns. Not for every kernel: SiLU·up took 0.87 against 0.70 ms (VM, 1B shape, 512
    tokens, float16). `unused` names arguments, not tensors, that only the eager form reads: one kernel is built
    whatever their values."""
    if fn is None:
        return functools.partial(tee_kernel, exact=exact, eager=eager, unused=unused)
    compiled: Built | None = None
    eager_form = eager or fn

    @functools.wraps(fn)
    def call(*args):
        nonlocal compiled
        if not _state["on"] or fn.__name__ in failed:
            return eager_form(*args)
        if _state["chosen"] and not _state["choosing"]:
            form = _form_at.get(_layout(fn, args[0]))
            if form is not None:
                return eager_form(*args) if form == EAGER else on_one_thread(eager_form, args)
        try:
            if compiled is None:
                compiled = Built(fn, {"emulate_precision_casts": True} if exact else None, unused)
            return _choose(fn, eager_form, compiled, args) if _state["choosing"] else compiled(*args)
        except Exception as e:  # compiling happens before any write, so the eager call starts afresh
            failed[fn.__name__] = first_line(e)
            print(f"warning: the TEE kernel {fn.__name__} runs eager: {failed[fn.__name__]}", file=sys.stderr)
            return eager_form(*args)

    call.eager = eager_form
    return call


class Built:
    """`fn` compiled by inductor once for each layout of its arguments it is called with, without TorchDynamo:
    traced to ATen ops (`make_fx`, on fake tensors, so nothing runs) with every argument that is not a tensor as a
    constant, and called with its tensors alone. A call then costs the host a lookup of its arguments' layouts,
    where `torch.compile`'s evaluated the frame, checked its guards and ran its wrappers: an RMSNorm over 8 x 64
    on one thread of the 2-core VM took 6.9 µs a call so, against 15.4-16.2 through `torch.compile` (7.4 against
    12.1 under torch 2.11) and 6.8 eager. The trace keeps PyTorch's own ops (`pre_dispatch`): decomposed first,
    a reshape traced as a view of a tensor written through `out=` failed to compile once that write was made
    functional. Inductor's cache of built graphs serves it across processes (the fake tensors carry a shape
    environment, without which the cache is bypassed). The arguments are tensors, numbers, None and other
    hashable constants, and tuples or lists of them; tensors passed to one kernel share no memory (the engine
    passes none that do). An option `torch._inductor` does not take fails at the first build."""

    # every live kernel's, so that `select` can drop what was built for another thread count (weak: a probe's
    # one-off kernel goes with its last reference)
    all: weakref.WeakSet[Built] = weakref.WeakSet()

    def __init__(self, fn: Callable, options: dict | None = None, unused: tuple[str, ...] = ()):
        """`unused`: the names of `fn`'s arguments it does not read, left out of the layouts' key."""
        self.fn, self.options = fn, options
        names = list(inspect.signature(fn).parameters)
        self.unused = {names.index(name) for name in unused}
        self.layouts: dict[tuple, Callable] = {}
        Built.all.add(self)

    def __call__(self, *args):
        tensors, key = [], []
        _flatten(args if not self.unused else [None if i in self.unused else x for i, x in enumerate(args)],
                 tensors, key)
        compiled = self.layouts.get(key := tuple(key))
        if compiled is None:
            compiled = self.layouts[key] = self._build(args, tensors)
        return compiled(*tensors)

    def _build(self, args: tuple, tensors: list[torch.Tensor]) -> Callable:
        def with_tensors(*given: torch.Tensor):
            return self.fn(*_rebuilt(args, iter(given)))

        import torch._inductor  # here: eager runs never load the compiler
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv
        # fake tensors of static shapes under a shape environment: inductor's cache of built graphs takes those
        fake_mode = FakeTensorMode(shape_env=ShapeEnv())
        fakes = [fake_mode.from_tensor(t, static_shapes=True) for t in tensors]
        with fake_mode:
            graph = make_fx(with_tensors, pre_dispatch=True)(*fakes)
        _state["builds"] += 1
        # the thread count the kernel's loops are built for, in its options: they are part of the key of inductor's
        # cache of built graphs, and torch 2.11's key lacks the count, so that a graph built at one count was served
        # from the cache at another (a kernel built on one thread ran on one thread at any count)
        return torch._inductor.compile(graph, fakes, options={**(self.options or {}),
                                                              "cpp.threads": torch.get_num_threads()})


def _flatten(args, tensors: list[torch.Tensor], key: list) -> None:
    """args' tensors in order into `tensors`, and into `key` each tensor's layout and every other value as it is (a
    bound method as its function and object)."""
    for x in args:
        if isinstance(x, torch.Tensor):
            tensors.append(x)
            key.append((x.shape, x.stride(), x.dtype))
        elif isinstance(x, (tuple, list)):
            key.append((type(x), len(x)))
            _flatten(x, tensors, key)
        elif isinstance(x, types.MethodType):  # bound methods compare their objects by identity, not value
            key.append((x.__func__, x.__self__))
        else:
            key.append(x)


def _rebuilt(args, given: Iterator[torch.Tensor]) -> tuple:
    """args with each tensor replaced by the next of `given` (the inverse of `_flatten`)."""
    return tuple(next(given) if isinstance(x, torch.Tensor) else
                 type(x)(_rebuilt(x, given)) if isinstance(x, (tuple, list)) else x for x in args)


def builds() -> int:
    """How many kernels (a kernel at one layout each) were built in this process: none may be left for an
    inference after set-up."""
    return _state["builds"]


@functools.cache
def fused(body: Callable, op: Callable, exact: bool = False) -> Callable:
    """`body(form, op, *args)` as one TEE kernel, named after both: a chain of kernels and `op` between them, each
    called as `form(kernel)(...)` (`op(form, ...)` calls its own that way). Compiled, every kernel in the chain is
    its own body (what it compiles alone), so that the compiler fuses the whole chain into one call; eager (and
    where set-up measured the chain faster), each kernel runs in the form chosen for it, as it does outside the
    chain. `exact` as `tee_kernel`'s, for a chain that ends in a kernel that must round where eager does."""
    def chain(*args):
        return body(_body, op, *args)

    def each(*args):
        return body(as_chosen, op, *args)

    chain.__name__ = each.__name__ = f"{body.__name__.strip('_')}_{op.__name__.strip('_')}"
    return tee_kernel(chain, eager=each, exact=exact)


def _body(kernel: Callable) -> Callable:
    return kernel.__wrapped__


def as_chosen(kernel: Callable) -> Callable:
    """A kernel as it is, running in the form chosen for it: a chain's eager form calls its kernels so."""
    return kernel


@contextmanager
def choosing(on: bool = True) -> Iterator[None]:
    """Inside (set-up, on zeros of the inference's shapes: `SplitLlama.warm_kernels`), each compiled kernel
    call is also timed against the kernel's eager form on the same arguments, and the faster is kept for
    that shape. The calls repeat, so arguments a kernel writes in place must not matter (zeros). With `on`
    false (inside a choice's timing), kernels run in the forms chosen for them, and none is chosen again."""
    was, _state["choosing"] = _state["choosing"], on
    try:
        yield
    finally:
        _state["choosing"] = was


def choosing_now() -> bool:
    """Whether kernels are being chosen (inside `choosing`: set-up)."""
    return _state["choosing"]


def _choose(fn: Callable, eager: Callable, compiled: Built, args: tuple):
    """Build `compiled` (kernel `fn`), time it, `eager`, and with more than one torch thread `eager` on one
    thread (`on_one_thread`), on `args` (`timed`); keep the fastest for this shape; its result."""
    compiled(*args)
    key = _layout(fn, args[0])
    forms = {EAGER: lambda: eager(*args), COMPILED: lambda: compiled(*args)}
    if torch.get_num_threads() > 1:
        forms[ONE_THREAD] = lambda: on_one_thread(eager, args)
    times = _timed_forms(forms)
    choices[key] = {f"{_FORM_KEYS[form]}_ms": ms for form, ms in times.items()}
    fastest = min(times, key=times.get)
    if fastest == COMPILED:
        _form_at.pop(key, None)
    else:
        _form_at[key] = fastest
    with choosing(False):
        return forms[fastest]()


def _timed_forms(forms: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Each form (a call of no arguments) timed (`timed`), with every kernel inside it in the form chosen for
    it, and none chosen again: form -> ms."""
    with choosing(False):
        return {name: timed(lambda _, form=form: form(), repeat=7) for name, form in forms.items()}


_FORM_KEYS = {EAGER: "eager", COMPILED: "compiled", ONE_THREAD: "eager_one_thread"}


def on_one_thread(fn: Callable, args: tuple):
    """fn(*args) with torch's thread count set to one for the call: a small op then wakes none of the other
    threads. On the H100 machine a TEE op at 128 tokens took 184-248 µs on 16 threads (tenth round), where
    the 2-core VM's two take 76-273 µs. Setting the count twice took 0.16 µs on the VM. Compiled kernels keep
    the count they were built with, so only eager forms are run so."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def first_line(e: Exception) -> str:
    """An exception's first line, at most 200 characters (its type's name where it has no message)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def pick(step: str, t: torch.Tensor, forms: dict[str, Callable[[], object]]) -> str:
    """While `choosing` (set-up): each of a step's forms (calls of no arguments, on zeros of the inference's
    shapes) once as the inference would run it, so that the kernels inside are built and chosen, then each
    timed (`timed`), and the fastest kept for the step at `t`'s shape and dtype; a form that raises is left
    out, with a warning. Returns the form in force there (`picked`), one of `forms`: the first where the one
    picked is not among them."""
    if _state["choosing"]:
        working = {}
        for name, form in forms.items():
            try:
                form()
                working[name] = form
            except RuntimeError as e:  # an op this torch or CPU lacks: the form is left out, with a warning
                print(f"warning: {step}'s {name} form is left out: {first_line(e)}", file=sys.stderr)
        times = _timed_forms(working)
        if times:
            picks[(step, tuple(t.shape), t.dtype)] = {**{f"{name}_ms": ms for name, ms in times.items()},
                                                      "runs": min(times, key=times.get)}
    form = picked(step, t, next(iter(forms)))
    return form if form in forms else next(iter(forms))


def picked(step: str, t: torch.Tensor, default: str) -> str:
    """The form of `step` kept for `t`'s shape and dtype (`pick`), where forms are chosen per shape (compiled kernels
    chosen per shape, or the C++ kernels beside eager ones: `picking`); else `default`."""
    if not picking():
        return default
    return str(picks.get((step, tuple(t.shape), t.dtype), {}).get("runs", default))


def _layout(fn: Callable, t: torch.Tensor) -> Layout:
    return fn.__name__, tuple(t.shape), t.stride()


def chosen() -> dict[str, dict[str, float | str]]:
    """`choices` for the JSON: "kernel [shape]" (and its strides where they are not a contiguous tensor's) ->
    the times and which form runs there; and `picks`: "step [shape] dtype" -> each form's time and which runs."""
    def label(name: str, shape: tuple[int, ...], strides: tuple[int, ...]) -> str:
        contiguous = torch.empty(shape, device="meta").stride()
        return f"{name} {list(shape)}" + ("" if strides == contiguous else f" strides {list(strides)}")

    kernels = {label(*key): {**ms, "runs": _form_at.get(key, "compiled")} for key, ms in choices.items()}
    steps = {f"{step} {list(shape)} {str(dtype).removeprefix('torch.')}": times
             for (step, shape, dtype), times in picks.items()}
    return {**kernels, **steps}


def timed(step: Callable[[object], object], fresh: Callable[[], object] = lambda: None, repeat: int = 30,
          wait_s: float = WAIT_S) -> float:
    """Median ms of `step(fresh())` over `repeat` calls, each after a busy-wait of `wait_s` (`fresh` is
    untimed), after three untimed calls."""
    def once() -> float:
        arg = fresh()
        start = time.perf_counter()
        while time.perf_counter() - start < wait_s:
            pass
        start = time.perf_counter()
        step(arg)
        return time.perf_counter() - start

    for _ in range(3):
        once()
    return statistics.median(once() for _ in range(repeat)) * 1e3


def select(compiled: bool, chosen: bool = True, cpp: bool = False) -> str:
    """Switch the process's TEE kernels to compiled (when `compiled` and a compiler works) or eager, with
    the eager form where set-up measured it faster (`chosen`; else compiled at every shape); eager with `cpp`, the
    C++ kernels (`native`) are forms of their steps too, picked per shape in set-up (`CPP`), as they are beside
    compiled kernels; returns the mode now in force, for the JSON. The first switch on compiles a probe, so a
    missing compiler shows here, not in the middle of an inference; its milliseconds are `start_ms()`. A changed
    torch thread count drops compiled code, whose parallel loops keep the count they were built with."""
    if compiled and _state["failure"] is None:
        if _state["threads"] not in (None, torch.get_num_threads()):
            for kernel in Built.all:
                kernel.layouts.clear()
            choices.clear()  # timed at the old count
            _form_at.clear()
            picks.clear()
        _state["threads"] = torch.get_num_threads()
        if _state["mode"] != COMPILED:
            start = time.perf_counter()
            _state["failure"] = _probe()
            _state["start_ms"] = _state["start_ms"] or (time.perf_counter() - start) * 1e3
            if _state["failure"] is not None:
                print(f"warning: the TEE's kernels run eager: compiling failed ({_state['failure']})",
                      file=sys.stderr)
    _state["on"] = compiled and _state["failure"] is None
    _state["cpp"] = cpp and not compiled
    _state["chosen"] = chosen
    _state["mode"] = (COMPILED if _state["on"] else CPP if _state["cpp"] else
                      EAGER + (f" (compile failed: {_state['failure']})" if compiled and _state["failure"] else ""))
    return _state["mode"]


def on() -> bool:
    """Whether the process's TEE kernels are compiled (`select`)."""
    return _state["on"]


def cpp_offered() -> bool:
    """Whether `native`'s C++ kernels are among their steps' forms: beside compiled kernels, or eager ones (`CPP`)."""
    return _state["on"] or _state["cpp"]


def picking() -> bool:
    """Whether steps run in the form set-up picked at each shape (`pick`): compiled kernels chosen per shape, or
    `CPP`."""
    return (_state["on"] and _state["chosen"]) or _state["cpp"]


def vector_isa(mode: str = COMPILED) -> str | None:
    """The vector instruction set inductor builds the TEE's kernels for (e.g. 'avx512'; 'none' where its checks
    found none, and the kernels are scalar code), once the compiler has started in this process and works, for
    an engine whose kernels run in `mode` (its `kernels`); else None (an eager engine's are not built; asking
    before the compiler starts would run inductor's checks, seconds of test builds). On the H100 machine a
    compiled RMSNorm over 128 × 2048 took 35-47 µs in two rounds' set-up and 142-239 µs in the twenty-seventh
    round's kernel_bench: whether its kernels were vectorised is what this records."""
    if mode != COMPILED or not _state["start_ms"] or _state["failure"] is not None:
        return None
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa
        isa = pick_vec_isa()
    except Exception:  # a torch without the module, or checks that fail: the JSON says so rather than the run failing
        return "unknown"
    return str(isa) if isa else "none"


def start_ms() -> float:
    """Milliseconds the compiler's first start in this process took (the probe of `select`; 0 before it)."""
    return _state["start_ms"]


def _probe() -> str | None:
    """None if a small kernel compiles and gives the right answer, else why not (one line)."""
    import torch._inductor.config as inductor
    if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        # Build in this process. Where triton is installed, inductor otherwise starts a pool of one worker
        # process per core at the first compile, each importing torch. The TEE's kernels are small and built
        # one at a time, so the pool has nothing to do in parallel.
        inductor.compile_threads = 1
    # Take the vector instruction sets from the CPU's flags instead of test-building each one: inductor loads
    # each test build in a fresh Python, which older torch (the GPU machine's 2.11) makes import torch. The
    # probe below builds with the chosen set; if that fails, the tests return as torch has them.
    trusted = inductor.cpp.vec_isa_ok is None
    if trusted:
        inductor.cpp.vec_isa_ok = True
    with _isa_checks_without_torch() if trusted else nullcontext():
        failure = _build_probe()
    if failure is not None and trusted:
        inductor.cpp.vec_isa_ok = None
        isa_list = getattr(getattr(torch._inductor, "cpu_vec_isa", None), "valid_vec_isa_list", None)
        if hasattr(isa_list, "cache_clear"):
            isa_list.cache_clear()
        failure = _build_probe()
    return failure


@contextmanager
def _isa_checks_without_torch() -> Iterator[None]:
    """Inside, inductor's own instruction-set checks load their test builds in a fresh Python that does not
    import torch, with torch's libraries on the loader's path instead (what torch 2.13's check does itself,
    where this changes nothing). `vec_isa_ok` skips only the base check: torch 2.11 still test-builds AVX-512
    with BF16 and VNNI, and AMX, and imports torch for each load (three on the 2-core VM, 1.3 s each with the
    CUDA build; the GPU machine's CPU has AMX too)."""
    try:
        from torch._inductor.cpu_vec_isa import VecISA
    except ImportError:  # a torch without the module
        VecISA = None
    script = getattr(VecISA, "_avx_py_load", None)
    if not isinstance(script, str) or "\nimport torch\n" not in script:
        yield
        return
    saved = os.environ.get("LD_LIBRARY_PATH")
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(
        [os.path.join(os.path.dirname(torch.__file__), "lib"), *([saved] if saved else [])])
    VecISA._avx_py_load = script.replace("\nimport torch\n", "\n")
    try:
        yield
    finally:
        VecISA._avx_py_load = script
        if saved is None:
            os.environ.pop("LD_LIBRARY_PATH", None)
        else:
            os.environ["LD_LIBRARY_PATH"] = saved


def _build_probe() -> str | None:
    """None if a small kernel compiles and computes the right answer, else why not (one line)."""
    try:
        x = torch.arange(8, dtype=torch.float32)
        if not torch.equal(Built(lambda t: t * 2 + 1)(x), x * 2 + 1):
            return "a probe kernel computed a wrong answer"
    except Exception as e:  # a missing compiler surfaces as any of several exception types
        return (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
    return None
