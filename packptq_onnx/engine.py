"""Where independent jobs run: Ray tasks when Ray is installed (a local cluster started in-process,
or an existing one at --address), otherwise one process after another. Used by `packptq sweep`,
by the sensitivity measurement with --workers, and by bench/run.py.

A job is a `Call`: a function named "module:function", called with a JSON-able payload in a fresh
worker process, returning a JSON-able dict. The engine writes that dict to the call's result file
(atomically), so a rerun skips calls whose result exists with the same key (resume). A worker that
dies (killed, out of memory) is retried up to `retries` times; an exception in the function is not
retried: it is recorded as {"status": "failed", "error": one line} and the other jobs go on.
The design: docs/METHOD.md, "Sweeps and parallel sensitivity".
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

from .errors import UsageError

CRASH_ONCE = "PACKPTQ_TEST_CRASH_ONCE"  # tests: a folder; the first job to start there exits its worker


@dataclass
class Call:
    id: str
    fn: str                     # "module:function", called as fn(payload) -> dict
    payload: dict
    result: str                 # result JSON written by the engine
    log: str                    # the job's stdout and stderr
    key: str = ""               # what the result depends on: a cached result with another key runs again
    cpus: float = 1.0
    gpus: float = 0.0
    sys_path: list = field(default_factory=list)  # folders the function's module is imported from


def one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0][:300] if msg else ''}".rstrip(": ")


def cached(call: Call, retry_failed: bool = False) -> dict | None:
    """The call's stored result when it can stand: same key, and ok (or failed, unless retry_failed)."""
    try:
        with open(call.result) as f:
            res = json.load(f)
    except (OSError, ValueError):
        return None
    if res.get("key") != call.key or (res.get("status") != "ok" and retry_failed):
        return None
    return res


