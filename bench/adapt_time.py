"""How long ``csi adapt`` takes for K = 5 labelled recordings per activity, one command.

    python bench/adapt_time.py [--data ../shared/data/fition] [--user user3] [--shots 5]
    python bench/adapt_time.py --self-train   # -> bench/results/adapt_time_self_train.json

Runs the real command (``csi adapt --model models/fition --shots 5``) on one Fition session
(a folder of links to that user's recordings: a new session for the adaptation) and records
its wall-clock and CPU time (user + system of the process), the torch threads it used and the
machine's CPU count and load, in bench/results/adapt_time.json. The target (issue 17): at most
60 s on 2 cores. On a shared machine the wall time grows with the load; the CPU time does
not, and on 2 idle cores the wall time is at most about the CPU time.

The timed run starts with an empty numba cache (NUMBA_CACHE_DIR in a fresh folder), so it
pays for compiling the context head's transform as a first run after installing does. Then,
unless ``--no-profile``, the same command runs again under cProfile (not timed: profiling
slows it) for the share of each stage, recorded under ``profile``.

``--self-train``: every other recording of each of the session's activity folders is given to
the command as unlabelled (``--self-train --unlabelled``; its names' labels are not read), the
rest as the labelled folder; the time includes the pseudo-labelling, the guard's
cross-validation and the refit.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "fition")
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "fition")
    parser.add_argument("--user", default="user3")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--self-train", action="store_true",
                        help="time csi adapt --self-train, half the session unlabelled")
    parser.add_argument("--out", type=Path, default=None,
                        help="[bench/results/adapt_time.json, or adapt_time_self_train.json]")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip the profiled second run")
    args = parser.parse_args()
    if args.out is None:
        args.out = ROOT / "bench" / "results" / (
            "adapt_time_self_train.json" if args.self_train else "adapt_time.json")
    with tempfile.TemporaryDirectory() as tmp:
        session = Path(tmp) / "session"
        unlabelled = Path(tmp) / "unlabelled"
        session.mkdir()
        for folder in sorted(args.data.iterdir()):
            if f"_{args.user}_" in folder.name:
                # Real folders of links to the files (the dataset index does not descend
                # into linked folders).
                files = sorted(f for f in folder.rglob("*") if f.is_file())
                for i, file in enumerate(files):
                    root = unlabelled if args.self_train and i % 2 else session
                    target = root / folder.name / file.relative_to(folder)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.symlink_to(file.resolve())

        def command(out: str) -> list[str]:
            return ["-m", "csi_cloud.cli", "adapt", "--model", str(args.model), "--data",
                    str(session), "--shots", str(args.shots), "--out", str(Path(tmp) / out),
                    "--json", *(["--self-train", "--unlabelled", str(unlabelled)]
                                if args.self_train else [])]

        env = {**os.environ, "NUMBA_CACHE_DIR": str(Path(tmp) / "numba-cache")}
        load_before = os.getloadavg()
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, *command("adapted")], capture_output=True,
                              text=True,
                              cwd=ROOT, timeout=1800, env=env)
        seconds = time.perf_counter() - started
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        load_after = os.getloadavg()
        cpu_seconds = (cpu_after.ru_utime - cpu_before.ru_utime
                       + cpu_after.ru_stime - cpu_before.ru_stime)
        if done.returncode != 0:
            raise SystemExit(done.stderr)
        result = json.loads(done.stdout)
        profile = (_profile(command("adapted-profiled"), Path(tmp) / "adapt.prof", env)
                   if args.profile else None)
    report = {
        "benchmark": "adapt_time", "command": f"csi adapt --model {args.model.name} "
                                              f"--shots {args.shots}"
                                              + (" --self-train --unlabelled (every other "
                                                 "recording of the session)"
                                                 if args.self_train else "")
                                              + " (one Fition session)",
        "self_training": result.get("self_training"),
        "user": args.user, "shots": args.shots, "support": result["support"],
        "held_out": result["held_out"], "method": result["method"],
        "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
        "target_seconds": 60,
        "within_target": seconds <= 60,
        "cpu_count": os.cpu_count(), "torch_threads": 2,
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in load_after],
        "activity_accuracy_before": result["activity_accuracy_before"],
        "activity_accuracy_after": result["activity_accuracy_after"],
        "activity_accuracy_per_second_before": result["activity_accuracy_per_second_before"],
        "activity_accuracy_per_second_after": result["activity_accuracy_per_second_after"],
        "numba_cache": "cold: the timed run compiles the transform",
        "profile": profile,
        "note": "wall and CPU time (user + system) of the whole command: starting Python, "
                "reading and preprocessing the session's recordings, int8 encoding, the "
                "context head's features of every window (once, shared by the fit and the "
                "scores), the ridge refit of every level, scoring every held-out window "
                "before and after (all of them, no sample), writing the bundle; measured on "
                "a machine shared with other work (load average above). The shipped bundle's "
                "training split holds part of this session, so the accuracies here are no "
                "new-setting numbers (bench/model.py has those)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


# The stages of ``csi adapt`` and the function whose cumulative time each one is.
STAGES = {
    "read_and_preprocess": ("csi_cloud/model/data.py", "load_segments"),
    "int8_encode_and_decode": ("csi_cloud/model/heads.py", "codes_from_segments"),
    "head_features": ("csi_cloud/model/adapt.py", "head_windows"),
    "ridge_refit": ("csi_cloud/model/adapt.py", "adapt_head"),
    "scoring": ("csi_cloud/model/adapt.py", "_accuracy"),
    "write_bundle": ("csi_cloud/model/heads.py", "save_derived"),
    # with --self-train: pseudo-labels, the guard's refits and the last one (its ridge refits
    # are in ridge_refit too)
    "self_training": ("csi_cloud/model/self_training.py", "self_train"),
    "adapt_bundle": ("csi_cloud/model/adapt_job.py", "adapt_bundle"),
}


def _profile(command: list[str], stats_file: Path, env: dict[str, str]) -> dict[str, object]:
    """The command again under cProfile (a warm numba cache now): cumulative wall seconds
    of each stage, and of the whole run including the interpreter's start and imports."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(stats_file), *command],
                          capture_output=True, text=True, cwd=ROOT, timeout=1800, env=env)
    total = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    stats = pstats.Stats(str(stats_file)).stats  # type: ignore[attr-defined]
    stages: dict[str, float] = {}
    for name, (file, function) in STAGES.items():
        stages[name] = round(sum(v[3] for (f, _, fn), v in stats.items()
                                 if fn == function and f.endswith(file)), 2)
    return {"seconds_whole_command_profiled": round(total, 1), "stage_seconds": stages,
            "note": "cumulative wall seconds under cProfile of a second, untimed run; "
                    "head_features inside ridge_refit and scoring is counted once, where "
                    "head_windows runs (before them); the rest of the whole command is the "
                    "interpreter start and imports"}


if __name__ == "__main__":
    main()
