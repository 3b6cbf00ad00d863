"""Resumable training state, atomic checkpoints (through ``accelerator.save_state``) and the
output directory a run owns: a lock against a second live run, a refusal to mix with another
run's results, and a record of the run's config in every checkpoint so ``--resume`` continues
only the same run."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import glob
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field

from rlhf.errors import UserError


class CheckpointError(UserError):
    """A checkpoint or output directory that cannot be used as asked; one line naming why."""


@dataclass
class TrainState:
    """What a checkpoint needs beyond model, optimizer, scheduler and RNG."""

    step: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    extra: dict = field(default_factory=dict)
    # Where this process's run started (after a resume): not saved, for "every step was skipped".
    first_step: int = 0
    skipped_before: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "skipped_steps": self.skipped_steps,
                "consecutive_skips": self.consecutive_skips, "extra": self.extra}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.skipped_steps = int(state["step"]), int(state["skipped_steps"])
        self.consecutive_skips, self.extra = int(state["consecutive_skips"]), dict(state.get("extra", {}))


def _fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _not_tied_weights_note(record: logging.LogRecord) -> bool:
    """accelerate warns that it wrote one tensor of a tied pair (the LM head tied to the embeddings)
    to the safetensors file; safetensors' ``load_model`` ties it back, and the resume tests compare
    every weight after a reload. The warning would print at every save, so it is dropped."""
    return "Removed shared tensor" not in record.getMessage()


class Checkpointer:
    """Atomic, resumable checkpoints through ``accelerator.save_state``.

    A checkpoint is written to ``checkpoints/.tmp-step-N``, fsynced, then renamed to
    ``checkpoints/step-N``: a crash mid-save leaves only a ``.tmp`` directory, which is
    ignored, so the newest ``step-*`` always loads. Only the newest ``keep`` are kept.
    """

    def __init__(self, accelerator, output_dir: str, keep: int, record: dict | None = None):
        self.accelerator = accelerator
        self.root = os.path.join(output_dir, "checkpoints")
        self.keep = keep
        self.record = record  # the run's config (run_record), written into every checkpoint

    def list(self) -> list[str]:
        if not os.path.isdir(self.root):
            return []
        names = sorted(n for n in os.listdir(self.root) if n.startswith("step-"))
        return [os.path.join(self.root, n) for n in names]

    def latest(self) -> str | None:
        found = self.list()
        return found[-1] if found else None

    def save(self, step: int) -> str:
        acc = self.accelerator
        final = os.path.join(self.root, f"step-{step:08d}")
        tmp = os.path.join(self.root, f".tmp-step-{step:08d}")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(self.root, exist_ok=True)
        acc.wait_for_everyone()
        log = logging.getLogger("accelerate.utils.other")
        log.addFilter(_not_tied_weights_note)
        previous = self.latest()
        try:
            acc.save_state(tmp, safe_serialization=True)
            acc.wait_for_everyone()
            if acc.is_main_process:
                if self.record is not None:
                    with open(os.path.join(tmp, RUN_FILE), "w") as f:
                        json.dump(self.record, f, indent=1)
                _fsync_tree(tmp)
                if os.path.exists(final):
                    shutil.rmtree(final)
                os.replace(tmp, final)
                _fsync_tree(self.root)
        except OSError as e:  # a full disk, a quota: the half-written .tmp goes, the older checkpoints stay
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"checkpoint {final}: cannot write it ({e.strerror or e}); last good checkpoint: "
                                  f"{previous or 'none'}") from None
        finally:
            log.removeFilter(_not_tied_weights_note)
            # Checkpoints past this step belong to a run resumed from an earlier one: never keep
            # them in place of this run's own.
            found = self.list()
            stale = [p for p in found if p > final]
            kept = [p for p in found if p <= final]
            for old in stale + (kept[: -self.keep] if self.keep > 0 else []):
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def resume(self, spec: str | None) -> str | None:
        """Load ``spec`` ('auto' = newest, or a path); return what was loaded.

        With 'auto', a checkpoint that cannot be loaded (a truncated or corrupt file) is passed
        over for the next older one, with a one-line warning; if none loads, a one-line error.
        """
        if not spec:
            return None
        path = self.find(spec)
        candidates = [p for p in reversed(self.list()) if p <= path] if spec == "auto" else [path]
        failed: list[tuple[str, str]] = []
        for candidate in candidates:
            try:
                self.accelerator.load_state(candidate)
            except Exception as e:  # safetensors, torch.load, pickle, a missing file: unusable
                message = str(e).strip().splitlines()[0] if str(e).strip() else ""
                failed.append((candidate, f"{type(e).__name__}: {message}" if message else type(e).__name__))
                continue
            if failed and self.accelerator.is_main_process:
                skipped = ", ".join(p for p, _ in failed[1:])
                print(f"warning: --resume: {failed[0][0]} cannot be loaded ({failed[0][1]})"
                      + (f"; nor can {skipped}" if skipped else "") + f"; resuming from {candidate}", file=sys.stderr)
            return candidate
        if spec != "auto":
            raise CheckpointError(f"--resume {spec}: cannot be loaded ({failed[0][1]})")
        raise CheckpointError(f"--resume: no checkpoint in {self.root} can be loaded ({failed[0][0]}: {failed[0][1]})")

    def find(self, spec: str) -> str:
        """The checkpoint ``--resume spec`` names ('auto': the newest), or a one-line error."""
        path = self.latest() if spec == "auto" else spec
        if path is None:
            out = os.path.dirname(os.path.normpath(self.root))
            left = [n for n in RESULT_FILES if os.path.exists(os.path.join(out, n))]
            way = ("start afresh with --overwrite-output-dir instead, replacing " + ", ".join(left) if left
                   else "drop --resume to start afresh")
            raise CheckpointError(f"--resume: no checkpoint in {self.root} to resume ({way})")
        if not os.path.isdir(path):
            raise CheckpointError(f"--resume {spec}: no such checkpoint directory")
        return path


# ---- the output directory a run owns ----------------------------------------------------------

RUN_FILE = "rlhf_run.json"
LOCK_FILE = ".rlhf.lock"
# Config fields that do not change what is trained: a run resumed with other values of these
# is the same run (a longer --max-steps, another --save-every, a new --eval-data).
NOT_RUN_DEFINING = frozenset({
    "output_dir", "resume", "overwrite_output_dir", "max_steps", "epochs", "save_every", "save_total_limit",
    "eval_every", "eval_data", "log_every", "report_to", "max_consecutive_skips", "on_bad_record",
    "trust_remote_code", "bf16", "gradient_checkpointing", "prompts", "ddp_timeout",
    "monitor", "monitor_distinct_drop", "monitor_length_growth", "monitor_reward_length_corr", "monitor_kl_fraction",
    "monitor_disagreement_growth", "monitor_pref_accuracy_drop", "stop_on_overoptimisation", "log_samples",
    "sample_max_new_tokens",
})
PATH_FIELDS = frozenset({"model", "data", "reward_model", "critic_model"})
# What a finished or interrupted run leaves: another run may not write here unless asked to.
RESULT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                "value_head.safetensors", "metrics.jsonl", "ensemble.json")
# What --overwrite-output-dir removes once the new run has started (its model and tokenizer are loaded by
# then): everything a run writes, the tokenizer files and the model card too, so nothing of the old run
# (a chat template the new tokenizer lacks) outlives it; nothing else in the directory is touched.
OLD_RUN_OUTPUTS = ("checkpoints", "tensorboard", "critic", "metrics.jsonl", "config.json", "generation_config.json",
                   "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
                   "adapter_model.safetensors", "adapter_config.json", "value_head.safetensors",
                   "ensemble.json", "member-*", "samples.jsonl", "best", ".tmp-best", "report.html",
                   "chat_template.jinja", "chat_template.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "README.md")


def run_record(cfg) -> dict:
    """The recipe and the config fields that define what a run trains (JSON values; local paths
    absolute, so ``runs/sft`` and ``./runs/sft`` are the same model)."""
    record = {"recipe": type(cfg).__module__.rsplit(".", 1)[-1]}
    for f in dataclasses.fields(cfg):
        if f.name not in NOT_RUN_DEFINING:
            value = getattr(cfg, f.name)
            is_path = isinstance(value, str) and f.name in PATH_FIELDS and os.path.exists(value)
            record[f.name] = os.path.abspath(value) if is_path else value
    return json.loads(json.dumps(record, default=str))


def _flag(name: str) -> str:
    return "recipe" if name == "recipe" else "--" + name.replace("_", "-")


def check_same_run(checkpoint: str, cfg) -> None:
    """Refuse a checkpoint written by a run of another recipe, model, data or hyper-parameters."""
    path = os.path.join(checkpoint, RUN_FILE)
    if not os.path.exists(path):
        logging.getLogger(__name__).warning("%s has no %s (written by an older rlhf): its config is not checked",
                                            checkpoint, RUN_FILE)
        return
    with open(path) as f:
        saved = json.load(f)
    now = run_record(cfg)
    differ = [k for k in now if k in saved and saved[k] != now[k]]
    if differ:
        what = "; ".join(f"{_flag(k)} {saved[k]!r} there, {now[k]!r} now" for k in differ)
        raise CheckpointError(f"--resume {checkpoint}: saved by another run ({what}); resume with the same "
                              "config, or start afresh with --overwrite-output-dir")


def previous_results(output_dir: str) -> list[str]:
    """The results of an earlier run found in ``output_dir`` (paths relative to it)."""
    found = [os.path.relpath(p, output_dir) for p in Checkpointer(None, output_dir, 0).list()[-1:]]
    return found + [n for n in RESULT_FILES if os.path.exists(os.path.join(output_dir, n))]


def remove_old_run(output_dir: str, keep: tuple[str, ...] = ()) -> None:
    """--overwrite-output-dir, once the new run has started: the earlier run's outputs go (but
    ``keep``, names this run has already written there: an ensemble's new members)."""
    for pattern in OLD_RUN_OUTPUTS:
        for path in glob.glob(os.path.join(glob.escape(output_dir), pattern)):
            if os.path.basename(path) not in keep:
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


