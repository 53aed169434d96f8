"""Training jobs: queued in the database, run one at a time in a separate process.

:class:`JobManager` (one per service, ``service.jobs``) takes a request (:class:`JobRequest`),
checks it (the dataset must be registered in ``settings.datasets`` or be ``"recordings"``,
the service's own labelled recordings; a ``data`` folder override must lie inside one of those
folders; the base model must be served) and stores a ``training_jobs`` row in state
``queued``. A worker thread claims the oldest queued job when none is running and starts

    python -m csi_cloud.job_runner JOB_DIR/job.json

in its own session (process group): a crash, a memory blow-up or a hang of the training
cannot take the service down, and the API stays responsive. The child reports progress,
log lines and the result as JSON lines on stdout (``@job {...}``); everything else it prints
is kept as log. The row's ``progress``, ``log`` (the last lines, bounded), ``metrics``,
``bundle`` and ``error`` are updated as the job runs.

The child writes the bundle into ``JOB_DIR/bundle/NAME`` (never into the models folder). Only
when it exits 0, and the bundle loads and verifies, is it moved into ``settings.models``
(copied under a hidden name without ``bundle.json``, renamed, then ``bundle.json`` written
last, so a concurrent registry scan never sees half a bundle) and
``registry.refresh()`` picks it up; with ``activate`` it is then made the active model. A
failed job (bad data, an exception, a non-zero exit, a timeout, the service stopping) is
marked ``failed`` with the error and leaves the served models untouched.

``base_model`` is recorded with the job and in the new bundle's ``training`` section; the new
bundle is trained from scratch (the pipeline has no warm start), so it is checked against
the base model's input spec: ``compatible_with_base`` in the metrics, and ``activate`` is
refused for a bundle that takes another kind of CSI.

The child process is :mod:`csi_cloud.job_runner` (what it does for each ``mode``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select, update

from csi_edge.bundle import MANIFEST_FILE, write_manifest

from .db import Database, TrainingJob
from .job_runner import EVENT_PREFIX
from .registry import ModelRegistry, UnknownModelError
from .settings import CloudSettings

__all__ = [
    "RECORDINGS",
    "JobManager",
    "JobRequest",
    "JobRequestError",
    "StreamRange",
    "job_dict",
]

log = logging.getLogger("csi_cloud.jobs")

RECORDINGS = "recordings"
LOG_LINES = 200
LOG_LINE_CHARS = 400
LOG_CHARS = 32_000
_UPDATE_EVERY_S = 0.5
_STATES = ("queued", "running", "succeeded", "failed")


class StreamRange(BaseModel):
    """A time range of one AP's recorded stream."""

    model_config = ConfigDict(extra="forbid")

    site: str = Field(min_length=1, max_length=64, pattern=r"^[^/+#$\x00][^/+#\x00]*$")
    ap: str = Field(min_length=1, max_length=64, pattern=r"^[^/+#$\x00][^/+#\x00]*$")
    start: float = Field(ge=0, allow_inf_nan=False, description="Unix s")
    end: float = Field(gt=0, allow_inf_nan=False, description="Unix s, exclusive")


class JobRequest(BaseModel):
    """What ``POST /training-jobs`` accepts.

    ``mode``: ``train`` a new bundle from scratch; ``adapt`` the base model's cloud-side
    classifier to ``shots`` labelled recordings per activity (a derived bundle: same edge
    part, APs keep streaming); ``enroll`` a new ``identity`` from ``ranges`` of recorded
    streams (``POST /identities`` queues these).
    """

    model_config = ConfigDict(extra="forbid")

    mode: Literal["train", "adapt", "enroll"] = Field(default="train")
    shots: int | None = Field(default=None, ge=1, le=1000,
                              description="adapt: labelled recordings per activity")
    self_train: bool = Field(default=False,
                             description="adapt, dataset recordings: then one round of "
                                         "self-training on the recorded stream outside the "
                                         "labelled ranges of the labelled APs, dropped "
                                         "where a cross-validation on the labelled examples "
                                         "says it does harm (needs 2 per activity)")
    identity: str | None = Field(default=None, min_length=1, max_length=64,
                                 pattern=r"^[^\x00-\x1f\x7f]+$",
                                 description="enroll: the new person's name")
    ranges: list[StreamRange] | None = Field(default=None, max_length=1000,
                                             description="enroll: where the person is")

    dataset: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$",
                         description="a dataset registered in the service settings "
                                     "(`datasets`), or \"recordings\": the service's own "
                                     "labelled recordings")
    data: str | None = Field(default=None, max_length=1024,
                             description="a sub-folder to train on instead; relative paths "
                                         "are taken from the dataset's folder; must lie inside "
                                         "a registered dataset folder or the recordings folder")
    base_model: str | None = Field(default=None, max_length=64,
                                   description="bundle id, id prefix or name the new bundle "
                                               "must be compatible with [the active model]")
    epochs: int = Field(default=20, ge=1, le=300, description="maximum epochs")
    max_recordings: int | None = Field(default=None, ge=2, le=100_000,
                                       description="train on at most this many recordings, "
                                                   "spread over the classes [all]")
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="split and training seed")
    activate: bool = Field(default=False, description="make the new bundle active on success")