def invoke(call: dict, shared=None) -> dict:
    """Run one call here, output into its log; what a worker runs. Never raises for the job's own errors."""
    threads = max(1, int(call["cpus"]))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.makedirs(os.path.dirname(os.path.abspath(call["log"])), exist_ok=True)
    t0 = time.time()
    with open(call["log"], "a") as log, _redirect(log):
        marker = os.environ.get(CRASH_ONCE)
        if marker:
            _crash_once(marker)
        try:
            if "torch" in sys.modules:
                sys.modules["torch"].set_num_threads(threads)
            for p in call["sys_path"]:
                if p not in sys.path:
                    sys.path.insert(0, p)
            mod, _, name = call["fn"].partition(":")
            fn = getattr(importlib.import_module(mod), name)
            if shared is not None:  # pickled bytes (Ray) or a pickle's path, opened once fn's module is
                if call.get("shared_file"):  # imported (it imports what the object's classes need)
                    with open(shared, "rb") as f:
                        shared = f.read()
                shared = pickle.loads(shared)
            res = dict(fn(call["payload"]) if shared is None else fn(call["payload"], shared))
            res.setdefault("status", "ok")
        except BaseException as exc:  # the job's failure, recorded; the sweep goes on
            import traceback

            traceback.print_exc()
            res = {"status": "failed", "error": one_line(exc), "exit_code": getattr(exc, "exit_code", 1)}
    res["worker_seconds"] = round(time.time() - t0, 2)
    res["worker_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    res["worker_pid"] = os.getpid()
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():  # in a Ray worker: which node ran it
        res["worker_node"] = sys.modules["ray"].get_runtime_context().get_node_id()
    return res


@contextlib.contextmanager
def _redirect(log):
    """stdout and stderr of this process, Python's and the C libraries', into the job's log."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        log.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def _crash_once(folder: str) -> None:
    try:
        fd = os.open(os.path.join(folder, "crashed"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(17)


def have_ray() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


RAY_HINT = "pip install 'packptq-onnx[ray]' runs them in parallel on Ray"


class Engine:
    """Runs calls: `ray` (local cluster of `workers` CPUs, or the cluster at `address`) or `process`."""

    def __init__(self, backend: str = "auto", workers: int | None = None, address: str | None = None,
                 retries: int = 1, timeout: float | None = None, log=print):
        ray = have_ray()
        if backend == "auto":
            backend = "ray" if ray else "process"
        if backend == "ray" and not ray:
            raise UsageError(f"Ray is not installed: {RAY_HINT}, or leave out --address")
        if workers is not None and workers < 1:
            raise UsageError("--workers must be at least 1")
        self.backend, self.workers, self.address = backend, workers, address
        self.retries, self.timeout, self.log = retries, timeout, log
        self._started = False
        self._scratch = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False
        if self._scratch:
            import shutil

            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def scratch(self) -> str:
        """The folder jobs run in. Not the caller's: Python (and Ray, for its workers) puts the working
        folder first on the import path, where a source checkout's packptq_onnx would shadow the
        installed package. Jobs get absolute paths."""
        if self._scratch is None:
            self._scratch = tempfile.mkdtemp(prefix="packptq-jobs-")
        return self._scratch

    def _ray(self):
        import ray

        if not ray.is_initialized():
            kw = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            here = os.getcwd()
            os.chdir(self.scratch())  # the folder Ray gives its workers (see scratch)
            try:
                if self.address:
                    ray.init(address=self.address, **kw)
                else:
                    ray.init(num_cpus=self.workers or os.cpu_count(), **kw)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise UsageError(f"cannot start or join the Ray cluster"
                                 f"{' at ' + self.address if self.address else ''}: {one_line(exc)}") from None
            finally:
                os.chdir(here)
            self._started = True
            cpus = ray.cluster_resources().get("CPU", 0)
            self.log(f"Ray cluster: {cpus:g} CPUs on {len(ray.nodes())} node(s)")
        return ray

    def cpus(self) -> int:
        """CPUs of the cluster (Ray), or of this machine."""
        if self.backend != "ray":
            return os.cpu_count() or 1
        return int(self._ray().cluster_resources().get("CPU", 1))

    def run(self, calls: list[Call], retry_failed: bool = False, on_done=None, shared=None, reuse: bool = True) -> dict:
        """{call id: result}; results already stored are reused (unless reuse=False: the caller chose
        these calls to run). on_done(call, result, cached) after each. shared: one object every
        call's function gets as its second argument (sent once)."""
        out, todo = {}, []
        for c in calls:
            res = cached(c, retry_failed) if reuse else None
            if res is not None:
                out[c.id] = res
                if on_done:
                    on_done(c, res, True)
            else:
                todo.append(c)
        if todo:
            runner = self._run_ray if self.backend == "ray" else self._run_processes
            for c, res in runner(todo, shared):
                res["key"] = c.key
                res["id"] = c.id
                from .exporters.files import save_json

                os.makedirs(os.path.dirname(os.path.abspath(c.result)), exist_ok=True)
                save_json(res, c.result)
                out[c.id] = res
                if on_done:
                    on_done(c, res, False)
        return out

    def _run_ray(self, calls, shared):
        """Calls submitted while the cluster has CPUs for them, so a call's clock (timeout) starts
        about when it starts; results as they finish."""
        ray = self._ray()
        remote = ray.remote(max_calls=1)(invoke)  # a fresh process per job: no state left between jobs
        obj = None if shared is None else ray.put(pickle.dumps(shared))
        total = ray.cluster_resources().get("CPU", 1)
        queue, refs = list(calls), {}
        while queue or refs:
            while queue and (not refs or sum(c.cpus for c, _ in refs.values()) + queue[0].cpus <= total):
                c = queue.pop(0)
                opts = dict(num_cpus=c.cpus, num_gpus=c.gpus, max_retries=self.retries)
                refs[remote.options(**opts).remote(asdict(c), obj)] = (c, time.time())
            done, _ = ray.wait(list(refs), num_returns=1, timeout=5.0)
            for ref in done:
                c, _ = refs.pop(ref)
                try:
                    res = ray.get(ref)
                except Exception as exc:  # the worker died more often than retries allow
                    res = {"status": "failed", "error": f"worker lost {self.retries + 1} time(s): {one_line(exc)}"}
                yield c, res
            if self.timeout:
                for ref, (c, t0) in list(refs.items()):
                    if time.time() - t0 > self.timeout:
                        ray.cancel(ref, force=True)
                        refs.pop(ref)
                        yield c, {"status": "failed", "error": f"timed out after {self.timeout:.0f} s"}

    def _run_processes(self, calls, shared):
        with tempfile.TemporaryDirectory(prefix="packptq-engine-") as d:
            path = None
            if shared is not None:
                path = os.path.join(d, "shared.pkl")
                with open(path, "wb") as f:
                    pickle.dump(shared, f)
            for c in calls:
                res = None
                why = ""
                for _ in range(self.retries + 1):
                    res, why = _in_process(c, self.timeout, path, self.scratch())
                    if res is not None:
                        break
                yield c, res or {"status": "failed", "error": f"worker lost {self.retries + 1} time(s): "
                                                             f"the process died without a result{why}"}


def _in_process(c: Call, timeout: float | None, shared_path: str | None, cwd: str) -> tuple[dict | None, str]:
    """One call in a child process: (result, "") or, when the child died without writing its
    result, (None, its last line of stderr)."""
    from .exporters.files import temp_beside

    os.makedirs(os.path.dirname(os.path.abspath(c.result)), exist_ok=True)
    tmp = temp_beside(c.result, ".json")
    call = dict(asdict(c), shared_file=shared_path is not None)
    cmd = [sys.executable, "-m", "packptq_onnx.engine", json.dumps(call), tmp, shared_path or ""]
    try:
        p = subprocess.run(cmd, timeout=timeout, stdin=subprocess.DEVNULL, capture_output=True, cwd=cwd)
        with open(tmp) as f:
            text = f.read()
        if p.returncode != 0 or not text:
            last = [x for x in p.stderr.decode(errors="replace").splitlines() if x.strip()]
            return None, f" ({last[-1].strip()[:200]})" if last else ""
        return json.loads(text), ""
    except subprocess.TimeoutExpired:
        return {"status": "failed", "error": f"timed out after {timeout:.0f} s"}, ""
    finally:
        os.unlink(tmp)


def _child(argv) -> int:
    call, result = json.loads(argv[0]), argv[1]
    res = invoke(call, argv[2] if len(argv) > 2 and argv[2] else None)
    with open(result, "w") as f:
        json.dump(res, f, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
