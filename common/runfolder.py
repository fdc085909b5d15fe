"""The run folder, owned here: its file names, the metrics schema, the writer, the validating
readers, the lock that keeps a second process out, and the clean-up of temp files a kill left
behind. The trainer, the analysis scripts and the demo all go through this module."""
from __future__ import annotations

import csv
import io
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError, WriteError
from .files import atomic_write, pid_alive, remove_stale_temp
from .record import RunRecord, Summary, read_record, read_summary

CONFIG, METRICS, SUMMARY, PREDICTIONS = ("config.json", "metrics.csv", "summary.json",
                                         "test_predictions.csv")
LAST, BEST, LOCK, HOLDER = "last.pt", "best.pt", ".lock", ".lock.holder"
RUN_FILES = (LAST, BEST, METRICS, SUMMARY, PREDICTIONS, CONFIG)
METRIC_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "epoch_time_s",
                  "train_img_per_s", "val_img_per_s", "peak_mem_gb")
REQUIRED = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")
PREDICTION_COLUMNS = ("index", "label", "best_pred", "best_conf", "best_p_true", "best_top5",
                      "final_pred", "final_conf", "final_p_true", "final_top5")


# ----------------------------------------------------------------------------- lock and stale files

class FolderInUse(UserError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """An exclusive lock on a run folder: `filelock` (flock on Linux and macOS, msvcrt on Windows, a
    lock file where neither exists) on .lock, with the holder's pid, host and start time in
    .lock.holder. Never blocks. A lock left by a dead process (kill -9, reboot) is taken over, with
    a message: an OS lock is released by the kernel when its holder dies; a bare lock file (no OS
    locking) is removed when its recorded holder, on this host, no longer runs. A live holder on
    another host can only be reported, not checked."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK
        self.holder_path = Path(folder) / HOLDER
        self.lock = None
        self.held = False

    def acquire(self) -> str | None:
        """Take the lock, or raise FolderInUse naming the holder; returns a message when a stale one
        was taken."""
        import warnings

        # "only soft file lock is available": handled below, no need to shout
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from filelock import FileLock, Timeout

        previous = self._holder()
        for attempt in (1, 2):
            lock = FileLock(str(self.path), timeout=0)
            try:
                lock.acquire()
                break
            except Timeout:
                stale_file = (attempt == 1 and previous and not _holder_alive(previous)
                              and not _os_locking(lock))
                if not stale_file:
                    raise FolderInUse(f"{self.path.parent} is in use by another training process "
                                      f"({previous or 'unknown'}); wait for it to "
                                      "finish or stop it") from None
                self.path.unlink(missing_ok=True)  # a bare lock file of a process that is gone
            except OSError:
                # this file system cannot lock (some network mounts): the recorded holder decides
                if previous and _holder_alive(previous):
                    raise FolderInUse(f"{self.path.parent} is in use by {previous} (this file "
                                      "system cannot lock; if that process is gone, "
                                      f"delete {self.path})") from None
                lock = None
                break
        self.lock, self.held = lock, True
        self.holder_path.write_text(f"pid {os.getpid()} on {socket.gethostname()} since "
                                    f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        if previous:
            return f"took over the lock of {previous}, which no longer runs"
        return None

    def release(self) -> None:
        """Give the lock up (only if this process took it: a refused process leaves the holder's
        files alone)."""
        if not self.held:
            return
        self.holder_path.unlink(missing_ok=True)
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        self.path.unlink(missing_ok=True)
        self.held = False

    def _holder(self) -> str:
        try:
            return self.holder_path.read_text().strip()
        except OSError:
            return ""


def _os_locking(lock) -> bool:
    """Does this lock rely on the OS (released when its holder dies), rather than on a file's
    existence?"""
    return "Soft" not in type(lock).__name__


def in_use(folder: Path) -> bool:
    """Whether a live process (on this host) holds the run folder's lock: it is training there."""
    try:
        holder = (Path(folder) / HOLDER).read_text().strip()
    except OSError:
        return False
    return bool(holder) and _holder_alive(holder)


def _holder_alive(holder: str) -> bool:
    parts = holder.split()  # "pid 123 on host since ..."
    if len(parts) < 4 or parts[0] != "pid" or parts[3] != socket.gethostname():
        return len(parts) >= 4  # another host: cannot tell, assume alive
    return not parts[1].isdigit() or pid_alive(int(parts[1]))


def remove_stale_writes(folder: Path) -> list[str]:
    """Delete the temp files of interrupted atomic writes (.last.pt.xxxx.tmp); call with the lock
    held (no other process writes this folder, so every one is stale)."""
    return remove_stale_temp(folder, ".*.tmp")


# ----------------------------------------------------------------------------- metrics.csv

class MetricsLog:
    """metrics.csv (one flat row per epoch, flushed) and the same scalars in TensorBoard."""

    def __init__(self, folder: str | Path, tensorboard: bool = True):
        self.path = Path(folder) / METRICS
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(folder))

    def reconcile(self, epochs_done: int) -> list[str]:
        """Before a resume: keep one whole row per epoch up to the checkpoint's epoch; drop a
        truncated last line, rows past the checkpoint and duplicates (the last one wins). Returns
        what was repaired."""
        if not self.path.is_file():
            return []
        header, rows, problems = _parse_rows(self.path, strict_end=True)
        by_epoch: dict[int, list[str]] = {}
        for line_no, values in rows:
            epoch = values.get("epoch", "")
            if not epoch.isdigit():
                problems.append(f"line {line_no}: no epoch number")
            elif int(epoch) > epochs_done:
                problems.append(f"line {line_no}: epoch {epoch} is past the checkpoint (epoch "
                                f"{epochs_done})")
            else:
                if int(epoch) in by_epoch:
                    problems.append(f"line {line_no}: epoch {epoch} appears twice (kept the later "
                                    "row)")
                by_epoch[int(epoch)] = values
        if problems:
            buffer = io.StringIO()
            w = csv.DictWriter(buffer, fieldnames=list(METRIC_COLUMNS), extrasaction="ignore",
                               lineterminator="\n")
            w.writeheader()
            w.writerows(by_epoch[e] for e in sorted(by_epoch))
            atomic_write(self.path, buffer.getvalue())
        return problems

    def append(self, row: dict[str, float]) -> None:
        new = not self.path.is_file() or self.path.stat().st_size == 0
        try:
            with open(self.path, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(METRIC_COLUMNS), extrasaction="ignore",
                                   lineterminator="\n")
                if new:
                    w.writeheader()
                w.writerow({k: (f"{v:.7g}" if isinstance(v, float) else v) for k, v in row.items()})
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise WriteError(f"cannot append to {self.path} ({e.strerror or e}); the checkpoint of "
                             "the previous epoch is intact") from None
        if self.writer is not None:
            for k, v in row.items():
                if k != "epoch" and v is not None:
                    self.writer.add_scalar(k, v, row["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _parse_rows(path: Path,
                strict_end: bool = False) -> tuple[list[str], list[tuple[int, dict[str, str]]],
                                                   list[str]]:
    """(header, [(line number, row)], problems) of a metrics.csv; malformed lines become problems.
    With strict_end, a last line without its newline counts as cut off (the writer always ends rows
    with one)."""
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    elif lines and strict_end:
        lines[-1] = lines[-1] + "\0"
    if not lines:
        return [], [], []
    header = next(csv.reader([lines[0]]))
    rows, problems = [], []
    for i, line in enumerate(lines[1:], start=2):
        fields = next(csv.reader([line.rstrip("\0")]), [])
        if line.endswith("\0") or len(fields) != len(header):
            problems.append(f"line {i}: truncated row ({len(fields)} of {len(header)} fields)")
            continue
        rows.append((i, dict(zip(header, fields))))
    return header, rows, problems


def read_metrics(path: str | Path):
    """A validated metrics.csv as a DataFrame sorted by epoch; a UserError names the file, the line
    and the problem (missing columns, a truncated row, a value that is not a number, an epoch twice
    or out of order)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist (pass a run folder or its metrics.csv)")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty: the run has not finished an epoch yet")
    header, rows, problems = _parse_rows(path)
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise UserError(f"{path} lacks the column(s) {', '.join(missing)}; expected a metrics.csv "
                        "of the train scripts")
    if problems:
        raise UserError(f"{path} {problems[0]}; delete that line (or --resume the run, which "
                        "repairs it)")
    if not rows:
        raise UserError(f"{path} has a header but no rows: the run has not finished an epoch yet")
    records, previous = [], 0
    for line_no, values in rows:
        record = {}
        for col in header:
            try:
                record[col] = float(values[col])
            except ValueError:
                if col in REQUIRED:
                    raise UserError(f"{path} line {line_no}: column {col} holds "
                                    f"{values[col]!r}, not a number") from None
                record[col] = math.nan
            if col in REQUIRED and not math.isfinite(record[col]):
                raise UserError(f"{path} line {line_no}: column {col} is {values[col]!r}; the run "
                                "diverged or the file is damaged")
        epoch = record["epoch"]
        if epoch != int(epoch) or epoch <= previous:
            what = "appears twice" if epoch == previous else "is out of order"
            raise UserError(f"{path} line {line_no}: epoch {values['epoch']} {what}; delete the "
                            "wrong row")
        previous = int(epoch)
        records.append(record)
    frame = pd.DataFrame.from_records(records, columns=header)
    frame["epoch"] = frame["epoch"].astype(int)
    return frame


# ----------------------------------------------------------------------------- predictions

def prediction_rows(index, labels, best_probs, final_probs) -> str:
    """test_predictions.csv: per test image its label and, for best.pt and the final epoch, the
    top-1 class, its probability, the probability of the true class and the top-5 classes."""
    buffer = io.StringIO()
    w = csv.writer(buffer, lineterminator="\n")
    w.writerow(PREDICTION_COLUMNS)
    parts = []
    for probs in (best_probs, final_probs):
        top = probs.topk(min(5, probs.shape[1]), dim=1)
        parts.append((top.indices[:, 0].tolist(), top.values[:, 0].tolist(),
                      probs.gather(1, labels.view(-1, 1)).squeeze(1).tolist(),
                      top.indices.tolist()))
    (bp, bc, bt, b5), (fp, fc, ft, f5) = parts
    for i, idx in enumerate(index.tolist()):
        w.writerow([idx, int(labels[i]), bp[i], f"{bc[i]:.5f}", f"{bt[i]:.5f}",
                    " ".join(map(str, b5[i])), fp[i], f"{fc[i]:.5f}", f"{ft[i]:.5f}",
                    " ".join(map(str, f5[i]))])
    return buffer.getvalue()


def write_predictions(path: Path, index, labels, best_probs, final_probs) -> None:
    atomic_write(path, prediction_rows(index, labels, best_probs, final_probs))


def read_predictions(path: str | Path):
    """test_predictions.csv as a DataFrame, validated; None when the run has none (older runs)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        return None
    try:
        frame = pd.read_csv(path, dtype={"best_top5": str, "final_top5": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a readable CSV ({str(e).splitlines()[0]})") from None
    missing = [c for c in PREDICTION_COLUMNS if c not in frame.columns]
    if missing or frame[["label", "best_pred", "final_pred"]].isna().any().any():
        raise UserError(f"{path} is damaged (missing {', '.join(missing) or 'values'}); re-run "
                        "the test with --resume")
    return frame


# ----------------------------------------------------------------------------- a run, read back

@dataclass
class Run:
    """One run folder's outputs, validated and typed."""

    folder: Path
    metrics: Any                               # pandas.DataFrame
    record: RunRecord
    summary: Summary | None = None
    _predictions: Any = None

    @property
    def label(self) -> str:
        return self.folder.name

    @property
    def predictions(self):
        if self._predictions is None:
            self._predictions = read_predictions(self.folder / PREDICTIONS)
        return self._predictions


def metrics_path(path: str | Path) -> Path:
    """The metrics.csv of a run given as its folder or as the file itself."""
    path = Path(path)
    return path if path.suffix == ".csv" else path / METRICS


def load_run(path: str | Path) -> Run:
    """A run from its folder or its metrics.csv."""
    csv_path = metrics_path(path)
    folder = csv_path.parent
    if not folder.exists():
        raise UserError(f"{path}: no such run folder or metrics.csv (a typo? give a run folder of "
                        "the train scripts, or its metrics.csv)")
    if not csv_path.is_file() and Path(path).suffix != ".csv":
        raise UserError(f"{folder} holds no {METRICS}: not a run folder of the train scripts, or a "
                        "run stopped before its first epoch ended")
    metrics = read_metrics(csv_path)
    if not (folder / CONFIG).is_file():
        raise UserError(f"{folder} has no {CONFIG}: not a run folder of the train scripts")
    return Run(folder, metrics, read_record(folder / CONFIG), read_summary(folder / SUMMARY))