class JobRequestError(ValueError):
    """The request cannot be run (unknown dataset, folder outside the allowed roots, ...)."""


def job_dict(row: TrainingJob) -> dict[str, Any]:
    """A job row as the API shows it (internal request keys, starting with ``_``, left out)."""
    return {"id": row.id, "state": row.state, "created": row.created, "started": row.started,
            "finished": row.finished,
            "request": {k: v for k, v in (row.request or {}).items() if not k.startswith("_")},
            "progress": row.progress, "log": row.log or "", "metrics": row.metrics,
            "bundle": row.bundle, "error": row.error}


def _dataset_kind(name: str) -> str:
    """The registry dataset behind a settings name: ``fition``, or ``fition:anything``."""
    from .datasets import UnknownDatasetError, get_dataset

    for candidate in (name, name.split(":", 1)[0]):
        try:
            return get_dataset(candidate).name
        except UnknownDatasetError:
            continue
    raise JobRequestError(f"dataset {name!r} is not a known dataset kind (name a settings "
                          f"dataset after one, e.g. 'fition' or 'fition:small')")


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


class JobManager:
    """Queue and run training jobs (see the module docstring). Thread-safe."""

    def __init__(self, settings: CloudSettings, db: Database, registry: ModelRegistry, *,
                 active_model: Callable[[], str] | None = None,
                 activate: Callable[[str], Coroutine[Any, Any, list[str]]] | None = None,
                 threads: int | None = None, timeout_s: float = 6 * 3600,
                 poll_s: float = 2.0) -> None:
        self.settings = settings
        self.db = db
        self.registry = registry
        self._active_model = active_model
        self._activate = activate
        self.threads = threads or max(1, (os.cpu_count() or 2) // 2)
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._proc: subprocess.Popen[str] | None = None
        self._proc_lock = threading.Lock()

    # -- lifecycle --

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Fail jobs a dead worker left running, then start the worker thread."""
        self._loop = loop
        self._recover()
        self._stop.clear()
        self._thread = threading.Thread(target=self._worker, name="training jobs", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the worker; a running job's process is terminated and the job failed."""
        self._stop.set()
        self._wake.set()
        self._terminate()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # -- requests --

    def resolve(self, request: JobRequest) -> dict[str, Any]:
        """Check a request; the stored form (``_`` keys are internal)."""
        s = self.settings
        recordings_root = Path(os.path.abspath(s.recordings))
        roots = {name: Path(os.path.abspath(p)) for name, p in s.datasets.items()}
        if request.dataset == RECORDINGS and RECORDINGS not in roots:
            kind, root = RECORDINGS, recordings_root
        elif request.dataset in roots:
            kind, root = _dataset_kind(request.dataset), roots[request.dataset]
        else:
            known = sorted({*roots, RECORDINGS})
            raise JobRequestError(f"unknown dataset {request.dataset!r}; registered: "
                                  f"{', '.join(known)}")
        if request.data is not None:
            given = Path(request.data)
            folder = (given if given.is_absolute() else root / given).resolve()
            allowed = [p.resolve() for p in (*roots.values(), recordings_root)]
            if not any(_inside(folder, r) for r in allowed):
                raise JobRequestError(f"data folder {request.data!r} is not inside a registered "
                                      f"dataset folder or the recordings folder")
        else:
            folder = root.resolve()
        if not folder.is_dir():
            what = "recordings folder" if kind == RECORDINGS else "dataset folder"
            raise JobRequestError(f"{what} for {request.dataset!r} does not exist"
                                  + (f" ({request.data!r})" if request.data else ""))
        base = request.base_model
        if base is None and self._active_model is not None:
            base = self._active_model()
        base_id = None
        if base is not None:
            try:
                base_id = self.registry.get(base).id
            except UnknownModelError:
                raise JobRequestError(f"no served model {base!r}") from None
        extra: dict[str, Any] = {}
        if request.self_train and request.mode != "adapt":
            raise JobRequestError(f"self_train is for mode 'adapt', not {request.mode!r}")
        if request.mode != "train":
            extra = self._derive_checks(request, base_id, kind)
        return {**request.model_dump(), "base_model": base_id, "kind": kind,
                "_data_dir": str(folder), **extra}

    def _derive_checks(self, request: JobRequest, base_id: str | None,
                       kind: str) -> dict[str, Any]:
        """Checks of the jobs that derive a bundle from a served one (adapt, enroll)."""
        if base_id is None:
            raise JobRequestError(f"mode {request.mode!r} needs a base model")
        manifest = self.registry.get(base_id).manifest
        extra = {"_base_folder": str(self.registry.folder_of(base_id)),
                 "_base_name": manifest.name}
        if request.mode == "adapt":
            if request.shots is None:
                raise JobRequestError("mode 'adapt' needs shots (labelled recordings per "
                                      "activity)")
            if request.self_train and kind != RECORDINGS:
                raise JobRequestError(f"self_train reads the recorded stream outside the "
                                      f"labelled ranges: it needs dataset 'recordings', not "
                                      f"{request.dataset!r}")
            return extra
        identities = manifest.labels.get("identity") or []
        if not identities:
            raise JobRequestError(f"model {manifest.name!r} has no identity head to enroll in")
        if not request.identity or not request.ranges:
            raise JobRequestError("mode 'enroll' needs an identity and ranges")
        if request.identity in identities or request.identity == "unknown":
            raise JobRequestError(f"identity {request.identity!r} is already known to "
                                  f"{manifest.name!r} ({', '.join(identities)}) or reserved")
        if kind != RECORDINGS:
            raise JobRequestError("mode 'enroll' reads the service's own recordings "
                                  "(dataset 'recordings')")
        for r in request.ranges:
            if not r.start < r.end:
                raise JobRequestError(f"range {r.site}/{r.ap} {r.start}..{r.end}: start must "
                                      f"be before end")
        return extra

    def submit(self, request: JobRequest) -> dict[str, Any]:
        """Queue a job; returns it as :func:`job_dict` shows it."""
        stored = self.resolve(request)
        job_id = str(uuid.uuid4())
        with self.db.session.begin() as s:
            row = TrainingJob(id=job_id, state="queued", created=time.time(), request=stored,
                              progress=0.0, log="")
            s.add(row)
        self._wake.set()
        return self.get(job_id) or {}

    def get(self, job_id: str) -> dict[str, Any] | None:
        # Read by the HTTP API: its own connection pool, never ingest's.
        with self._read_session() as s:
            row = s.get(TrainingJob, job_id)
            return job_dict(row) if row is not None else None

    def _read_session(self) -> Any:
        factory = getattr(self.db, "api_session", None) or self.db.session
        return factory()

    def jobs(self, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        with self._read_session() as s:
            query = select(TrainingJob)
            if state is not None:
                query = query.where(TrainingJob.state == state)
            rows = s.scalars(query.order_by(TrainingJob.created.desc()).limit(limit)).all()
            return [job_dict(r) for r in rows]

    # -- the worker --

    def _worker(self) -> None:
        while not self._stop.is_set():
            try:
                claimed = self._claim()
            except Exception:
                log.exception("claiming a training job failed")
                claimed = None
            if claimed is None:
                self._wake.wait(self.poll_s)
                self._wake.clear()
                continue
            job_id, request = claimed
            try:
                self._run(job_id, request)
            except Exception as exc:  # a bug here must fail the job, not the worker
                log.exception("training job %s failed", job_id)
                with contextlib.suppress(Exception):
                    self._finish(job_id, "failed", error=f"internal error: {exc}")

    def _claim(self) -> tuple[str, dict[str, Any]] | None:
        with self.db.session.begin() as s:
            running = s.scalar(select(func.count()).select_from(TrainingJob)
                               .where(TrainingJob.state == "running"))
            if running:
                return None
            row = s.scalars(select(TrainingJob).where(TrainingJob.state == "queued")
                            .order_by(TrainingJob.created, TrainingJob.id).limit(1)).first()
            if row is None:
                return None
            claimed = s.execute(update(TrainingJob)
                                .where(TrainingJob.id == row.id, TrainingJob.state == "queued")
                                .values(state="running", started=time.time(), progress=0.0))
            if claimed.rowcount != 1:  # type: ignore[attr-defined]
                return None
            return row.id, dict(row.request)

    def _recover(self) -> None:
        with self.db.session.begin() as s:
            for row in s.scalars(select(TrainingJob).where(TrainingJob.state == "running")):
                if self._runner_alive(row.id):
                    continue  # another worker's job
                row.state, row.finished = "failed", time.time()
                row.error = "interrupted: the service running it stopped"
                self._cleanup(self._job_dir(row.id))

    def _job_dir(self, job_id: str) -> Path:
        return Path(os.path.abspath(self.settings.jobs_dir)) / job_id

    def _runner_alive(self, job_id: str) -> bool:
        try:
            pid = int((self._job_dir(job_id) / "runner.pid").read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return False
        return job_id.encode() in cmdline

    def _update(self, job_id: str, **values: Any) -> None:
        with self.db.session.begin() as s:
            row = s.get(TrainingJob, job_id)
            if row is not None:
                for k, v in values.items():
                    setattr(row, k, v)

    def _finish(self, job_id: str, state: str, **values: Any) -> None:
        self._update(job_id, state=state, finished=time.time(), **values)

    def _run(self, job_id: str, request: dict[str, Any]) -> None:
        work = self._job_dir(job_id)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        mode = request.get("mode", "train")
        name = {"train": f"{request['kind']}-{job_id[:8]}",
                "adapt": f"{request.get('_base_name')}-adapted-{job_id[:8]}",
                "enroll": f"{request.get('_base_name')}-enrolled-{job_id[:8]}"}[mode]
        staging = work / "bundle" / name
        spec = {"id": job_id, "kind": request["kind"], "data_dir": request["_data_dir"],
                "out": str(staging), "work": str(work), "epochs": request["epochs"],
                "max_recordings": request["max_recordings"], "seed": request["seed"],
                "threads": self.threads, "parent_pid": os.getpid(),
                "base_model": request.get("base_model"), "mode": mode,
                "base_folder": request.get("_base_folder"), "shots": request.get("shots"),
                "self_train": bool(request.get("self_train")),
                "identity": request.get("identity"), "ranges": request.get("ranges"),
                "recordings": str(Path(os.path.abspath(self.settings.recordings)))}
        (work / "job.json").write_text(json.dumps(spec, indent=2))
        tail: deque[str] = deque(maxlen=LOG_LINES)
        state: dict[str, Any] = {"progress": 0.0, "done": None, "error": None}

        def add_log(line: str) -> None:
            line = line.rstrip()
            if line:
                tail.append(line[:LOG_LINE_CHARS])

        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(self.threads),
                   MKL_NUM_THREADS=str(self.threads))
        package_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root,
                                                        env.get("PYTHONPATH")) if p)
        command = [sys.executable, "-m", "csi_cloud.job_runner", str(work / "job.json")]
        add_log(f"starting: {name} from {request['dataset']} ({request['kind']}), "
                f"epochs {request['epochs']}, max recordings {request['max_recordings']}")
        with self._proc_lock:
            if self._stop.is_set():
                self._finish(job_id, "failed", error="cancelled: the service stopped")
                return
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, text=True, errors="replace",
                                    env=env, start_new_session=True)
            self._proc = proc
        (work / "runner.pid").write_text(str(proc.pid))
        timed_out = threading.Event()

        def on_timeout() -> None:
            timed_out.set()
            self._terminate()

        watchdog = threading.Timer(self.timeout_s, on_timeout)
        watchdog.daemon = True
        watchdog.start()
        last = 0.0
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(EVENT_PREFIX):
                    try:
                        event = json.loads(line[len(EVENT_PREFIX):])
                    except ValueError:
                        add_log(line)
                        continue
                    self._event(event, state, add_log)
                else:
                    add_log(line)
                now = time.monotonic()
                if now - last >= _UPDATE_EVERY_S:
                    last = now
                    self._update(job_id, progress=state["progress"], log=_joined(tail))
            rc = proc.wait()
        finally:
            watchdog.cancel()
            with self._proc_lock:
                self._proc = None
        if rc != 0 or state["done"] is None:
            if timed_out.is_set():
                error = f"timed out after {self.timeout_s:.0f} s"
            elif self._stop.is_set():
                error = "cancelled: the service stopped"
            else:
                error = state["error"] or (f"training process exited with {rc}" + (
                    f": {tail[-1]}" if tail else ""))
            add_log(f"failed: {error}")
            self._finish(job_id, "failed", error=error, log=_joined(tail),
                         progress=state["progress"])
            self._cleanup(work)
            return
        done = state["done"]
        metrics = dict(done.get("metrics") or {})
        try:
            model_id = self._install(staging, name, add_log)
        except Exception as exc:
            error = f"the new bundle could not be served: {exc}"
            add_log(f"failed: {error}")
            self._finish(job_id, "failed", error=error, log=_joined(tail), metrics=metrics)
            self._cleanup(work)
            return
        metrics.update(self._compatibility(model_id, request.get("base_model")))
        if request.get("activate"):
            metrics["activated"] = self._activate_model(model_id, metrics, add_log)
        add_log(f"succeeded: bundle {name} ({model_id[:12]}…)")
        self._finish(job_id, "succeeded", progress=1.0, bundle=model_id, metrics=metrics,
                     log=_joined(tail))
        self._cleanup(work)

    @staticmethod
    def _event(event: dict[str, Any], state: dict[str, Any],
               add_log: Callable[[str], None]) -> None:
        kind = event.get("event")
        if isinstance(event.get("progress"), int | float):
            state["progress"] = min(1.0, max(0.0, float(event["progress"])))
        if kind == "log":
            add_log(str(event.get("line", "")))
        elif kind == "epoch":
            add_log(f"epoch {event.get('epoch')}/{event.get('epochs')}: loss "
                    f"{event.get('loss', 0):.3f}, val activity {event.get('val_activity', 0):.3f}"
                    f" ({event.get('seconds', 0):.1f} s)")
        elif kind == "error":
            state["error"] = str(event.get("error", "training failed"))
            add_log(f"error: {state['error']}")
        elif kind == "done":
            state["done"] = event

    def _install(self, staging: Path, name: str, add_log: Callable[[str], None]) -> str:
        from .model.compression import CloudModel

        model = CloudModel.load(staging, verify=True)
        model_id, manifest = model.id, model.manifest
        del model
        if model_id in self.registry.ids():
            add_log(f"the new bundle is identical to the served {model_id[:12]}…")
            return model_id
        models = Path(self.settings.models)
        models.mkdir(parents=True, exist_ok=True)
        dest = models / name
        if dest.exists():
            raise FileExistsError(f"{dest} already exists")
        incoming = models / f".incoming-{name}"
        shutil.rmtree(incoming, ignore_errors=True)
        shutil.copytree(staging, incoming, ignore=shutil.ignore_patterns(MANIFEST_FILE))
        os.rename(incoming, dest)
        write_manifest(dest, manifest)  # last: the registry skips a folder without one
        self.registry.refresh()
        if model_id not in self.registry.ids():
            problem = self.registry.problems.get(str(dest), "not loaded")
            shutil.rmtree(dest, ignore_errors=True)
            raise RuntimeError(problem)
        add_log(f"serving {name} ({model_id[:12]}…) from {dest}")
        return model_id

    def _compatibility(self, model_id: str, base_id: str | None) -> dict[str, Any]:
        if base_id is None or base_id not in self.registry.ids():
            return {"base_model": base_id, "compatible_with_base": None}
        new = self.registry.get(model_id).manifest.input_spec
        old = self.registry.get(base_id).manifest.input_spec
        ok = new.source_kind == old.source_kind and new.antennas == old.antennas
        return {"base_model": base_id, "compatible_with_base": ok}

    def _activate_model(self, model_id: str, metrics: dict[str, Any],
                        add_log: Callable[[str], None]) -> bool:
        if metrics.get("compatible_with_base") is False:
            add_log("not activated: the new bundle takes another kind of CSI than the base "
                    "model")
            return False
        from .model.bundle import activation_refusal

        refusal = activation_refusal(self.registry.get(model_id).manifest)
        if refusal is not None:
            add_log(f"not activated: {refusal}; POST /models/{{id}}/activate?force=true "
                    "activates it anyway")
            return False
        if self._activate is None or self._loop is None:
            add_log("not activated: no service to activate it in")
            return False
        try:
            future = asyncio.run_coroutine_threadsafe(self._activate(model_id), self._loop)
            announced = future.result(timeout=60)
        except Exception as exc:  # e.g. MQTT down: nothing changed, activate it later
            add_log(f"not activated: announcing it failed ({exc}); "
                    "POST /models/{id}/activate once the broker is reachable")
            return False
        add_log(f"activated; announced to {len(announced or [])} AP(s)")
        return True

    def _terminate(self) -> None:
        with self._proc_lock:
            proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

    @staticmethod
    def _cleanup(work: Path) -> None:
        """Keep job.json; drop the subset links, the staging bundle and checkpoints."""
        for sub in ("data", "bundle"):
            shutil.rmtree(work / sub, ignore_errors=True)
        with contextlib.suppress(OSError):
            (work / "runner.pid").unlink()


def _joined(tail: deque[str]) -> str:
    return "\n".join(tail)[-LOG_CHARS:]