class DirLock:
    """``OUTPUT_DIR/.rlhf.lock`` held with ``flock`` while a run writes there; it holds the pid.

    The operating system drops the lock when the process dies (even by ``kill -9``), so a
    stale file never blocks; the file is removed on release.
    """

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_FILE)
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise CheckpointError(f"--output-dir {self.directory}: another run is writing there (pid {pid}, "
                                      f"{self.path}); wait for it to end or choose another directory") from None
            try:
                ours = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                ours = False
            if ours:
                break
            os.close(fd)  # its holder removed the file as we opened it: take the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


_LOCKS: dict[str, DirLock] = {}


def release_output_dirs() -> None:
    """Release every output directory this process holds (at exit, and by the CLI after a run)."""
    while _LOCKS:
        _LOCKS.popitem()[1].release()


atexit.register(release_output_dirs)


def release_output_dir(output_dir: str) -> None:
    lock = _LOCKS.pop(os.path.realpath(output_dir), None)
    if lock:
        lock.release()


def claim_output_dir(cfg, is_main_process: bool) -> None:
    """Before any loading: lock ``cfg.output_dir`` and refuse to mix this run with another.

    A directory holding another run's results needs ``--resume`` (whose checkpoint must come
    from a run of the same config) or ``--overwrite-output-dir``. Nothing is written or removed
    here but the lock file, so a run that fails at start-up leaves the directory as it was.
    """
    out = cfg.output_dir
    if cfg.model and os.path.isdir(cfg.model) and os.path.realpath(cfg.model) == os.path.realpath(out):
        raise CheckpointError(f"--output-dir {out} is the --model directory; choose another output directory")
    created = not os.path.isdir(out)
    if is_main_process:
        release_output_dir(out)  # an earlier run of this process that ended without releasing it
        lock = DirLock(out)
        try:
            os.makedirs(out, exist_ok=True)
            lock.acquire()
        except OSError as e:
            raise CheckpointError(f"--output-dir {out}: cannot write there ({e.strerror})") from None
        _LOCKS[os.path.realpath(out)] = lock
    try:
        if cfg.resume:
            check_same_run(Checkpointer(None, out, 0).find(cfg.resume), cfg)
        elif not cfg.overwrite_output_dir and (found := previous_results(out)):
            way = ("pass --resume to continue that run or --overwrite-output-dir to replace it"
                   if any(f.startswith("checkpoints") for f in found) else
                   "it left no checkpoint to resume (no --save-every), so pass --overwrite-output-dir to replace it")
            raise CheckpointError(f"--output-dir {out} holds another run's results ({', '.join(found)}); {way}")
    except CheckpointError:
        release_output_dir(out)
        if created and is_main_process:
            with contextlib.suppress(OSError):
                os.rmdir(out)  # it was made for the lock alone
        raise
