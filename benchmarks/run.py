"""Regenerate the tables of BENCHMARKS.md: run each benchmark, paste its last markdown table.

Each section of BENCHMARKS.md that this script owns sits between `<!-- bench:NAME -->` and
`<!-- /bench:NAME -->`: the exact command, the date and hardware, and the table the benchmark
printed last. Everything outside the markers is prose and is never touched. A section without
markers is appended at the end under `## NAME`. A benchmark that fails keeps its old block;
the others still run, and the exit status is non-zero.

    python benchmarks/run.py                     # every section, full settings (about 3 hours on 2 cores)
    python benchmarks/run.py --quick             # tiny settings: checks every benchmark still runs
    python benchmarks/run.py --only throughput,char_lm --data-dir ../shared/data --device cuda
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from seqexp.sweep.resources import cpu_name

ROOT = Path(__file__).resolve().parents[1]  # commands run from, and are shown relative to, the repo root
SHAKESPEARE, IMDB = "tinyshakespeare.txt", "aclImdb_v1_labeled.tar.gz"


@dataclass(frozen=True)
class Section:
    name: str
    script: str  # relative to the repo root
    full: str  # arguments, split like a shell would; {data} is the data directory, {device} cpu or cuda,
    # {preset} char_lm's preset for the device
    quick: str  # tiny step counts: does it still run end to end, not how fast
    needs: tuple[str, ...] = ()  # files in the data directory


OVERHEAD_CHAR = f"data=shakespeare data.path={{data}}/{SHAKESPEARE} trainer.progress=false trainer.device={{device}}"
OVERHEAD_IMDB = f"experiment=imdb_attention data.path={{data}}/{IMDB} trainer.progress=false trainer.device={{device}}"

SECTIONS = [
    Section("throughput", "benchmarks/throughput.py",
            full="--steps 100 --repeats 2 trainer.device={device}",
            quick="--steps 20 --repeats 1 trainer.device={device}"),  # 20 steps: two 10-step windows, one kept
    Section("overhead_lstm_char", "benchmarks/overhead.py",
            full=f"--steps 150 --rounds 5 {OVERHEAD_CHAR}",
            quick=f"--steps 20 --rounds 2 {OVERHEAD_CHAR}", needs=(SHAKESPEARE,)),
    Section("overhead_attention_imdb", "benchmarks/overhead.py",  # ~1 s per step on 2 cores
            full=f"--steps 40 --rounds 5 {OVERHEAD_IMDB}",
            quick=f"--steps 3 --rounds 1 {OVERHEAD_IMDB}", needs=(IMDB,)),
    Section("gpt_step", "benchmarks/gpt_step.py",  # seqexp's attention LM step against a minimal GPT
            full=f"--data-path {{data}}/{SHAKESPEARE} --steps 100 --rounds 5 trainer.device={{device}}",
            quick=f"--data-path {{data}}/{SHAKESPEARE} --steps 3 --rounds 1 trainer.device={{device}}",
            needs=(SHAKESPEARE,)),
    Section("char_lm", "benchmarks/char_lm.py",
            full=f"--data-path {{data}}/{SHAKESPEARE} --budget 300 --device {{device}} --preset {{preset}}",
            # own --out: a quick run must not overwrite the full run's curves
            quick=f"--data-path {{data}}/{SHAKESPEARE} --budget 10 --device {{device}} --out benchmarks/results/quick",
            needs=(SHAKESPEARE,)),
    Section("fastpaths", "benchmarks/fastpaths.py",
            full="--device {device} --steps 5 --rounds 5",
            quick="--device {device} --steps 1 --rounds 2"),  # compiling alone takes about a minute
    Section("scaling", "benchmarks/scaling.py",
            full="--device {device} --lengths 64,128,256,512,1024,2048 --batches 8,32 --reps 3",
            quick="--device {device} --lengths 64,256 --batches 8 --reps 1 --out benchmarks/results/quick"),
    Section("bucketing", "benchmarks/bucketing.py",
            full=f"--imdb {{data}}/{IMDB} --max-lens 400,512", quick=f"--imdb {{data}}/{IMDB} --max-lens 400",
            needs=(IMDB,)),
    Section("data_prep", "benchmarks/data_prep.py",  # CPU only: no --device
            full=f"--imdb {{data}}/{IMDB} --text {{data}}/{SHAKESPEARE} --repeats 3",
            quick=f"--imdb {{data}}/{IMDB} --text {{data}}/{SHAKESPEARE} --repeats 1", needs=(IMDB, SHAKESPEARE)),
    # every model family on the memory tasks, each cell trained to its target or cap ({preset}: the
    # cpu grid, ~70 minutes on 2 idle cores, ~30 without Mamba and DeltaNet; or the gpu one);
    # cells already in its results JSON are reused
    Section("long_range", "benchmarks/long_range.py",
            full="--grid {preset} --device {device}",
            quick="--quick --device {device}"),
    # trains every family's IMDB config (about 1.5 h on 2 cores); finished runs of the same config are reused
    Section("imdb", "benchmarks/imdb.py",
            full=f"--data-path {{data}}/{IMDB} --device {{device}}",
            quick=f"--data-path {{data}}/{IMDB} --device {{device}} --quick", needs=(IMDB,)),
]


def argv(section: Section, quick: bool, data: str, device: str) -> list[str]:
    """The command after `python`; split before filling in, so a data path may hold spaces."""
    args = shlex.split(section.quick if quick else section.full)
    preset = "gpu" if device == "cuda" else "cpu"  # char_lm's model sizes for the device
    return [section.script, *(a.format(data=data, device=device, preset=preset) for a in args)]


def key(section: Section, device: str) -> str:
    """The marker name: GPU tables are sections of their own, next to (not over) the CPU ones."""
    return section.name if device == "cpu" else f"{section.name}_cuda"


def command_line(args: list[str]) -> str:
    return "python " + shlex.join(args)


def data_dir(arg: str | None) -> str:
    """The data directory as the commands show it: relative paths are made relative to the repo root."""
    path = arg or os.environ.get("SEQEXP_SHARED_DATA")
    if path is None:
        return "../shared/data"  # next to the repo, as tests/conftest.py expects it
    return path if os.path.isabs(path) else os.path.relpath(Path.cwd() / path, ROOT)


def hardware(device: str) -> str:
    # the benchmarks inherit this environment (OMP_NUM_THREADS), so they use as many threads
    if device == "cuda":
        return torch.cuda.get_device_name()
    n = torch.get_num_threads()
    return f"{cpu_name()}, {n} thread{'s' * (n != 1)}"


def last_table(text: str) -> str | None:
    """The last run of consecutive lines starting with `|`."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line.rstrip())
        elif current:
            tables.append("\n".join(current))
            current = []
    return tables[-1] if tables else None


def block(command: str, table: str, hw: str, quick: bool) -> str:
    kind = "quick run: tiny settings, a smoke test, not a measurement" if quick else "full run"
    return (f"Command: `{command}`\n({time.strftime('%Y-%m-%d')}, {hw}, torch {torch.__version__}, {kind})\n\n"
            f"{table}")


def replace_block(doc: str, name: str, new: str) -> str:
    """`doc` with the text between NAME's markers replaced by `new`; everything else kept as it is."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    i, j = doc.find(start), doc.find(end)
    if i < 0 and j < 0:  # a new section: appended under its own heading
        if doc and not doc.endswith("\n"):
            doc += "\n"
        gap = "\n" if doc else ""  # a blank line before the heading
        return f"{doc}{gap}## {name}\n\n{start}\n{new}\n{end}\n"
    if i < 0 or j < i or doc.count(start) > 1 or doc.count(end) > 1:
        raise ValueError(f"BENCHMARKS markers of {name}: want one {start} followed by one {end}")
    return doc[: i + len(start)] + "\n" + new + "\n" + doc[j:]


def read(path: Path) -> str:
    if not path.exists():
        return ""
    with open(path, encoding="utf-8", newline="") as f:  # newline="": line endings kept as they are
        return f.read()


def write_atomic(path: Path, text: str) -> None:
    """A reader (or a crash) sees the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def run(args: list[str]) -> tuple[int, str]:
    """Run `python ARGS` from the repo root, echoing its output as it comes; returns (exit code, stdout)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # stream, don't block-buffer into the pipe
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:  # stderr (progress bars, logs) goes straight to the console
        sys.stdout.write(line)
        sys.stdout.flush()
        lines.append(line)
    return proc.wait(), "".join(lines)


def main(cli: list[str] | None = None, sections: list[Section] = SECTIONS) -> int:
    names = [s.name for s in sections]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke test of every benchmark")
    p.add_argument("--only", help=f"comma-separated sections: {','.join(names)}")
    p.add_argument("--data-dir", help="tinyshakespeare.txt and the IMDB archive "
                                      "(default: $SEQEXP_SHARED_DATA, else ../shared/data from the repo root)")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(cli)
    chosen = a.only.split(",") if a.only else names
    if unknown := sorted(set(chosen) - set(names)):
        p.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device")
    todo = [s for s in sections if s.name in chosen]
    try:  # broken markers stop us before an hour of benchmarks, not after
        for s in todo:
            replace_block(read(a.out), key(s, a.device), "")
    except ValueError as e:
        p.error(f"{a.out}: {e}")
    data = data_dir(a.data_dir)
    # all missing data reported before anything runs: a full run takes an hour
    missing = sorted({f"{data}/{f}" for s in todo for f in s.needs if not (ROOT / data / f).exists()})
    if missing:
        print(f"missing data: {', '.join(missing)}. Point --data-dir (or SEQEXP_SHARED_DATA) at them, "
              f"or leave their sections out with --only.", file=sys.stderr)
        return 2

    hw, failed, report = hardware(a.device), [], []
    for s in todo:
        args = argv(s, a.quick, data, a.device)
        print(f"\n=== {s.name}: {command_line(args)}", flush=True)
        t0 = time.perf_counter()
        code, out = run(args)
        table = last_table(out) if code == 0 else None
        took = f"{(time.perf_counter() - t0) / 60:.1f} min"
        if table is None:
            why = f"exit status {code}" if code else "printed no table"
            failed.append(s.name)
            report.append(f"{s.name}: FAILED ({why}, {took}); its block in {a.out} is unchanged")
            continue
        # read again just before writing: the prose may have been edited during a long run
        write_atomic(a.out, replace_block(read(a.out), key(s, a.device),
                                          block(command_line(args), table, hw, a.quick)))
        report.append(f"{s.name}: ok ({took})")
    print("\n" + "\n".join(report), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
